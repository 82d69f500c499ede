"""The paper's multi-goal experiment: S2AC and SAC on the point-mass goal map.

    python sota-implementations/multigoal.py --layout four_goals --seeds 0 1 --frames 6000 --out results/multigoal

Trains each algorithm with ``s2ac.py`` / ``sac.py`` (``env=multigoal``), then, per
run, plays 20 test episodes with the stochastic (training) action selection,
with and without the layout's obstacle, and writes:

- ``results.md``: distinct goals reached, hit fraction per goal, mean return,
  entropy at the probe states (S2AC: closed-form Stein estimate over the m
  particles; SAC: Monte Carlo -E[log pi] of its tanh-Gaussian, 1000 samples);
- ``trajectories.png``: test trajectories over the goal map;
- ``landscape.png``: min_k Q(s, .) over the action square at the probe states,
  with the policy's samples on top.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from torchrl.envs.utils import ExplorationType, set_exploration_type  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

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
        f"env.seed={seed}",
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
    return cfg, agent


@torch.no_grad()
def test_episodes(policy, layout: str, obstacle: bool):
    env = MultiGoalEnv(layout=layout, obstacle=obstacle, batch_size=(TEST_EPISODES,))
    with set_exploration_type(ExplorationType.RANDOM):
        rollout = env.rollout(30, policy, break_when_any_done=False)
    alive = harness.until_first_done(rollout)
    returns = (rollout["next", "reward"].squeeze(-1) * alive).sum(-1)
    reached = rollout["next", "terminated"].squeeze(-1) & alive
    final = rollout["next", "observation"][reached]  # one position per episode that reached a goal
    goals = env.goals
    goal_index = (final.unsqueeze(-2) - goals).norm(dim=-1).argmin(-1)
    hits = torch.bincount(goal_index, minlength=len(goals)).float() / TEST_EPISODES
    paths = torch.cat([rollout["observation"][:, :1], rollout["next", "observation"]], 1)
    return {"returns": returns, "hits": hits, "paths": paths, "alive": alive}


@torch.no_grad()
def probe_entropy_and_samples(agent, algorithm: str):
    obs = torch.tensor(PROBE_STATES)
    if algorithm == "s2ac":
        actor = agent.policy.actor
        sample = actor.sample_particles(obs)
        return -sample.log_prob.mean(-1), sample.action
    actor = agent.policy
    dist = actor.get_dist(TensorDict({"observation": obs}, [len(obs)]))
    actions = dist.sample((1000,))
    return -dist.log_prob(actions).mean(0), actions.transpose(0, 1)[:, :100]


@torch.no_grad()
def q_landscape(agent, algorithm: str, state, grid):
    actions = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
    obs = torch.tensor(state).expand(len(actions), 2)
    loss = agent.loss
    if algorithm == "s2ac":
        return loss.qvalue_network.min_values(obs, actions).reshape(len(grid), len(grid))
    td = TensorDict({"observation": obs, "action": actions}, [len(actions)])
    values = loss._vmap_qnetworkN0(td, loss.qvalue_network_params)["state_action_value"]
    return values.amin(0).reshape(len(grid), len(grid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="four_goals", choices=sorted(LAYOUTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--frames", type=int, default=6000)
    parser.add_argument("--out", type=Path, default=Path("results/multigoal"))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--s2ac", nargs="*", default=[], help="hydra overrides for s2ac.py only")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for both scripts")
    args = parser.parse_args()
    args.out = args.out.resolve()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        harness.train_side_by_side(functools.partial(train, args), args.algorithms, args.seeds, args.out / "runs")

    goals = LAYOUTS[args.layout]
    wall = OBSTACLES[args.layout]
    report = [
        f"# Multi-goal ({args.layout}), {args.frames} frames per run",
        "",
        f"Command: `python sota-implementations/multigoal.py --layout {args.layout} --frames {args.frames} "
        f"--seeds {' '.join(map(str, args.seeds))}" + (f" --s2ac {' '.join(args.s2ac)}" if args.s2ac else "") + "`",
        "",
        "| algorithm | seed | obstacle | distinct goals | hit fraction per goal | mean return | "
        "entropy at probe states " + str(PROBE_STATES) + " |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    fig, axes = plt.subplots(2, 2 * len(args.seeds), figsize=(5 * 2 * len(args.seeds), 10), squeeze=False)
    land_fig, land_axes = plt.subplots(
        2 * len(args.seeds), len(PROBE_STATES), figsize=(3 * len(PROBE_STATES), 6 * len(args.seeds)), squeeze=False
    )
    grid = torch.linspace(-1, 1, 61)
    for column, (seed, algorithm) in enumerate((s, a) for s in args.seeds for a in args.algorithms):
        _, agent = load_agent(run_dir(args.out, algorithm, args.layout, seed), algorithm)
        entropy, samples = probe_entropy_and_samples(agent, algorithm)
        for row, obstacle in enumerate((False, True)):
            result = test_episodes(agent.policy, args.layout, obstacle)
            distinct = int((result["hits"] > 0).sum())
            hits = ", ".join(f"{h:.2f}" for h in result["hits"].tolist())
            report.append(
                f"| {algorithm.upper()} | {seed} | {'yes' if obstacle else 'no'} | {distinct}/{len(goals)} | {hits} | "
                f"{result['returns'].mean():.1f} | {', '.join(f'{e:.2f}' for e in entropy.tolist())} |"
            )
            ax = axes[row, column]
            for path, alive in zip(result["paths"], result["alive"]):
                steps = int(alive.sum()) + 1
                ax.plot(path[:steps, 0], path[:steps, 1], color="tab:blue", alpha=0.6, lw=1)
            ax.scatter(*zip(*goals), color="tab:red", s=80, marker="*", zorder=3)
            if obstacle:
                ax.plot(*zip(*wall), color="k", lw=3)
            ax.set_xlim(-7, 7)
            ax.set_ylim(-7, 7)
            ax.set_aspect("equal")
            ax.set_title(f"{algorithm.upper()} seed {seed}{' + obstacle' if obstacle else ''}: {distinct} goals")
        for k, state in enumerate(PROBE_STATES):
            ax = land_axes[column, k]
            ax.contourf(grid, grid, q_landscape(agent, algorithm, state, grid), levels=30, cmap="viridis")
            ax.scatter(samples[k, :, 0], samples[k, :, 1], color="w", s=8, edgecolors="k", linewidths=0.3)
            ax.set_title(f"{algorithm.upper()} s={state}\nH={entropy[k]:.2f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(args.out / f"trajectories_{args.layout}.png", dpi=100)
    land_fig.tight_layout()
    land_fig.savefig(args.out / f"landscape_{args.layout}.png", dpi=100)
    (args.out / f"results_{args.layout}.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
