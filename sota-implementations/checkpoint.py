"""Crash-safe checkpoints for the training harness.

Layout of ``checkpoint.dir`` (``<run dir>/checkpoints`` by default)::

    checkpoints/
        latest              "ckpt-000007 <sha256 of its manifest.json>": the pointer, replaced atomically
        ckpt-000007/
            manifest.json   counters, run identity (algorithm, env, networks, shapes), buffer length and
                            write cursor, and the size and sha256 of every file below
            state.pt        the loss (modules and targets), the optimisers and the RNG states
            buffer-000000.pt, buffer-000001.pt, ...
                            the replay buffer's filled rows in storage order (not its capacity), in chunks
                            of at most ``BUFFER_CHUNK_BYTES``: a save or a load holds one chunk's copy in
                            memory beside the buffer, not a copy of the whole buffer (GBs at 1M frames)

A checkpoint is checked against the free space, written into ``.tmp-ckpt-000008/`` one file at a
time (every file fsync'd), renamed to ``ckpt-000008`` and only then does
``latest`` switch to it (temporary file, fsync, rename, fsync of the directory). The previous
checkpoint is removed after the switch, so a kill or a failed write at any moment leaves
``latest`` naming a complete checkpoint. Every path is relative to the checkpoint: a copied
run directory resumes from its own files.

:func:`load` verifies every file's size and checksum, the buffer's length and cursor against the
counters and the run identity against the new run's before anything is loaded; each mismatch is a
:class:`CheckpointError` with one line naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

POINTER = "latest"
MANIFEST = "manifest.json"
FORMAT = 2  # 1: the whole buffer in one buffer.pt (still read)
BUFFER_CHUNK_BYTES = 64 << 20
_HEADROOM = 1 << 20  # bytes kept free beyond the checkpoint itself


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message is one line naming the cause."""


# ---------------------------------------------------------------------------
# Where checkpoints live
# ---------------------------------------------------------------------------


def locate(path: Path, checkpoint_dir: str) -> tuple[Path, Path]:
    """``(checkpoint root, run dir)`` for ``resume=path``: a run directory, its checkpoint root or ``latest``."""
    path = Path(path).absolute()
    if path.is_file() and path.name == POINTER:
        path = path.parent
    if (path / checkpoint_dir / POINTER).is_file():
        return path / checkpoint_dir, path
    if (path / POINTER).is_file():
        relative = Path(checkpoint_dir)
        run_dir = path.parent
        if not relative.is_absolute() and path.parts[-len(relative.parts) :] == relative.parts:
            run_dir = path.parents[len(relative.parts) - 1]
        return path, run_dir
    raise CheckpointError(
        f"resume={str(path)!r}: no checkpoint there (expected a run directory holding "
        f"{checkpoint_dir}/{POINTER}, or a checkpoint directory holding {POINTER})."
    )


def check_writable(root: Path) -> None:
    """Create ``root`` and write, fsync and delete a probe file in it; :class:`CheckpointError` if that fails."""
    probe = root / f".probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as file:
            file.write(b"probe")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"checkpoint.dir={str(root)!r} is not writable: {error.strerror or error}.") from None


def _current(root: Path) -> str | None:
    """The name of the checkpoint ``latest`` points to (``None`` when there is none or it is unreadable)."""
    try:
        return (root / POINTER).read_text().split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, payload: bytes) -> None:
    with open(path, "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())


def _serialise(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def _buffer_chunks(replay_buffer) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges covering the buffer's filled rows, each of at most ``BUFFER_CHUNK_BYTES``."""
    length = len(replay_buffer)
    if not length:
        return []
    row_bytes = max(1, replay_buffer.storage[:1].exclude("index").bytes())
    rows_per_chunk = max(1, BUFFER_CHUNK_BYTES // row_bytes)
    return [(start, min(start + rows_per_chunk, length)) for start in range(0, length, rows_per_chunk)]


def save(root: Path, *, loss, optimizers, replay_buffer, state: dict, identity: dict) -> Path:
    """Write a complete checkpoint beside the current one, then switch ``latest`` to it; returns its directory.

    ``state`` holds the counters (``frames``, ``stored`` transitions, ...); ``identity`` what a resumed
    run must match (see :func:`load`). A failed write (full disk, read-only directory) removes the
    partial checkpoint and raises :class:`CheckpointError`; the previous checkpoint stays current.
    """
    length = len(replay_buffer)
    chunks = _buffer_chunks(replay_buffer)
    state_payload = _serialise(
        {"loss": loss.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers], "rng": _rng_state()}
    )
    buffer_bytes = replay_buffer.storage[:length].exclude("index").bytes() if length else 0
    needed = len(state_payload) + buffer_bytes + len(chunks) * (64 << 10) + _HEADROOM  # 64 KiB: torch.save's own
    free = shutil.disk_usage(root).free
    previous = _current(root)
    keeps = f"; the previous checkpoint ({previous}) is kept" if previous else ""
    if free < needed:
        raise CheckpointError(
            f"not enough free space in {root} for a checkpoint ({needed / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free){keeps}."
        )
    existing = [int(p.name.split("-")[1]) for p in root.glob("ckpt-*") if p.name.split("-")[1].isdigit()]
    name = f"ckpt-{max(existing, default=0) + 1:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    files = {}

    def write(filename: str, data: bytes) -> None:
        _write(tmp / filename, data)
        files[filename] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    try:
        _remove_stale(root, keep=previous)
        tmp.mkdir()
        write("state.pt", state_payload)
        buffer_files = []  # [file, rows]
        for index, (start, stop) in enumerate(chunks):
            buffer_files.append([f"buffer-{index:06d}.pt", stop - start])
            write(buffer_files[-1][0], _serialise(replay_buffer.storage[start:stop].exclude("index").clone().to_dict()))
        cursor = int(replay_buffer.writer._cursor)
        manifest = {
            "format": FORMAT,
            "state": state,
            "identity": identity,
            "buffer": {"length": length, "cursor": cursor},
            "buffer_files": buffer_files,
            "files": files,
        }
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        _write(tmp / MANIFEST, manifest_bytes)
        _fsync_dir(tmp)
        tmp.rename(final)
        pointer_tmp = root / f".{POINTER}.tmp"
        _write(pointer_tmp, f"{name} {hashlib.sha256(manifest_bytes).hexdigest()}\n".encode())
        pointer_tmp.replace(root / POINTER)
        _fsync_dir(root)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if _current(root) != name:
            shutil.rmtree(final, ignore_errors=True)
        raise CheckpointError(f"could not write a checkpoint in {root}: {error.strerror or error}{keeps}.") from None
    _remove_stale(root, keep=name)
    return final


def _remove_stale(root: Path, keep: str | None) -> None:
    """Remove every checkpoint directory but ``keep``, and partial ones left by a killed run."""
    for path in root.iterdir():
        if path.is_dir() and path.name != keep and (path.name.startswith("ckpt-") or path.name.startswith(".tmp-")):
            shutil.rmtree(path, ignore_errors=True)


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
        # Each visible GPU's generator (the SVGD draws of a run updating on a GPU); none on a CPU-only machine.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = rng.get("cuda", [])  # absent from checkpoints written before it was saved
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def read_manifest(root: Path) -> tuple[Path, dict]:
    """The current checkpoint's directory and its manifest, with every file's size and checksum verified."""
    try:
        name, digest = (root / POINTER).read_text().split()
        directory = root / name
        manifest_bytes = (directory / MANIFEST).read_bytes()
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{root / POINTER} does not name a readable checkpoint ({error}).") from None
    if hashlib.sha256(manifest_bytes).hexdigest() != digest:
        raise CheckpointError(f"{directory / MANIFEST} does not match the checksum recorded in {POINTER}.")
    try:
        manifest = json.loads(manifest_bytes)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{directory / MANIFEST} is not a checkpoint manifest ({error}).") from None
    if manifest.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{directory} has format {manifest.get('format')!r}; this version reads 1 to {FORMAT}.")
    for filename, expected in files.items():
        path = directory / filename
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing.")
        data = path.read_bytes()
        if len(data) != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {path} has {len(data)} bytes; {expected['bytes']} were written.")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted (its checksum differs from the manifest's).")
    return directory, manifest


def identity_difference(saved: dict, current: dict) -> str | None:
    """One line naming the first setting in which two run identities differ, or ``None``."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"the checkpoint has {key}={saved.get(key)!r}, this run {key}={current.get(key)!r}"
    return None


def load_weights(root: Path, loss) -> dict:
    """Load only the loss's modules from the current (verified) checkpoint under ``root``; returns its counters."""
    directory, manifest = read_manifest(root)
    loss.load_state_dict(torch.load(directory / "state.pt", weights_only=True, map_location="cpu")["loss"])
    return manifest["state"]


def load(root: Path, *, loss, optimizers, replay_buffer, identity: dict) -> dict:
    """Verify the current checkpoint under ``root`` against this run, then load it; returns its ``state``.

    Checked before anything is loaded: every file's size and checksum, the run identity, and the
    buffer's length and write cursor against ``state["stored"]`` (transitions written so far).
    """
    directory, manifest = read_manifest(root)
    difference = identity_difference(manifest.get("identity", {}), identity)
    if difference:
        raise CheckpointError(f"cannot resume from {directory}: {difference}.")
    state, buffer = manifest["state"], manifest["buffer"]
    capacity = replay_buffer.storage.max_size
    stored = state["stored"]
    expected = {"length": min(stored, capacity), "cursor": stored % capacity}
    if buffer != expected:
        raise CheckpointError(
            f"cannot resume from {directory}: its buffer (length {buffer['length']}, cursor {buffer['cursor']}) "
            f"does not match its {stored} stored transitions (length {expected['length']}, "
            f"cursor {expected['cursor']})."
        )
    # Format 1 kept the whole buffer in buffer.pt; format 2 one file per chunk, with its row count.
    buffer_files = manifest.get("buffer_files", [["buffer.pt", buffer["length"]]] if buffer["length"] else [])
    if sum(rows for _, rows in buffer_files) != buffer["length"]:
        raise CheckpointError(
            f"cannot resume from {directory}: its buffer files hold {sum(rows for _, rows in buffer_files)} rows, "
            f"its buffer {buffer['length']}."
        )
    try:
        saved = torch.load(directory / "state.pt", weights_only=True, map_location="cpu")
        loss.load_state_dict(saved["loss"])
        if len(saved["optimizers"]) != len(optimizers):
            raise ValueError(f"{len(saved['optimizers'])} optimisers saved, {len(optimizers)} in this run")
        for opt, opt_state in zip(optimizers, saved["optimizers"]):
            opt.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        detail = " ".join(str(error).split())[:300] or type(error).__name__  # one line, e.g. the first mismatch
        raise CheckpointError(f"cannot resume from {directory}: its weights do not fit this run ({detail}).") from None
    for filename, rows in buffer_files:  # in storage order: extending an empty buffer refills rows 0, 1, ...
        chunk = torch.load(directory / filename, weights_only=True, map_location="cpu")
        replay_buffer.extend(TensorDict(chunk, batch_size=[rows]))
    replay_buffer.writer._cursor = buffer["cursor"]
    _set_rng_state(saved["rng"])
    return state
