"""MultiGoalEnv: hand-computed steps, batching, obstacles, specs; a short S2AC training run and multigoal.py on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs import check_env_specs

from torchrl_s2ac.envs import MultiGoalEnv
from torchrl_s2ac.envs.multigoal import segments_intersect


def step(env, position, action, step_count=0):
    shape = env.batch_size
    td = TensorDict(
        {
            "observation": torch.as_tensor(position, dtype=torch.float32).expand(*shape, 2),
            "step": torch.full((*shape, 1), step_count, dtype=torch.int64),
            "action": torch.as_tensor(action, dtype=torch.float32).expand(*shape, 2),
        },
        shape,
    )
    return env.step(td)["next"]


@pytest.mark.parametrize("layout", ["four_goals", "three_goals"])
@pytest.mark.parametrize("obstacle", [False, True])
@pytest.mark.parametrize("batch_size", [(), (4,), (2, 3)])
def test_specs(layout, obstacle, batch_size):
    check_env_specs(MultiGoalEnv(layout=layout, obstacle=obstacle, batch_size=batch_size))


def test_dynamics_and_reward_by_hand():
    env = MultiGoalEnv()
    out = step(env, [1.0, 2.0], [0.5, -2.0])  # action clipped to (0.5, -1)
    torch.testing.assert_close(out["observation"], torch.tensor([1.5, 1.0]))
    # nearest goal to (1.5, 1): (0, 5) -> 2.25 + 16 = 18.25, (5, 0) -> 12.25 + 1 = 13.25
    expected = -30 * (0.25 + 1.0) - 13.25
    assert out["reward"].item() == pytest.approx(expected)
    assert not out["terminated"].item() and not out["done"].item()
    # clipping to the box
    out = step(env, [6.8, -6.9], [1.0, -1.0])
    torch.testing.assert_close(out["observation"], torch.tensor([7.0, -7.0]))


def test_reaching_a_goal_terminates_with_bonus():
    env = MultiGoalEnv(layout="three_goals")
    out = step(env, [-3.5, 2.6], [-0.4, 0.3])  # lands at (-3.9, 2.9), 0.141 from (-4, 3)
    distance2 = 0.1**2 + 0.1**2
    assert out["reward"].item() == pytest.approx(-30 * 0.25 - distance2 + 10, abs=1e-5)
    assert out["terminated"].item() and out["done"].item() and not out["truncated"].item()


def test_truncation_after_max_steps_is_not_termination():
    env = MultiGoalEnv(max_steps=30)
    out = step(env, [0.0, 0.0], [0.0, 0.0], step_count=29)
    assert out["truncated"].item() and out["done"].item() and not out["terminated"].item()
    out = step(env, [0.0, 0.0], [0.0, 0.0], step_count=28)
    assert not out["done"].item()


def test_obstacle_cancels_crossing_moves():
    env = MultiGoalEnv(layout="four_goals", obstacle=True)  # wall (-1.5, 3)-(1.5, 3)
    out = step(env, [0.0, 2.5], [0.2, 1.0])
    torch.testing.assert_close(out["observation"], torch.tensor([0.0, 2.5]))
    out = step(env, [2.0, 2.5], [0.2, 1.0])  # passes beside the wall
    torch.testing.assert_close(out["observation"], torch.tensor([2.2, 3.5]))
    free = MultiGoalEnv(layout="four_goals")
    torch.testing.assert_close(step(free, [0.0, 2.5], [0.2, 1.0])["observation"], torch.tensor([0.2, 3.5]))
    env3 = MultiGoalEnv(layout="three_goals", obstacle=True)  # wall (-2, 0)-(0, 2)
    torch.testing.assert_close(step(env3, [-0.5, 0.5], [-1.0, 1.0])["observation"], torch.tensor([-0.5, 0.5]))


def test_segment_intersection():
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    p = torch.tensor([[0.0, 1.0], [2.0, 2.0], [0.0, 0.5]])
    q = torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.4, 0.5]])
    assert segments_intersect(p, q, a, b).tolist() == [True, False, False]


def test_batched_stepping_equals_single_envs():
    torch.manual_seed(0)
    batched = MultiGoalEnv(batch_size=(5,), obstacle=True)
    actions = torch.rand(12, 5, 2) * 2 - 1
    td = batched.reset()
    batched_obs = []
    for t in range(12):
        td["action"] = actions[t]
        td = batched.step_mdp(batched.step(td))
        batched_obs.append(td["observation"])
    single = MultiGoalEnv(obstacle=True)
    for i in range(5):
        td = single.reset()
        for t in range(12):
            td["action"] = actions[t, i]
            td = single.step_mdp(single.step(td))
            torch.testing.assert_close(td["observation"], batched_obs[t][i])


def test_partial_reset_keeps_other_envs():
    env = MultiGoalEnv(batch_size=(2,))
    policy_actions = torch.tensor([[1.0, 0.0], [0.1, 0.1]])

    def policy(td):
        td["action"] = policy_actions
        return td

    rollout = env.rollout(8, policy, break_when_any_done=False)
    # env 0 reaches (5, 0) after 5 steps and restarts from the origin; env 1 keeps drifting.
    assert rollout["next", "terminated"][0, 4].item()
    torch.testing.assert_close(rollout["observation"][0, 5], torch.zeros(2))
    torch.testing.assert_close(rollout["observation"][1, 7], torch.tensor([0.7, 0.7]))


@pytest.mark.parametrize("obstacle", [False, True])
def test_to_moves_the_goals_and_the_wall_with_the_specs(obstacle):
    # A collector's env_device casts the env with .to(): the layout must follow (here to the meta device).
    env = MultiGoalEnv(obstacle=obstacle).to("meta")
    layout = [env.goals] + ([env.wall] if obstacle else [])
    assert env.device.type == "meta" and all(t.device.type == "meta" for t in layout)


def test_bad_layout():
    with pytest.raises(ValueError, match="layout"):
        MultiGoalEnv(layout="five_goals")


ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args, cwd=None, timeout=600):
    """``sota-implementations/<name>`` in a subprocess, its warnings silenced."""
    return subprocess.run(
        [sys.executable, str(ROOT / "sota-implementations" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """S2AC on the 4-goal map with small networks and the authors' L = 3 for 2,000 frames (about 2 min on 2 cores)."""
    out = tmp_path_factory.mktemp("runs") / "multigoal"
    overrides = [
        "env=multigoal",
        "env.num_envs=2",
        "collector.total_frames=2000",
        "collector.frames_per_batch=20",
        "collector.init_random_frames=300",
        "collector.learning_starts=300",
        "optim.batch_size=64",
        "network.critic_cells=[64,64]",
        "network.init_cells=[64,64]",
        "s2ac.num_particles=8",
        "s2ac.num_steps=3",
        "s2ac.amortized=true",
        "logger.eval_every_frames=100000",
        "logger.eval_episodes=20",
        "logger.backend=csv",
        "num_threads=1",
        "replay_buffer.size=10000",
        f"hydra.run.dir={out}",
    ]
    result = run_script("s2ac.py", *overrides, timeout=1200)  # a hang guard: ~140 s beside two other runs on 2 cores
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.xdist_group("multigoal_training")
def test_short_s2ac_training_beats_the_uniform_random_policy(trained_run):
    final = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()][-1]

    torch.manual_seed(0)
    env = MultiGoalEnv(batch_size=(200,))
    rollout = env.rollout(30, lambda td: td.set("action", torch.rand(200, 2) * 2 - 1), break_when_any_done=False)
    done = rollout["next", "done"].squeeze(-1)
    alive = (done.int().cumsum(-1) - done.int()) == 0
    random_return = (rollout["next", "reward"].squeeze(-1) * alive).sum(-1).mean().item()
    assert final["eval/return"] > random_return + 300, (final["eval/return"], random_return)


@pytest.mark.xdist_group("multigoal_training")
def test_multigoal_report_tests_each_policy_of_a_run(trained_run):
    """``multigoal.py`` on the trained run: one table row per policy (SVGD particles and amortized sampler) and wall
    setting, distinct goals equal to the goals with a positive hit fraction, the run named relative to the working
    directory, and the figures written; a folder without runs of the layout stops it with a message naming it."""
    cwd = trained_run.parent

    def multigoal_py(layout):
        return run_script("multigoal.py", "multigoal", "--layout", layout, "--out", "report", cwd=cwd)

    run = multigoal_py("four_goals")
    assert run.returncode == 0, run.stderr[-3000:]
    table = (cwd / "report" / "results_four_goals.md").read_text()
    assert "Runs: `multigoal`." in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| S2AC")]
    rows = [row for row in rows if row[1].isdigit()]  # the per-run table, not the summary over seeds
    label = "| S2AC-learned-q0"  # the scripts' default q0 is learned
    assert [(row[0], row[3]) for row in rows] == [
        (label, "no"),
        (label, "yes"),
        (f"{label}-amortized", "no"),
        (f"{label}-amortized", "yes"),
    ]
    for row in rows:
        distinct, total = row[4].split("/")
        hits = [float(value) for value in row[5].split(", ")]
        assert int(total) == len(hits) == 4 and int(distinct) == sum(hit > 0 for hit in hits)
        assert all(0 <= hit <= 1 for hit in hits) and sum(hits) <= 1 + 1e-6
    for figure in ("trajectories_four_goals.png", "landscape_four_goals.png"):
        assert (cwd / "report" / figure).stat().st_size > 0

    missing = multigoal_py("three_goals")
    assert missing.returncode == 1 and "No finished three_goals multi-goal runs under ['multigoal']" in missing.stderr


def test_goal_hits_counts_the_first_goal_of_each_episode():
    from torchrl_s2ac.envs import goal_hits

    env = MultiGoalEnv(layout="four_goals", batch_size=(3,))
    # episode 0 walks right to (5, 0); episode 1 walks down to (0, -5); episode 2 stays at the origin
    direction = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])

    def policy(td):
        return td.set("action", direction)

    rollout = env.rollout(10, policy, break_when_any_done=False)
    hits = goal_hits(env.goals, rollout)
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[0, 0] = expected[1, 3] = True  # goals (5, 0) and (0, -5)
    assert torch.equal(hits, expected)


def test_goal_radius_and_start_noise():
    env = MultiGoalEnv(layout="four_goals", goal_radius=1.0, init_noise=0.1, batch_size=(256,))
    env.set_seed(0)
    start = env.reset()["observation"]
    assert 0.08 < start.std().item() < 0.12
    env.set_seed(0)
    assert torch.equal(env.reset()["observation"], start)  # seeded
    td = (
        env.reset().set("observation", torch.tensor([3.5, 0.0]).expand(256, 2)).set("action", torch.full((256, 2), 0.0))
    )
    td["action"][:, 0] = 0.6  # lands at 4.1: inside radius 1 of (5, 0), outside 0.5
    assert env.step(td)["next", "terminated"].all()
    with pytest.raises(ValueError, match="goal_radius"):
        MultiGoalEnv(goal_radius=0.0)
