"""Fault injection: kills during checkpointing, full or read-only disks, corrupted checkpoints, NaN
environments, stop requests mid-batch and bad options. Each fault must end in one line, never a
traceback, and never cost more than the transitions since the last checkpoint."""

import errno
import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.data import Bounded, LazyTensorStorage, TensorDictReplayBuffer
from torchrl.objectives import SoftUpdate, group_optimizers

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "sota-implementations"
sys.path.insert(0, str(SCRIPTS))
import checkpoint  # noqa: E402
import harness  # noqa: E402
import sweep  # noqa: E402
import test_loss  # noqa: E402
import test_sql  # noqa: E402
from checkpoint_helpers import CAPACITY, IDENTITY, WIDTH, fresh, load_and_verify, save, write_rows  # noqa: E402

from torchrl_s2ac import AmortizedSampler, NonFiniteError, SoftQCritic, SQLLoss  # noqa: E402

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path[:0] = [{tests!r}]
    import checkpoint_helpers as t
    root = Path(sys.argv[1])
    net, optimizer, buffer = t.fresh()
    state = {{"stored": 0}}
    if (root / "latest").exists():
        state = t.checkpoint.load(root, loss=net, optimizers=[optimizer], replay_buffer=buffer, identity=t.IDENTITY)
    print("ready", flush=True)
    while True:
        state = t.write_rows(buffer, net, state["stored"], t.ROWS_PER_SAVE)
        t.save(root, net, optimizer, buffer, state)
    """
).format(tests=str(ROOT / "tests"))


def test_sigkill_at_random_moments_while_checkpointing_never_loses_the_checkpoint(tmp_path):
    """A process that does nothing but checkpoint a wrapping buffer is SIGKILLed and resumed, again and again."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    rng = random.Random(0)
    progress = []
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
        while child.stdout.readline() not in (b"ready\n", b""):  # resumed from the last checkpoint
            pass
        assert child.poll() is None
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        progress.append(load_and_verify(root))
    assert progress == sorted(progress) and progress[-1] > 2 * CAPACITY  # moving forward, wrapped many times


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    net, optimizer, buffer = fresh()
    save(root, net, optimizer, buffer, write_rows(buffer, net, 0, 30))
    state = write_rows(buffer, net, 30, 30)
    written = []

    def disk_full_on_second_file(path, payload):
        written.append(path)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        path.write_bytes(payload)

    monkeypatch.setattr(checkpoint, "_write", disk_full_on_second_file)
    with pytest.raises(checkpoint.CheckpointError) as error:
        save(root, net, optimizer, buffer, state)
    message = str(error.value)
    assert "No space left on device" in message and "ckpt-000001" in message and "\n" not in message
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-000001", "latest"]  # the partial one is gone
    assert load_and_verify(root) == 30


def test_checkpoint_size_follows_the_data_not_the_capacity(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    net, optimizer, small = fresh()
    write_rows(small, net, 0, 5)
    big = TensorDictReplayBuffer(storage=LazyTensorStorage(100 * CAPACITY), batch_size=4)
    write_rows(big, net, 0, 5)
    sizes = []
    for buffer in (small, big):
        directory = save(root, net, optimizer, buffer, {"frames": 5, "stored": 5})
        sizes.append((directory / "buffer-000000.pt").stat().st_size)
    assert sizes[0] == sizes[1] < 5 * WIDTH * 4 + 10_000  # 5 rows, whatever the capacity


def test_buffer_is_saved_and_loaded_a_chunk_at_a_time(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    net, optimizer, buffer = fresh()
    write_rows(buffer, net, 0, CAPACITY - 4)
    state = write_rows(buffer, net, CAPACITY - 4, 13)  # wrapped: the cursor at 9
    monkeypatch.setattr(checkpoint, "BUFFER_CHUNK_BYTES", 10 * WIDTH * 4)  # 10 rows per chunk
    serialised = []
    serialise = checkpoint._serialise
    monkeypatch.setattr(checkpoint, "_serialise", lambda obj: serialised.append(serialise(obj)) or serialised[-1])
    directory = save(root, net, optimizer, buffer, state)
    chunks = sorted(path.name for path in directory.glob("buffer-*.pt"))
    assert len(chunks) == 7  # 64 rows, 10 per file
    assert max(map(len, serialised)) < 10 * WIDTH * 4 + 10_000  # never the whole buffer at once
    assert load_and_verify(root) == CAPACITY + 9


def test_a_checkpoint_with_the_whole_buffer_in_one_file_still_loads(tmp_path):
    """Format 1 (before the buffer was chunked): one buffer.pt, no buffer_files in the manifest."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    net, optimizer, buffer = fresh()
    directory = save(root, net, optimizer, buffer, write_rows(buffer, net, 0, 30))
    manifest = json.loads((directory / "manifest.json").read_text())
    rows = buffer.storage[:30].exclude("index").clone().to_dict()
    for name, _ in manifest.pop("buffer_files"):
        manifest["files"].pop(name)
        (directory / name).unlink()
    torch.save(rows, directory / "buffer.pt")
    data = (directory / "buffer.pt").read_bytes()
    manifest["files"]["buffer.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["format"] = 1
    manifest_bytes = json.dumps(manifest).encode()
    (directory / "manifest.json").write_bytes(manifest_bytes)
    (root / "latest").write_text(f"{directory.name} {hashlib.sha256(manifest_bytes).hexdigest()}\n")
    assert load_and_verify(root) == 30


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs (skipped where mounting is not allowed); yields its mount point."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)]).returncode:
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs); the injected write error test covers the logic")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_is_one_line_and_the_previous_checkpoint_survives(tmpfs):
    net, optimizer, buffer = fresh()
    save(tmpfs, net, optimizer, buffer, write_rows(buffer, net, 0, 10))  # 10 rows: 160 KiB
    state = write_rows(buffer, net, 10, 40)  # 50 rows: 800 KiB
    (tmpfs / "ballast").write_bytes(b"\0" * (1 << 20))
    with pytest.raises(checkpoint.CheckpointError, match=r"^not enough free space in .* the previous checkpoint"):
        save(tmpfs, net, optimizer, buffer, state)
    assert load_and_verify(tmpfs) == 10


def test_read_only_directory_is_refused(tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(checkpoint.CheckpointError, match="is not writable: Read-only file system"):
        checkpoint.check_writable(tmpfs / "checkpoints")


def corrupt_flip(directory):
    data = bytearray((directory / "buffer-000000.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (directory / "buffer-000000.pt").write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": (lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:100]), "has 100 bytes"),
    "empty": (lambda d: (d / "state.pt").write_bytes(b""), "has 0 bytes"),
    "random": (lambda d: (d / "state.pt").write_bytes(os.urandom((d / "state.pt").stat().st_size)), "corrupted"),
    "bit-flip": (corrupt_flip, "buffer-000000.pt is corrupted"),
    "missing": (lambda d: (d / "buffer-000000.pt").unlink(), "buffer-000000.pt is missing"),
    "manifest": (lambda d: (d / "manifest.json").write_text("{}"), "does not match the checksum"),
    "pointer": (lambda d: (d.parent / "latest").write_bytes(b"\xff\x00"), "does not name a readable checkpoint"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupted_checkpoint_is_refused_in_one_line_and_nothing_loads(tmp_path, corruption):
    root = tmp_path / "checkpoints"
    root.mkdir()
    net, optimizer, buffer = fresh()
    directory = save(root, net, optimizer, buffer, write_rows(buffer, net, 0, 30))
    damage, message = CORRUPTIONS[corruption]
    damage(directory)
    net, optimizer, buffer = fresh()
    before = net.weight.clone()
    with pytest.raises(checkpoint.CheckpointError, match=message) as error:
        checkpoint.load(root, loss=net, optimizers=[optimizer], replay_buffer=buffer, identity=IDENTITY)
    assert "\n" not in str(error.value)
    assert torch.equal(net.weight, before) and len(buffer) == 0


def test_counters_buffer_and_identity_mismatches_are_named(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    net, optimizer, buffer = fresh()
    write_rows(buffer, net, 0, 30)
    save(root, net, optimizer, buffer, {"frames": 40, "stored": 40})  # counters ahead of the buffer
    with pytest.raises(checkpoint.CheckpointError, match=r"buffer \(length 30, cursor 30\) does not match its 40"):
        checkpoint.load(root, loss=net, optimizers=[optimizer], replay_buffer=fresh()[2], identity=IDENTITY)
    save(root, net, optimizer, buffer, {"frames": 30, "stored": 30})
    other = {**IDENTITY, "replay_buffer.size": 128}
    with pytest.raises(checkpoint.CheckpointError, match="the checkpoint has replay_buffer.size=64, this run"):
        checkpoint.load(root, loss=net, optimizers=[optimizer], replay_buffer=fresh()[2], identity=other)
    with pytest.raises(checkpoint.CheckpointError, match="its weights do not fit this run"):
        checkpoint.load(
            root, loss=torch.nn.Linear(4, 5), optimizers=[optimizer], replay_buffer=fresh()[2], identity=IDENTITY
        )


def test_a_copied_run_resumes_from_its_own_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    net, optimizer, buffer = fresh()
    save(run / "checkpoints", net, optimizer, buffer, write_rows(buffer, net, 0, 30))
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    save(run / "checkpoints", net, optimizer, buffer, write_rows(buffer, net, 30, 30))  # the original moves on
    root, run_dir = checkpoint.locate(copy, "checkpoints")
    assert (root, run_dir) == (copy / "checkpoints", copy)
    assert checkpoint.locate(copy / "checkpoints" / "latest", "checkpoints") == (root, run_dir)
    assert load_and_verify(root) == 30


# ---------------------------------------------------------------------------
# Non-finite data
# ---------------------------------------------------------------------------


def transitions(n=6):
    flag = torch.zeros(n, 1, dtype=torch.uint8)
    return TensorDict(
        {
            "observation": torch.randn(n, 2),
            "action": torch.randn(n, 2),
            harness.NON_FINITE: flag.clone(),
            "next": {"observation": torch.randn(n, 2), "reward": torch.randn(n, 1), harness.NON_FINITE: flag.clone()},
        },
        [n],
    )


@pytest.mark.parametrize(
    "key,name",
    [("observation", "observation"), ("action", "action"), (("next", "observation"), "next observation")],
)
def test_collected_batch_check_names_the_key_or_skips_the_row(key, name):
    data = transitions()
    data.get(key)[3, 1] = float("nan")
    with pytest.raises(harness.NonFiniteError, match=f"non-finite {name} in the collected batch, frames 40 to 46"):
        harness.finite_transitions(data, "raise", frames=40)
    data.get(("next", harness.NON_FINITE))[0] = 2  # flagged by the env guard: its reward
    data.get(harness.NON_FINITE)[5] = 1  # its observation (from a reset)
    kept, skipped = harness.finite_transitions(data, "skip", frames=40)
    assert skipped == 3 and torch.equal(kept["observation"], data["observation"][[1, 2, 4]])


@pytest.mark.parametrize("event,message", [("step", "next observation"), ("reset", "observation")])
def test_env_guard_flags_for_the_training_loop_or_raises_in_evaluation(monkeypatch, tmp_path, event, message):
    """Collector envs (maybe in worker processes) flag non-finite data; the loop raises or skips; evaluation raises."""
    from torchrl_s2ac.envs.multigoal import MultiGoalEnv

    method = "_step" if event == "step" else "_reset"
    original, calls = getattr(MultiGoalEnv, method), []

    def faulty(self, tensordict, **kwargs):
        out = original(self, tensordict, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.set("observation", out.get("observation") * float("nan"))
        return out

    monkeypatch.setattr(MultiGoalEnv, method, faulty)
    cfg = config("s2ac", ["env=multigoal", "env.max_episode_steps=2"])
    rollout = harness.make_env(cfg, 1).rollout(6, break_when_any_done=False)[0]
    flags = rollout.get(harness.NON_FINITE if event == "reset" else ("next", harness.NON_FINITE)).squeeze(-1)
    assert flags.tolist().count(1) == 1 and torch.isfinite(rollout.get(("next", "observation"))).all()
    with pytest.raises(harness.NonFiniteError, match=f"non-finite {message} returned by the environment"):
        harness.finite_transitions(rollout, "raise", frames=0)
    assert harness.finite_transitions(rollout, "skip", frames=0)[1] == 1
    calls.clear()
    with pytest.raises(harness.NonFiniteError, match=f"non-finite {message} returned by an environment {event}"):
        harness.make_env(cfg, 1, evaluation=True).rollout(6, break_when_any_done=False)


def test_training_and_evaluation_envs_say_they_are_on_the_cpu():
    # A rollout moves actions from a policy on another device (a GPU) back only to an env with a device set;
    # with none, the actions stay on the GPU and the CPU env's transforms fail (seen on an H200).
    cfg = config("s2ac", ["env=multigoal"])
    for evaluation in (False, True):
        assert harness.make_env(cfg, 2, evaluation=evaluation).device == torch.device("cpu")


@pytest.mark.parametrize("loss_name", ["S2ACLoss", "SQLLoss"])
@pytest.mark.parametrize(
    "key,name",
    [
        ("observation", "observation"),
        ("action", "action"),
        (("next", "observation"), "next observation"),
        (("next", "reward"), "reward"),
    ],
)
def test_losses_name_a_non_finite_input_before_any_network_sees_it(loss_name, key, name):
    tests = test_loss if loss_name == "S2ACLoss" else test_sql
    loss = tests.build()[0]
    data = tests.batch()
    data.get(key)[1].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=f"{loss_name}: non-finite values in the {name} of the input batch"):
        loss(data)


CONFIG_DIR = str(SCRIPTS / "config")
TINY = [
    "env=multigoal",
    "env.num_envs=2",
    "collector.frames_per_batch=20",
    "collector.init_random_frames=20",
    "collector.learning_starts=20",
    "optim.batch_size=16",
    "logger.backend=csv",
    "logger.eval_episodes=1",
    "logger.eval_every_frames=100000",
    "logger.log_every_frames=20",
    "checkpoint.every_frames=20",
    "network.critic_cells=[16,16]",
    "replay_buffer.size=60",
    "num_threads=1",
]
SCRIPT_TINY = {
    "s2ac": ["network.init_cells=[16]", "s2ac.num_particles=4", "s2ac.num_steps=1"],
    "sac": ["network.actor_cells=[16]"],
    "sql": ["network.sampler_cells=[16]", "sql.num_particles=4", "sql.num_value_samples=4"],
}

# Loaded at start-up of the training subprocess and its workers (sitecustomize): once the program imports
# MultiGoalEnv, it returns a NaN in FAULT_KEY at every FAULT_EVERY-th environment step (of each process).
# Patching on import, not importing torch here: every Python process started (resource tracker,
# spawned workers) runs this file.
SITECUSTOMIZE = """
import importlib.abc
import importlib.util
import os
import sys


def patch(env_class):
    original, calls = env_class._step, [0]

    def _step(self, tensordict):
        out = original(self, tensordict)
        calls[0] += 1
        if calls[0] % int(os.environ["FAULT_EVERY"]) == 0:
            out.set(os.environ["FAULT_KEY"], out.get(os.environ["FAULT_KEY"]) * float("nan"))
        return out

    env_class._step = _step


class PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchrl_s2ac.envs.multigoal":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module.MultiGoalEnv)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("FAULT_KEY"):
    sys.meta_path.insert(0, PatchOnImport())
"""


def launch(script, out, *overrides, fault=None, popen=False, timeout=240):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if fault:
        (out.parent / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env.update(PYTHONPATH=str(out.parent), FAULT_KEY=fault[0], FAULT_EVERY=str(fault[1]))
    command = [sys.executable, str(SCRIPTS / f"{script}.py"), f"hydra.run.dir={out}", *TINY, *SCRIPT_TINY[script]]
    command += list(overrides)
    if popen:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def last_line(result) -> str:
    assert result.returncode not in (0, None), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "script,backend",
    [("s2ac", "direct"), ("sac", "direct"), ("sql", "direct"), ("s2ac", "process")],
    ids=["s2ac", "sac", "sql", "s2ac-process-workers"],
)
def test_nan_observation_stops_every_script_naming_key_and_source(tmp_path, script, backend):
    overrides = ["collector.total_frames=200", f"collector.backend={backend}", "collector.num_workers=2"]
    result = launch(script, tmp_path / "run", *overrides, fault=("observation", 7))
    assert last_line(result).startswith(
        "Non-finite data: non-finite next observation returned by the environment (collected batch, frames 0 to 20)"
    )


def test_nan_reward_stops_before_it_is_stored(tmp_path):
    result = launch("s2ac", tmp_path / "run", "collector.total_frames=200", fault=("reward", 10))
    assert last_line(result).startswith("Non-finite data: non-finite reward returned by the environment")
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()  # nothing was checkpointed with it


def test_skip_mode_drops_and_counts_bad_transitions(tmp_path):
    out = tmp_path / "run"
    result = launch("s2ac", out, "collector.total_frames=200", "collector.non_finite=skip", fault=("observation", 9))
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.read_manifest(out / "checkpoints")[1]["state"]
    assert state["frames"] == 200 and state["skipped"] > 0 and state["stored"] == 200 - state["skipped"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/skipped_transitions", 0) for r in records) == state["skipped"]
    assert load_script_checkpoint(out)  # the buffer agrees with the counters
    directory = checkpoint.read_manifest(out / "checkpoints")[0]
    assert torch.load(directory / "state.pt", weights_only=True)["optimizers"][0]["state"]  # Adam's moments


def load_script_checkpoint(out, root=None) -> bool:
    """Whether the run's checkpoint holds as many buffer rows, and its cursor where, its counters say."""
    manifest = checkpoint.read_manifest(root or out / "checkpoints")[1]
    stored = manifest["state"]["stored"]
    return manifest["buffer"] == {"length": min(stored, 60), "cursor": stored % 60}


# ---------------------------------------------------------------------------
# Kills, stop requests and resume of the training scripts
# ---------------------------------------------------------------------------


def frames_logged(out) -> list[int]:
    return [json.loads(line)["frames"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_continues_in_the_same_directory(tmp_path):
    out = tmp_path / "run"
    proc = launch("s2ac", out, "collector.total_frames=100000", popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "latest").exists():
        time.sleep(0.2)
    time.sleep(random.Random(1).uniform(0.5, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    frames = checkpoint.read_manifest(out / "checkpoints")[1]["state"]["frames"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run(  # no hydra.run.dir: the resumed run must find its own directory
        [sys.executable, str(SCRIPTS / "s2ac.py"), *TINY, *SCRIPT_TINY["s2ac"]]
        + [f"collector.total_frames={frames + 40}", f"resume={out}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(elsewhere.iterdir()) == []
    state = checkpoint.read_manifest(out / "checkpoints")[1]["state"]
    assert state["frames"] == frames + 40 and load_script_checkpoint(out)
    logged = frames_logged(out)
    assert logged == sorted(logged) and logged[-1] == frames + 40  # the killed run's later records were dropped
    assert len([p for p in out.iterdir() if p.name.startswith("S2AC_")]) == 1  # one logger run
    # Another algorithm or network size cannot resume this run.
    line = last_line(launch("sac", out, f"resume={out}", "collector.total_frames=400"))
    assert line.startswith("Checkpoint error: cannot resume from") and "algorithm='s2ac'" in line
    line = last_line(launch("s2ac", out, f"resume={out}", "collector.total_frames=400", "network.critic_cells=[8]"))
    assert "the checkpoint has network.critic_cells=[16, 16], this run network.critic_cells=[8]" in line


def test_resume_auto_continues_a_killed_run_then_skips_it_once_finished(tmp_path):
    """The same command, rerun (a restarted multirun), continues the run from its checkpoint, then skips it."""
    out, total = tmp_path / "run", 240
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"frames": 999, "eval/return": 1.0}\n')  # records whose checkpoint is gone
    command = ("resume=auto", f"collector.total_frames={total}", "checkpoint.every_frames=20")
    proc = launch("s2ac", out, *command, popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "latest").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = checkpoint.read_manifest(out / "checkpoints")[1]["state"]["frames"]
    assert 999 not in frames_logged(out)  # the records without a checkpoint were set aside, not mixed in
    assert "999" in (out / "metrics.jsonl.orphan-0").read_text()
    result = launch("s2ac", out, *command)
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.read_manifest(out / "checkpoints")[1]["state"]
    assert killed_at < total and state["frames"] == total and load_script_checkpoint(out)
    logged = frames_logged(out)
    assert logged == sorted(logged) and logged[-1] == total
    kept = ("metrics.jsonl", ".hydra/config.yaml", ".hydra/overrides.yaml")
    before = {name: (out / name).read_text() for name in kept}
    result = launch("s2ac", out, "resume=auto", f"collector.total_frames={total}", "num_threads=2")
    assert result.returncode == 0 and "already finished (240 frames): skipped" in result.stderr, result.stderr[-3000:]
    # Hydra rewrote .hydra/ for each command; the directory keeps the training command's files.
    assert {name: (out / name).read_text() for name in before} == before
    line = last_line(launch("s2ac", out, "resume=auto", f"collector.total_frames={total}", "seed=7"))
    assert line.startswith("Invalid configuration: resume=auto:") and "(seed=0 there, 7 here)" in line
    line = last_line(launch("s2ac", out, "resume=auto", f"collector.total_frames={total}", "s2ac.kernel_rule=mean"))
    assert "(s2ac.kernel_rule='median' there, 'mean' here)" in line
    assert {name: (out / name).read_text() for name in before} == before
    shutil.rmtree(out / "checkpoints")  # a finished run whose budget is raised needs its checkpoint
    line = last_line(launch("s2ac", out, "resume=auto", f"collector.total_frames={total + 40}"))
    assert line.startswith("Checkpoint error: resume=auto:") and "finished at 240 frames" in line
    assert {name: (out / name).read_text() for name in before} == before


def test_sigterm_mid_batch_stops_between_updates_with_a_consistent_checkpoint(tmp_path):
    out = tmp_path / "run"
    # 20 frames x utd 100 = 2000 updates in the second batch: far longer than the stop may take.
    every_batch = ("collector.learning_starts=40", "logger.eval_every_frames=20")  # an evaluation due at 40 frames
    proc = launch("s2ac", out, "collector.total_frames=100000", "optim.utd_ratio=100", *every_batch, popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "latest").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # inside the second batch's updates
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Interrupted at 40 frames" in stderr, stderr[-3000:]
    assert time.time() - sent < 10
    state = checkpoint.read_manifest(out / "checkpoints")[1]["state"]
    assert state["frames"] == 40 and 0 < state["updates"] < 2000 and load_script_checkpoint(out)
    assert state["updates"] + state["update_credit"] == 2000  # the updates it did not run are owed on resume
    # The stop skipped the evaluation due at 40 frames; the resumed run runs it there, not a batch later.
    resumed = launch("s2ac", out, "collector.total_frames=60", f"resume={out}", "optim.utd_ratio=0.5", *every_batch)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["frames"] for record in records if "eval/return" in record] == [20, 40, 60, 60]  # 60: final too
    trained_by = json.loads((out / "run.json").read_text())["sessions"]  # the resume is on record
    assert [session["frames"] for session in trained_by] == [0, 40]
    assert all(session["code"] == harness.code_version() for session in trained_by)  # this checkout


def sweep_command(out, seeds, *overrides) -> list[str]:
    """A hydra multirun over ``seeds`` on the local joblib launcher, 2 jobs at a time, a subdirectory per seed."""
    sweep_dir = [f"hydra.sweep.dir={out}", "hydra.sweep.subdir=seed${seed}", "hydra.launcher.n_jobs=2"]
    tiny = [*TINY, *SCRIPT_TINY["s2ac"], *overrides]
    return [sys.executable, str(SCRIPTS / "s2ac.py"), "-m", *sweep_dir, f"seed={seeds}", *tiny]


def test_sigterm_to_a_local_multirun_saves_every_running_job_and_starts_no_queued_one(tmp_path):
    """SIGTERM to the sweep's main process only: it passes the stop to its joblib workers, each saves
    between two updates, the queued run never starts, and the same command with resume=auto continues."""
    out = tmp_path / "sweep"
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    # no periodic checkpoint: the stop writes the only one; utd 100 makes the second batch's updates long
    stopped_here = ("checkpoint.every_frames=100000", "collector.learning_starts=40", "optim.utd_ratio=100")
    proc = subprocess.Popen(
        sweep_command(out, "0,1,2", "collector.total_frames=100000", *stopped_here),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    running = [out / "seed0", out / "seed1"]
    deadline = time.time() + 180
    while time.time() < deadline and not all((run / "metrics.jsonl").exists() for run in running):
        time.sleep(0.2)
    time.sleep(1.0)  # inside the second batch's updates
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("Sweep stopped; its runs saved."), stderr[-3000:]
    for run in running:
        assert f"Interrupted at 40 frames; resume with resume={run}" in stderr, stderr[-3000:]
        state = checkpoint.read_manifest(run / "checkpoints")[1]["state"]
        assert state["frames"] == 40 and 0 < state["updates"] < 2000 and load_script_checkpoint(run)
    assert f"{out / 'seed2'} not started: its sweep was stopped" in stderr
    assert not (out / "seed2" / "metrics.jsonl").exists()
    # The same command with resume=auto (here with the budget the stopped runs reached) ends them normally.
    result = subprocess.run(
        sweep_command(out, "0,1", "collector.total_frames=40", "resume=auto", *stopped_here),
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0 and not (out / sweep.MARKER_NAME).exists(), result.stderr[-3000:]
    for run in running:
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["final"] == 1


def test_disk_full_mid_run_ends_in_one_line_and_the_run_resumes(tmpfs):
    out = tmpfs.parent / "run"
    proc = launch("s2ac", out, "collector.total_frames=100000", f"checkpoint.dir={tmpfs}", popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmpfs / "latest").exists():
        time.sleep(0.1)
    (tmpfs / "ballast").write_bytes(b"\0" * (shutil.disk_usage(tmpfs).free - 50_000))
    _, stderr = proc.communicate(timeout=120)
    line = stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and line.startswith("Checkpoint error: not enough free space in"), stderr[-3000:]
    assert "the previous checkpoint (ckpt-" in line and "is kept" in line
    frames = checkpoint.read_manifest(tmpfs)[1]["state"]["frames"]
    (tmpfs / "ballast").unlink()
    result = launch("s2ac", out, f"resume={out}", f"checkpoint.dir={tmpfs}", f"collector.total_frames={frames + 40}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint.read_manifest(tmpfs)[1]["state"]["frames"] == frames + 40 and load_script_checkpoint(out, tmpfs)


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def config(script: str, overrides: list[str]):
    """The script's configuration with ``overrides``, composed as hydra would."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=script, overrides=overrides)


def test_max_grad_norm_clips_each_network_on_its_own():
    critic, actor = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)

    class Loss(torch.nn.Module):
        def forward(self, batch):  # the critic's gradient 1000x the actor's
            x = batch["x"]
            return TensorDict({"loss_qvalue": 1000 * critic(x).sum(), "loss_actor": actor(x).sum()}, [])

    optimizers = {"critic": torch.optim.SGD(critic.parameters()), "actor": torch.optim.SGD(actor.parameters())}
    optimizer = group_optimizers(*optimizers.values())
    clipped = {}

    def step():  # what the optimiser would apply
        for name, net in (("critic", critic), ("actor", actor)):
            clipped[name] = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters()]))

    optimizer.step = step
    agent = harness.Agent(loss=Loss(), policy=actor, optimizers=optimizers)
    update = harness.make_update(
        config("sac", ["optim.max_grad_norm=0.5"]), agent, optimizer, SimpleNamespace(step=lambda: None)
    )
    out = update(TensorDict({"x": torch.ones(4, 3)}, [4]))
    assert out["grad_norm_critic"] > 1000 and out["grad_norm_actor"] > 0.5  # both above the bound before
    assert clipped["critic"].item() == pytest.approx(0.5) and clipped["actor"].item() == pytest.approx(0.5)


def test_a_resumed_run_seeds_its_environments_anew():
    assert harness.collector_seed(3, 0) == 3  # a fresh run: the configured seed
    resumed = {harness.collector_seed(seed, frames) for seed in (0, 1, 2) for frames in (2500, 5000)}
    assert len(resumed) == 6 and resumed.isdisjoint({0, 1, 2})
    assert harness.collector_seed(1, 2500) == harness.collector_seed(1, 2500)  # reproducible


def test_evaluation_is_seeded_by_run_and_frames_and_draws_nothing_from_training():
    cfg = config("sac", ["env=hopper", "env.max_episode_steps=40", "logger.eval_episodes=2", "network.device=cpu"])
    eval_env = harness.make_eval_env(cfg, None)
    # Uniform random actions from torch's generator, whatever the exploration type: with the same seeds the
    # deterministic and stochastic evaluations see the same starts and draws, hence the same returns.
    policy = TensorDictModule(
        lambda observation: torch.rand(*observation.shape[:-1], 3) * 2 - 1, in_keys=["observation"], out_keys=["action"]
    )
    torch.manual_seed(0)
    training_stream = torch.get_rng_state()
    first = harness.evaluate(cfg, eval_env, policy, frames=5000)
    assert torch.equal(torch.get_rng_state(), training_stream)  # evaluating drew nothing from it
    assert first["eval/return"] == first["eval/return_stochastic"]
    assert harness.evaluate(cfg, eval_env, policy, frames=5000) == first  # a repeated evaluation repeats
    assert harness.evaluate(cfg, eval_env, policy, frames=10000)["eval/return"] != first["eval/return"]
    assert harness.evaluation_seed(0, 5000) != harness.collector_seed(0, 5000)
    assert harness.evaluation_seed(0, 5000, final=True) != harness.evaluation_seed(0, 5000)  # not a repeat
    eval_env.close()


def test_an_evaluation_a_stop_skipped_is_owed_on_resume():
    def owed(frames, next_eval, total=100):
        return harness.evaluation_owed({"frames": frames, "next_eval": next_eval}, total)

    assert not owed(0, 0)  # a fresh run evaluates after its first batch
    assert owed(20, 0)  # stopped in the first batch: its evaluation was skipped
    assert owed(40, 20) and owed(40, 40)  # stopped in a later batch an evaluation was due in
    assert not owed(40, 60)  # saved after the evaluation (a periodic checkpoint)
    assert not owed(100, 100)  # finished: the final evaluation follows


def test_hard_target_copy_after_every_nth_update_in_phase_on_resume():
    sampler = AmortizedSampler(Bounded(-1.0, 1.0, (2,)), 3)
    loss = SQLLoss(sampler, SoftQCritic(3, 2, num_cells=(8,), num_qvalue_nets=1))

    def copies(updater, updates: int) -> list[int]:
        """The updates (1-based) after which the target equals the critic, the critic moved before each."""
        copied = []
        for update in range(1, updates + 1):
            with torch.no_grad():
                loss.qvalue_network_params.apply(lambda p: p.add_(1.0))
            updater.step()
            same = (loss.qvalue_network_params == loss.target_qvalue_network_params).all()
            copied += [update] if same else []
        return copied

    cfg = config("sql", ["optim.target_update_interval=3"])
    assert copies(harness.make_target_updater(cfg, loss), 7) == [3, 6]
    resumed = harness.make_target_updater(cfg, loss)
    harness.phase_target_updater(cfg, resumed, updates=4)
    assert copies(resumed, 5) == [2, 5]  # updates 6 and 9 of the run
    assert isinstance(harness.make_target_updater(config("sql", []), loss), SoftUpdate)


@pytest.mark.parametrize("script", ["sac", "sql"])
def test_a_resumed_run_keeps_its_target_critic(tmp_path, script):
    """With a copy every 10^6 updates the target stays the initial critic for the whole run, resumed or not.
    TorchRL's updaters copy the critic into its target when built: built after the load, one replaced it."""
    out, hold = tmp_path / "run", ("optim.target_update_interval=1000000",)

    def saved_loss() -> dict:
        directory = checkpoint.read_manifest(out / "checkpoints")[0]
        return torch.load(directory / "state.pt", weights_only=True)["loss"]

    assert launch(script, out, "collector.total_frames=60", *hold).returncode == 0
    before = saved_loss()
    targets = [key for key in before if key.startswith("target_qvalue_network_params")]
    online = [key.removeprefix("target_") for key in targets]
    assert targets and any(not torch.equal(before[t], before[o]) for t, o in zip(targets, online))  # it trained
    resumed = launch(script, out, "collector.total_frames=100", f"resume={out}", *hold)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = saved_loss()
    assert any(not torch.equal(after[key], before[key]) for key in online)  # the resumed run trained too
    for key in targets:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def test_resume_auto_compares_what_the_run_was_trained_with_not_options_it_predates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained = config("s2ac", ["resume=auto", "s2ac.kernel_rule=mean"])
    recorded = OmegaConf.to_container(trained, resolve=False)
    del recorded["s2ac"]["init_std_min"]  # an option added after this run was trained
    recorded["checkpoint"]["every_frames"] = 7  # how it was checkpointed may differ
    (tmp_path / "run.json").write_text(json.dumps({"hydra_files": {"config.yaml": OmegaConf.to_yaml(recorded)}}))
    harness.check_same_run(config("s2ac", ["resume=auto", "s2ac.kernel_rule=mean", "num_threads=1"]))
    with pytest.raises(harness.ConfigError, match=r"\(s2ac.kernel_rule='mean' there, 'median' here\)"):
        harness.check_same_run(config("s2ac", ["resume=auto"]))
    harness.check_same_run(config("s2ac", []))  # without resume=auto nothing is compared


@pytest.mark.parametrize(
    "script,overrides,message",
    [
        ("s2ac", ["optim.max_grad_norm=-1"], "optim.max_grad_norm=-1 must be > 0"),
        ("s2ac", ["collector.learning_starts=5000", "collector.total_frames=1000"], "is beyond collector.total_frames"),
        ("s2ac", ["s2ac.num_steps=0"], "s2ac.num_steps=0 must be >= 1"),
        ("s2ac", ["network.critic_cells=[64,-1]"], "network.critic_cells=[64, -1] must be a list of positive"),
        ("sac", ["network.actor_cells=256"], "network.actor_cells=256 must be a list of positive integers"),
        ("s2ac", ["optim.batch_size=32.0"], "optim.batch_size=32.0 must be an integer"),
        ("sql", ["collector.total_frames=abc"], "collector.total_frames='abc' must be an integer"),
        ("s2ac", ["optim.lr_actor=fast"], "optim.lr_actor='fast' must be a finite number"),
        ("s2ac", ["s2ac.amortized=maybe"], "s2ac.amortized='maybe' must be true or false"),
        ("s2ac", ["logger.video=true", "env=hopper", "logger.backend=null"], "needs a logger that records video"),
        ("s2ac", ["collector.non_finite=ignore"], "collector.non_finite='ignore' must be raise or skip"),
        ("s2ac", ["logger.log_every_frames=0"], "logger.log_every_frames=0 must be >= 1"),
        ("s2ac", ["checkpoint.every_frames=-5"], "checkpoint.every_frames=-5 must be >= 1"),
        ("s2ac", ["s2ac.kernel_sigma=-1"], "s2ac.kernel_sigma=-1 must be > 0"),
        ("s2ac", ["s2ac.score_dtype=int8"], "s2ac.score_dtype='int8' must be null, bfloat16 or float16"),
        ("s2ac", ["s2ac.init_std_min=1.5"], "s2ac.init_std_min=1.5 must be in (0, 1)"),
        ("sql", ["sql.kernel_rule=max"], "sql.kernel_rule='max' must be median or mean"),
        ("sac", ["seed=-1"], "seed=-1 must be in [0, 2**32)"),
        ("sql", ["network.activation=gelu"], "network.activation='gelu' must be one of ['elu', 'relu', 'tanh']"),
        ("s2ac", ["s2ac.target_entropy=high"], "s2ac.target_entropy='high' must be auto or a finite number"),
        ("sac", ["sac.target_entropy=null"], "sac.target_entropy=None must be auto or a finite number"),
        ("s2ac", ["resume=/no/such/run"], "resume='/no/such/run': no checkpoint there"),
        ("sac", ["checkpoint.dir=a_file/checkpoints"], "a_file/checkpoints' is not writable: Not a directory"),
    ],
)
def test_bad_option_is_named_before_any_work(tmp_path, monkeypatch, script, overrides, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as error:
        harness.exit_on_config_error(__import__(script).validate, config(script, overrides))
    assert str(error.value).startswith("Invalid configuration:") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_video_with_csv_needs_torchcodec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config("s2ac", ["env=hopper", "logger.video=true", "logger.backend=csv"])
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(harness.ConfigError, match="torchcodec, which is not installed"):
        harness.validate_common(cfg)


def test_a_bad_type_ends_the_script_in_one_line(tmp_path):
    line = last_line(launch("s2ac", tmp_path / "run", "optim.batch_size=32.0"))
    assert line == "Invalid configuration: optim.batch_size=32.0 must be an integer."


def test_bf16_score_path_warns_where_bf16_matmuls_are_emulated(monkeypatch):
    """``s2ac.score_dtype=bfloat16`` on a CPU without bf16 matrix units runs, with one warning saying why it is slow."""
    import s2ac

    cfg = config("s2ac", ["env=multigoal", "s2ac.score_dtype=bfloat16"])
    monkeypatch.setattr(s2ac, "has_bf16_matmul", lambda device: False)
    with pytest.warns(UserWarning, match="s2ac.score_dtype=bfloat16 on cpu without bf16 matrix units"):
        s2ac.validate(cfg)
    monkeypatch.setattr(s2ac, "has_bf16_matmul", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s2ac.validate(cfg)


def test_q0_and_precision_options_reach_the_actor():
    """``s2ac.init_std_min`` floors q0's sigma and ``s2ac.score_dtype`` reaches the sampler, as configured."""
    import s2ac

    cfg = config("s2ac", ["env=multigoal", "s2ac.init_std_min=0.3", "s2ac.score_dtype=bfloat16"])
    actor = s2ac.make_agent(cfg, harness.env_specs(cfg)).policy
    assert actor.std_bounds == (0.3, 1.0) and actor.stein.score_dtype == torch.bfloat16
    with torch.no_grad():
        for layer in actor.init_network.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.bias.fill_(-10.0)  # a log-std far below the floor
        _, scale = actor.init_distribution(torch.randn(5, actor.observation_dim))
    assert torch.all(scale == 0.3)


@pytest.mark.parametrize("script", ["s2ac", "sac", "sql"])
def test_every_script_builds_its_value_estimator_on_network_device(script, monkeypatch):
    """A script's TD(0) estimator is built on ``network.device``: left on the CPU (TorchRL's default), its gamma is
    a CPU tensor inside the update, which breaks CUDA-graph capture on a GPU (seen with sac.py on an H200)."""
    from torchrl.objectives.value import TD0Estimator

    built_on = []
    init = TD0Estimator.__init__

    def recording_init(self, *args, **kwargs):
        built_on.append(kwargs.get("device"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(TD0Estimator, "__init__", recording_init)
    module = importlib.import_module(script)
    cfg = config(script, ["env=multigoal", "network.device=cpu"])
    module.make_agent(cfg, harness.env_specs(cfg))
    assert built_on and all(d is not None and torch.device(d) == torch.device("cpu") for d in built_on), built_on
