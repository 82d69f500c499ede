"""The paper's multi-goal experiment: S2AC, SAC and SQL on the point-mass goal map.

    python sota-implementations/multigoal.py --layout three_goals --seeds 0 1 2 --frames 5000

Trains each algorithm with ``s2ac.py`` / ``sac.py`` / ``sql.py`` (``env=multigoal``;
runs already finished in ``--out`` are reused), then, per run, plays 20 test
episodes with the stochastic (training) action selection, with and without the
layout's obstacle. S2AC runs also train the amortized sampler, which is tested
as a fourth policy ("S2AC-amortized": one network pass per action, no SVGD).
Writes into ``--out``:

- ``results_<layout>.md``: per run, distinct goals reached, hit fraction per goal,
  mean return, acting time, and the entropy at the probe states two ways: the
  algorithm's own estimate (S2AC: closed-form Stein log-density of the particles;
  SAC: Monte Carlo -E[log pi] of its tanh-Gaussian; SQL and S2AC-amortized have no
  density) and the Kozachenko-Leonenko k-NN estimate from 1000 actions, the same
  estimator for every policy. Then a summary over seeds.
- ``trajectories_<layout>.png``: the test trajectories over the goal map;
- ``landscape_<layout>.png``: min_k Q(s, .) over the action square at the probe
  states (first seed), with 100 of the policy's actions on top.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from torchrl.envs.utils import ExplorationType, set_exploration_type  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

from torchrl_s2ac import knn_entropy  # noqa: E402
from torchrl_s2ac.envs import LAYOUTS, OBSTACLES, PROBE_STATES, MultiGoalEnv  # noqa: E402

ALGORITHMS = ("s2ac", "sac", "sql")
# Settings for the 2-D task: shorter warm-up, smaller nets; S2AC with L = 10 as in the release.
COMMON = [
    "env=multigoal",
    "collector.init_random_frames=1000",
    "collector.learning_starts=500",
    "logger.eval_every_frames=1000",
    "logger.eval_episodes=10",
    "network.critic_cells=[128,128]",
    "env.num_envs=2",
    "num_threads=1",
]
PRESETS = {
    # The release's multi-goal variant: fixed q0 = N(0, 0.5^2), L = 10; the amortized sampler is trained alongside.
    "s2ac": ["s2ac.num_steps=10", "network.init_cells=[128,128]", "s2ac.fixed_init_std=0.5", "s2ac.amortized=true"],
    "sac": ["network.actor_cells=[128,128]"],
    "sql": ["network.sampler_cells=[128,128]"],
}
TEST_EPISODES = 20
PROBE_ACTIONS = 1000


def run_dir(out: Path, algorithm: str, layout: str, seed: int) -> Path:
    return out / "runs" / f"{algorithm}_{layout}_seed{seed}"


def train(args, algorithm, seed) -> subprocess.Popen | None:
    directory = run_dir(args.out, algorithm, args.layout, seed)
    if (directory / "checkpoints" / "last.pt").exists() and '"final"' in (directory / "metrics.jsonl").read_text():
        return None
    overrides = [
        *COMMON,
        *PRESETS[algorithm],
        f"env.layout={args.layout}",
        f"seed={seed}",
        f"collector.total_frames={args.frames}",
        f"hydra.run.dir={directory}",
        *args.overrides,
    ]
    if algorithm == "s2ac":
        overrides += args.s2ac
    log = open(directory.parent / f"{directory.name}.log", "a")
    return subprocess.Popen([sys.executable, str(HERE / f"{algorithm}.py"), *overrides], stdout=log, stderr=log)


def load_agent(directory: Path, algorithm: str):
    cfg = OmegaConf.load(directory / ".hydra" / "config.yaml")
    agent = importlib.import_module(algorithm).make_agent(cfg, harness.env_specs(cfg))
    agent.loss.load_state_dict(torch.load(directory / "checkpoints" / "last.pt", weights_only=False)["loss"])
    return agent


def policies(agent, algorithm: str) -> dict:
    """The policies to test from one run: S2AC gives two (SVGD particles, amortized sampler)."""
    if algorithm != "s2ac":
        return {algorithm.upper(): agent.policy}
    found = {"S2AC": agent.policy}
    if agent.policy.actor.amortized_sampler is not None:
        found["S2AC-amortized"] = agent.policy.actor.amortized_sampler
    return found


@torch.no_grad()
def test_episodes(policy, layout: str, obstacle: bool):
    env = MultiGoalEnv(layout=layout, obstacle=obstacle, batch_size=(TEST_EPISODES,))
    start = time.perf_counter()
    with set_exploration_type(ExplorationType.RANDOM):
        rollout = env.rollout(30, policy, break_when_any_done=False)
    seconds = time.perf_counter() - start
    alive = harness.until_first_done(rollout)
    returns = (rollout["next", "reward"].squeeze(-1) * alive).sum(-1)
    reached = rollout["next", "terminated"].squeeze(-1) & alive
    final = rollout["next", "observation"][reached]  # one position per episode that reached a goal
    goal_index = (final.unsqueeze(-2) - env.goals).norm(dim=-1).argmin(-1)
    hits = torch.bincount(goal_index, minlength=len(env.goals)).float() / TEST_EPISODES
    paths = torch.cat([rollout["observation"][:, :1], rollout["next", "observation"]], 1)
    return {"returns": returns, "hits": hits, "paths": paths, "alive": alive, "ms_per_step": 1000 * seconds / 30}


@torch.no_grad()
def probe_actions(agent, label: str):
    """``PROBE_ACTIONS`` actions per probe state ``[P, n, 2]`` and the policy's own entropy estimate (or None)."""
    obs = torch.tensor(PROBE_STATES)
    if label == "S2AC":
        actor = agent.policy.actor
        repeats = PROBE_ACTIONS // actor.num_particles
        sample = actor.sample_particles(obs.repeat_interleave(repeats, 0))
        actions = sample.action.reshape(len(obs), repeats * actor.num_particles, 2)
        return actions, -sample.log_prob.reshape(len(obs), -1).mean(-1)
    if label == "SAC":
        dist = agent.policy.get_dist(TensorDict({"observation": obs}, [len(obs)]))
        actions = dist.sample((PROBE_ACTIONS,))
        return actions.transpose(0, 1), -dist.log_prob(actions).mean(0)
    sampler = agent.policy if label == "SQL" else agent.policy.actor.amortized_sampler
    return sampler.sample(obs, PROBE_ACTIONS).action, None


@torch.no_grad()
def q_landscape(agent, algorithm: str, state, grid):
    actions = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
    obs = torch.tensor(state).expand(len(actions), 2)
    loss = agent.loss
    if algorithm in ("s2ac", "sql"):
        return loss.qvalue_network.min_values(obs, actions).reshape(len(grid), len(grid))
    td = TensorDict({"observation": obs, "action": actions}, [len(actions)])
    values = loss._vmap_qnetworkN0(td, loss.qvalue_network_params)["state_action_value"]
    return values.amin(0).reshape(len(grid), len(grid))


def fmt(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="three_goals", choices=sorted(LAYOUTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("results/multigoal"))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--s2ac", nargs="*", default=[], help="hydra overrides for s2ac.py only")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every script")
    args = parser.parse_args()
    args.out = args.out.resolve()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        harness.train_side_by_side(functools.partial(train, args), args.algorithms, args.seeds, args.out / "runs")

    goals, wall = LAYOUTS[args.layout], OBSTACLES[args.layout]
    command = (
        f"python sota-implementations/multigoal.py --layout {args.layout} --frames {args.frames} "
        f"--seeds {' '.join(map(str, args.seeds))}" + (f" --s2ac {' '.join(args.s2ac)}" if args.s2ac else "")
    )
    report = [
        f"# Multi-goal ({args.layout}), {args.frames} frames per run",
        "",
        f"Command: `{command}`",
        "",
        f"Probe states: {list(PROBE_STATES)}. Entropy columns: the policy's own estimate (S2AC closed form, "
        f"SAC Monte Carlo; SQL and S2AC-amortized have none) / the k-NN estimate from {PROBE_ACTIONS} actions.",
        "",
        "| policy | seed | obstacle | distinct goals | hit fraction per goal | mean return | acting ms/step "
        "| own entropy estimate | k-NN entropy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    runs = [(seed, algorithm) for algorithm in args.algorithms for seed in args.seeds]
    labels = [
        label
        for algorithm in args.algorithms
        for label in (("S2AC", "S2AC-amortized") if algorithm == "s2ac" else (algorithm.upper(),))
    ]
    columns = [(seed, obstacle) for seed in args.seeds for obstacle in (False, True)]
    fig, axes = plt.subplots(len(labels), len(columns), figsize=(3.2 * len(columns), 3.2 * len(labels)), squeeze=False)
    land_fig, land_axes = plt.subplots(
        len(labels), len(PROBE_STATES), figsize=(2.6 * len(PROBE_STATES), 2.8 * len(labels)), squeeze=False
    )
    grid = torch.linspace(-1, 1, 61)
    summary: dict[tuple[str, bool], list[tuple[int, float]]] = {}
    probe_entropy: dict[str, list[float]] = {}
    estimate_gap: dict[str, list[torch.Tensor]] = {}  # own estimate - k-NN, per probe state and run
    init_std: list[str] = []
    for seed, algorithm in runs:
        agent = load_agent(run_dir(args.out, algorithm, args.layout, seed), algorithm)
        for label, policy in policies(agent, algorithm).items():
            torch.manual_seed(seed)  # the same test noise on every report of this run
            row = labels.index(label)
            actions, own = probe_actions(agent, label)
            knn = knn_entropy(actions.double())
            probe_entropy.setdefault(label, []).append(knn.mean().item())
            if own is not None:
                estimate_gap.setdefault(label, []).append(own - knn)
            if label == "S2AC":
                _, scale = agent.policy.actor.init_distribution(torch.tensor(PROBE_STATES))
                init_std.append(f"seed {seed}: {scale.min():.2f}-{scale.max():.2f}")
            for obstacle in (False, True):
                result = test_episodes(policy, args.layout, obstacle)
                distinct = int((result["hits"] > 0).sum())
                summary.setdefault((label, obstacle), []).append((distinct, result["returns"].mean().item()))
                report.append(
                    f"| {label} | {seed} | {'yes' if obstacle else 'no'} | {distinct}/{len(goals)} | "
                    f"{fmt(result['hits'].tolist())} | {result['returns'].mean():.1f} | {result['ms_per_step']:.2f} | "
                    f"{fmt(own.tolist()) if own is not None else '-'} | {fmt(knn.tolist())} |"
                )
                ax = axes[row, columns.index((seed, obstacle))]
                for path, alive in zip(result["paths"], result["alive"]):
                    steps = int(alive.sum()) + 1
                    ax.plot(path[:steps, 0], path[:steps, 1], color="tab:blue", alpha=0.6, lw=1)
                ax.scatter(*zip(*goals), color="tab:red", s=80, marker="*", zorder=3)
                if obstacle:
                    ax.plot(*zip(*wall), color="k", lw=3)
                ax.set_xlim(-7, 7)
                ax.set_ylim(-7, 7)
                ax.set_aspect("equal")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{label} s{seed}{' +wall' if obstacle else ''}: {distinct} goals", fontsize=9)
            if seed != args.seeds[0]:
                continue
            for k, state in enumerate(PROBE_STATES):
                ax = land_axes[row, k]
                ax.contourf(grid, grid, q_landscape(agent, algorithm, state, grid), levels=30, cmap="viridis")
                ax.scatter(actions[k, :100, 0], actions[k, :100, 1], color="w", s=8, edgecolors="k", linewidths=0.3)
                ax.set_title(f"{label} s={state}\nk-NN H={knn[k]:.2f}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
    report += [
        "",
        f"## Summary over seeds {args.seeds} (mean ± std)",
        "",
        "| policy | obstacle | distinct goals | mean return | k-NN entropy, mean over probe states |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (label, obstacle), values in summary.items():
        distinct, returns = np.array(values).T
        entropy = np.array(probe_entropy[label])
        report.append(
            f"| {label} | {'yes' if obstacle else 'no'} | "
            f"{distinct.mean():.2f} ± {distinct.std():.2f} / {len(goals)} | "
            f"{returns.mean():.1f} ± {returns.std():.1f} | {entropy.mean():.2f} ± {entropy.std():.2f} |"
        )
    report.append("")
    for label, gaps in estimate_gap.items():
        gap = torch.cat(gaps)
        report.append(
            f"- {label}: own entropy estimate minus k-NN estimate over probe states and seeds: mean {gap.mean():.2f}, "
            f"range {gap.min():.2f} to {gap.max():.2f} nats."
        )
    if init_std:
        report.append(f"- S2AC q0 standard deviation at the probe states (min-max): {'; '.join(init_std)}.")
    fig.tight_layout()
    fig.savefig(args.out / f"trajectories_{args.layout}.png", dpi=80)
    land_fig.tight_layout()
    land_fig.savefig(args.out / f"landscape_{args.layout}.png", dpi=80)
    (args.out / f"results_{args.layout}.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
