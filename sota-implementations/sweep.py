"""Stopping a local hydra multirun as a whole: every running job saves, no queued job starts.

Under hydra-joblib-launcher the jobs of a sweep run in loky worker processes. A stopped single run
ends with exit status 130; a stopped *job* that did the same would make joblib end the other workers
at once, before they save. So a stopped job of a multirun saves and returns (``harness.train``), and
:class:`StopSweep`, a hydra callback of the sweep's main process,

- on the first Ctrl-C or SIGTERM of the main process, records the stop in a marker file of the sweep
  directory and passes SIGTERM on to the workers (``kill <pid>`` of the main process reaches no job);
- ends the sweep with exit status 130 once every worker has returned, if any part of it was stopped.

A job reads the marker when it starts (:func:`stopped`): the jobs still queued return without
training. A job that receives the signal itself (a Ctrl-C reaches the whole process group) records
the stop too (:func:`record_stop`), so a sweep whose main process saw nothing stops as well. Rerunning
the same ``-m ... resume=auto`` command removes the marker and continues every run.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

MARKER_ENV = "TORCHRL_S2AC_STOP_MARKER"  # set by StopSweep in the main process; jobs inherit it
MARKER_NAME = ".stopped"


def _marker() -> Path | None:
    value = os.environ.get(MARKER_ENV)
    return Path(value) if value else None


def stopped() -> bool:
    """Whether the multirun this process belongs to was stopped (``False`` outside a multirun)."""
    marker = _marker()
    return marker is not None and marker.exists()


def record_stop() -> None:
    """Mark the multirun this process belongs to as stopped (nothing outside a multirun)."""
    marker = _marker()
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


class StopSweep(Callback):
    """Hydra callback (``hydra.callbacks``): one Ctrl-C or SIGTERM stops the sweep, every running job saved."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        marker = Path(config.hydra.sweep.dir).absolute() / MARKER_NAME
        marker.unlink(missing_ok=True)  # left by the stopped sweep this command continues
        os.environ[MARKER_ENV] = str(marker)
        self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _request(self, signum, frame) -> None:
        record_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: joblib ends the workers now
        for worker in multiprocessing.active_children():  # loky's workers; a job ignores a repeated SIGTERM
            os.kill(worker.pid, signal.SIGTERM)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if stopped():
            print(
                f"Sweep stopped; its runs saved. Continue it with the same command and resume=auto "
                f"(sweep directory {Path(config.hydra.sweep.dir).absolute()})",
                file=sys.stderr,
            )
            raise SystemExit(130)
