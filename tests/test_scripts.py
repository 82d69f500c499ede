"""The training scripts end to end on a real MuJoCo env, with offline W&B, checkpoints and resume."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "sota-implementations"
sys.path.insert(0, str(SCRIPTS))
import checkpoint  # noqa: E402

TINY = [
    "env=hopper",
    "env.max_episode_steps=40",
    "env.num_envs=2",
    "collector.frames_per_batch=20",
    "collector.init_random_frames=40",
    "collector.learning_starts=40",
    "optim.batch_size=16",
    "logger.eval_every_frames=80",
    "logger.eval_episodes=2",
    "logger.log_every_frames=20",
    "checkpoint.every_frames=60",
    "network.critic_cells=[32,32]",
    "num_threads=1",
    "replay_buffer.size=1000",
]
S2AC_TINY = ["network.init_cells=[32,32]", "s2ac.num_particles=4", "s2ac.num_steps=2"]
SAC_TINY = ["network.actor_cells=[32,32]"]
SQL_TINY = ["network.sampler_cells=[32,32]", "sql.num_particles=4", "sql.num_value_samples=4"]
AMORTIZED = ["s2ac.amortized=true", "s2ac.train_selection=amortized"]


def run(script, out, *overrides, timeout=300, check=True, cwd=None, extra_env=None):
    env = dict(os.environ, WANDB_MODE="offline", MUJOCO_GL="egl", PYTHONWARNINGS="ignore", **(extra_env or {}))
    env.pop("PYTHONPATH", None)  # the scripts must find their support code themselves
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{script}.py"), f"hydra.run.dir={out}", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_state(out):
    """The verified manifest of the run's current checkpoint: counters under "state", the buffer's length."""
    return checkpoint.read_manifest(Path(out) / "checkpoints")[1]


def buffer_length(state):
    return state["buffer"]["length"]


EXPECTED_METRICS = {
    "s2ac": {"train/alpha", "train/entropy", "train/svgd_step_ratio"},
    "sac": {"train/alpha", "train/entropy"},
    "sql": {"train/svgd_norm"},
}


@pytest.mark.parametrize(
    "script,extra",
    [("s2ac", S2AC_TINY), ("s2ac", S2AC_TINY + AMORTIZED), ("sac", SAC_TINY), ("sql", SQL_TINY)],
    ids=["s2ac", "s2ac-amortized", "sac", "sql"],
)
def test_script_trains_logs_and_resumes(tmp_path, script, extra):
    out = tmp_path / script
    run(script, out, *TINY, *extra, "collector.total_frames=120")
    records = metrics(out)
    assert records[-1]["final"] == 1 and records[-1]["frames"] == 120
    keys = set().union(*records)
    assert {"eval/return", "train/loss_actor", "train/loss_qvalue", "time/fps"} | EXPECTED_METRICS[script] <= keys
    # Both evaluations in the final record: the deterministic policy's and the exploring one's
    assert {"eval/return", "eval/return_stochastic", "eval/return_stochastic_std"} <= set(records[-1])
    if "s2ac.amortized=true" in extra:
        assert "train/loss_amortized" in keys
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    state = checkpoint_state(out)
    assert state["state"]["frames"] == 120
    # Resume to a larger total: continues from 120 frames, ends at 200, buffer holds every frame once.
    run(script, out, *TINY, *extra, "collector.total_frames=200", f"resume={out}")
    state = checkpoint_state(out)
    assert state["state"]["frames"] == 200
    assert state["state"]["updates"] > 0
    assert buffer_length(state) == 200
    assert metrics(out)[-1]["frames"] == 200
    if script == "s2ac":  # acting_eval.py plays the finished run with each particle selection (and the sampler)
        played = subprocess.run(
            [sys.executable, str(SCRIPTS / "acting_eval.py"), str(out), "--episodes", "2"],
            capture_output=True, text=True, timeout=300, env=dict(os.environ, MUJOCO_GL="egl", PYTHONWARNINGS="ignore"),
        )  # fmt: skip
        assert played.returncode == 0, played.stderr[-2000:]
        rows = [line for line in played.stdout.splitlines() if line.startswith(("| SVGD", "| amortized"))]
        assert len(rows) == (5 if "s2ac.amortized=true" in extra else 3), played.stdout
        assert "200 frames" in played.stdout


def test_compiled_update(tmp_path):
    """compile.compile=true: the update runs through torch.compile (after one eager call), s2ac.compile=true: the
    collector compiles the policy; the run ends as usual, and no graph break is in S2AC's code (backward and the
    optimiser step break in torch's own, as in TorchRL's sac.py)."""
    out = tmp_path / "compiled"
    result = run(
        "s2ac",
        out,
        *TINY,
        *S2AC_TINY,
        "collector.total_frames=60",
        "optim.utd_ratio=0.1",  # 2 updates per batch: one eager, then compiled ones
        "logger.backend=csv",
        "compile.compile=true",
        "s2ac.compile=true",
        extra_env={"TORCH_LOGS": "dynamo,graph_breaks"},
        timeout=900,  # two cold inductor compiles (update and policy): 134 s alone on 2 cores, more beside other tests
    )
    assert "start tracing update" in result.stderr
    assert not re.search(r"Graph break .*in user code at \S*torchrl_s2ac", result.stderr)
    records = metrics(out)
    assert records[-1]["final"] == 1 and records[-1]["frames"] == 60
    losses = [record["train/loss_actor"] for record in records if "train/loss_actor" in record]
    assert len(losses) == 2 and all(math.isfinite(value) for value in losses)


def test_a_fractional_update_to_data_ratio_is_kept_exactly(tmp_path):
    """utd 0.025 with 20-frame batches owes half an update per batch: one update every other batch."""
    out = tmp_path / "utd"
    run("sac", out, *TINY, *SAC_TINY, "collector.total_frames=120", "optim.utd_ratio=0.025")
    state = checkpoint_state(out)["state"]
    # updates from 40 frames on (learning_starts): batches at 40, 60, 80, 100, 120 frames owe 2.5 updates
    assert (state["updates"], state["update_credit"]) == (2, pytest.approx(0.5))


def test_cudagraphs_refused_without_cuda(tmp_path):
    result = run("s2ac", tmp_path / "bad", "network.device=cpu", "compile.cudagraphs=true", check=False, timeout=120)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        "Invalid configuration: compile.cudagraphs=true needs a CUDA network.device; the update runs on cpu."
    )


def test_interrupted_run_leaves_a_usable_checkpoint(tmp_path):
    out = tmp_path / "interrupted"
    env = dict(os.environ, WANDB_MODE="offline", MUJOCO_GL="egl", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "s2ac.py"),
            f"hydra.run.dir={out}",
            *TINY,
            *S2AC_TINY,
            "collector.total_frames=100000",
            "checkpoint.every_frames=100000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and any("train/loss_actor" in line for line in path.read_text().splitlines()):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert "Interrupted at" in stderr
    assert proc.returncode == 130
    checkpoint = checkpoint_state(out)
    frames = checkpoint["state"]["frames"]
    assert 0 < frames < 100000
    assert buffer_length(checkpoint) == frames  # stopped between batches: nothing half-stored
    run("s2ac", out, *TINY, *S2AC_TINY, f"collector.total_frames={frames + 40}", f"resume={out}")
    checkpoint = checkpoint_state(out)
    assert checkpoint["state"]["frames"] == frames + 40 and buffer_length(checkpoint) == frames + 40


def _can_render() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import mujoco; mujoco.GLContext(64, 64).make_current()"],
        capture_output=True,
        env=dict(os.environ, MUJOCO_GL="egl"),
        timeout=60,
    )
    return probe.returncode == 0


def test_eval_video_is_rendered_and_logged(tmp_path):
    if not _can_render():
        pytest.skip("MuJoCo cannot create an EGL context here (install Mesa: libegl1 libgl1-mesa-dri)")
    out = tmp_path / "video"
    run(
        "s2ac",
        out,
        *TINY,
        *S2AC_TINY,
        "collector.total_frames=40",
        "env.max_episode_steps=15",
        "logger.eval_episodes=1",
        "logger.video=true",
    )
    videos = list((out / "wandb").glob("offline-run-*/files/media/videos/eval/*.mp4"))
    assert videos and videos[0].stat().st_size > 1000


def test_process_backend(tmp_path):
    out = tmp_path / "process"
    run(
        "s2ac",
        out,
        *TINY,
        *S2AC_TINY,
        "collector.backend=process",
        "collector.num_workers=2",
        "collector.total_frames=120",
        "logger.backend=csv",
        "network.critic_cells=[]",  # a critic without hidden layers works too
    )
    assert metrics(out)[-1]["frames"] >= 120


@pytest.mark.xdist_group("ray")
def test_ray_backend_from_another_directory(tmp_path):
    """A local Ray runtime with 2 workers, launched from a directory that is not the scripts': the workers
    import the scripts' support code, the run ends with its final evaluation and checkpoint. HalfCheetah's
    XML is the one that makes MuJoCo warn about ``settotalmass``: nothing of it reaches the console."""
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    result = run(
        "s2ac",
        out,
        *[o for o in TINY if not o.startswith("env=")],
        *S2AC_TINY,
        "collector.backend=ray",
        "collector.num_workers=2",
        "collector.total_frames=80",
        "logger.backend=csv",
        timeout=400,
        cwd=tmp_path,
    )
    final = metrics(out)[-1]
    assert final["final"] == 1 and final["frames"] == 80 and "eval/return" in final
    assert checkpoint_state(out)["state"]["frames"] == 80
    assert "settotalmass" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "script,override,message",
    [
        ("s2ac", "s2ac.num_particles=1", "s2ac.num_particles=1 must be >= 2"),
        ("s2ac", "s2ac.step_size=0", "s2ac.step_size=0 must be > 0"),
        ("s2ac", "s2ac.eval_selection=amortized", "s2ac.eval_selection=amortized needs s2ac.amortized=true"),
        ("s2ac", "env.name=NoSuchEnv-v0", "env.name='NoSuchEnv-v0' is not a registered"),
        ("s2ac", "collector.frames_per_batch=0", "collector.frames_per_batch=0 must be > 0"),
        ("s2ac", "optim.batch_size=5000", "optim.batch_size=5000 is larger than the data available"),
        ("sql", "sql.num_particles=1", "sql.num_particles=1 must be >= 2"),
        ("sql", "sql.alpha=-1", "sql.alpha=-1 must be > 0"),
        ("sac", "network.device=gpu7", "network.device='gpu7' is not a torch device"),
    ],
)
def test_bad_config_fails_with_one_clear_line(tmp_path, script, override, message):
    result = run(script, tmp_path / "bad", override, check=False, timeout=120)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Invalid configuration:") and message in last_line
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_trivial_policies_score_what_the_tasks_pay_for_doing_nothing():
    """Zero action: HalfCheetah-v5 pays nothing for 1000 steps, Ant-v5 its healthy reward (1 per step) for 1000 steps;
    uniform actions topple Hopper-v5 long before its time limit, and the return stops at that first done."""
    from hydra import compose, initialize_config_dir

    import trivial_policies

    with initialize_config_dir(config_dir=str(SCRIPTS / "config"), version_base="1.3"):
        cheetah, ant, hopper = (
            compose(config_name="sac", overrides=[f"env={task}"]) for task in ("halfcheetah", "ant", "hopper")
        )
    returns, lengths = trivial_policies.play(cheetah, "zero", episodes=2, seed=0)
    assert lengths.tolist() == [1000, 1000] and returns.abs().max() < 5
    returns, lengths = trivial_policies.play(ant, "zero", episodes=2, seed=0)
    assert lengths.tolist() == [1000, 1000] and (returns - 1000).abs().max() < 50
    returns, lengths = trivial_policies.play(hopper, "uniform", episodes=2, seed=0)
    assert lengths.max() < 100 and returns.abs().max() < lengths.max() * 4
