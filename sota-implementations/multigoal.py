"""The paper's multi-goal experiment, read from finished runs: goals, trajectories, entropies, Q landscapes.

Train with hydra multirun (experiment/multigoal_<algorithm>.yaml hold each algorithm's settings), then report:

    python sota-implementations/s2ac.py -m +experiment=multigoal_s2ac env.layout=three_goals seed=0,1,2,3,4
    python sota-implementations/sac.py -m +experiment=multigoal_sac env.layout=three_goals seed=0,1,2,3,4
    python sota-implementations/sql.py -m +experiment=multigoal_sql env.layout=three_goals seed=0,1,2,3,4
    python sota-implementations/multigoal.py multirun/*/MultiGoal --layout three_goals --out results/multigoal

Per run (any directory with ``metrics.jsonl``, ``.hydra/`` and ``checkpoints/latest`` under the given
paths, for the chosen layout), plays 20 test episodes with the stochastic (training) action selection,
with and without the layout's obstacle. S2AC runs that trained the amortized sampler are also tested
with it ("S2AC-amortized": one network pass per action, no SVGD); S2AC with a learned q0 is labelled
"S2AC-learned-q0". Writes into ``--out``:

- ``results_<layout>.md``: per run, distinct goals reached, hit fraction per goal,
  mean return, acting time, and the entropy at the probe states two ways: the
  algorithm's own estimate (S2AC: closed-form Stein log-density of the particles;
  SAC: Monte Carlo -E[log pi] of its tanh-Gaussian; SQL and S2AC-amortized have no
  density) and the Kozachenko-Leonenko k-NN estimate from 1000 actions, the same
  estimator for every policy. Then a summary over seeds.
- ``trajectories_<layout>.png``: the test trajectories over the goal map;
- ``landscape_<layout>.png``: min_k Q(s, .) over the action square at the probe
  states (first seed), with 100 of the policy's actions on top.

Goal coverage against training frames (``eval/goals_reached``, logged at every evaluation) is in
``report.py --metric eval/goals_reached``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from torchrl.envs.utils import ExplorationType, set_exploration_type  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import checkpoint  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402

from torchrl_s2ac import knn_entropy  # noqa: E402
from torchrl_s2ac.envs import LAYOUTS, OBSTACLES, PROBE_STATES, MultiGoalEnv, goal_hits, until_first_done  # noqa: E402

TEST_EPISODES = 20
PROBE_ACTIONS = 1000


@dataclasses.dataclass
class MultiGoalRun:
    directory: Path
    algorithm: str
    seed: int
    cfg: DictConfig

    @property
    def label(self) -> str:
        if self.algorithm == "s2ac" and self.cfg.s2ac.fixed_init_std is None:
            return "S2AC-learned-q0"
        return self.algorithm.upper()


def discover(paths: list[Path], layout: str) -> list[MultiGoalRun]:
    """The finished multi-goal runs of ``layout`` under ``paths``."""
    runs = []
    for directory in report.find_runs(paths):
        cfg = OmegaConf.load(directory / ".hydra" / "config.yaml")
        if cfg.env.library != "multigoal" or cfg.env.layout != layout:
            continue
        if not (directory / "checkpoints" / checkpoint.POINTER).is_file():
            continue
        algorithm = OmegaConf.load(directory / ".hydra" / "hydra.yaml").hydra.job.name
        runs.append(MultiGoalRun(directory, algorithm, int(cfg.get("seed", cfg.env.get("seed", 0))), cfg))
    return sorted(runs, key=lambda r: (r.label, r.seed))


def load_agent(run: MultiGoalRun):
    OmegaConf.update(run.cfg, "network.device", "cpu", force_add=True)  # the report runs on the CPU, as its envs
    agent = importlib.import_module(run.algorithm).make_agent(run.cfg, harness.env_specs(run.cfg))
    checkpoint.load_weights(run.directory / "checkpoints", agent.loss)
    return agent


def policies(agent, run: MultiGoalRun) -> dict:
    """The policies to test from one run: S2AC gives two (SVGD particles, amortized sampler)."""
    found = {run.label: agent.policy}
    if run.algorithm == "s2ac" and agent.policy.amortized_sampler is not None:
        found[f"{run.label}-amortized"] = agent.policy.amortized_sampler
    return found


@torch.no_grad()
def test_episodes(policy, cfg: DictConfig, obstacle: bool):
    env = MultiGoalEnv(**{**harness.multigoal_kwargs(cfg), "obstacle": obstacle}, batch_size=(TEST_EPISODES,))
    start = time.perf_counter()
    with set_exploration_type(ExplorationType.RANDOM):
        rollout = env.rollout(cfg.env.max_episode_steps, policy, break_when_any_done=False)
    seconds = time.perf_counter() - start
    alive = until_first_done(rollout)
    returns = (rollout["next", "reward"].squeeze(-1) * alive).sum(-1)
    hits = goal_hits(env.goals, rollout).float().mean(0)
    paths = torch.cat([rollout["observation"][:, :1], rollout["next", "observation"]], 1)
    return {
        "returns": returns,
        "hits": hits,
        "paths": paths,
        "alive": alive,
        "ms_per_step": 1000 * seconds / rollout.shape[-1],
    }


@torch.no_grad()
def probe_actions(agent, label: str):
    """``PROBE_ACTIONS`` actions per probe state ``[P, n, 2]`` and the policy's own entropy estimate (or None)."""
    obs = torch.tensor(PROBE_STATES)
    if label.startswith("S2AC") and not label.endswith("amortized"):
        actor = agent.policy
        repeats = PROBE_ACTIONS // actor.num_particles
        sample = actor.sample_particles(obs.repeat_interleave(repeats, 0))
        actions = sample.action.reshape(len(obs), repeats * actor.num_particles, 2)
        return actions, -sample.log_prob.reshape(len(obs), -1).mean(-1)
    if label == "SAC":
        dist = agent.policy.get_dist(TensorDict({"observation": obs}, [len(obs)]))
        actions = dist.sample((PROBE_ACTIONS,))
        return actions.transpose(0, 1), -dist.log_prob(actions).mean(0)
    sampler = agent.policy if label == "SQL" else agent.policy.amortized_sampler
    return sampler.sample(obs, PROBE_ACTIONS).action, None


@torch.no_grad()
def q_landscape(agent, algorithm: str, state, grid):
    """min_k Q(state, a) over the action grid."""
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
    parser.add_argument("paths", type=Path, nargs="+", help="run directories or folders holding them")
    parser.add_argument("--layout", default="three_goals", choices=sorted(LAYOUTS))
    parser.add_argument("--out", type=Path, default=Path("results/multigoal"))
    args = parser.parse_args()
    runs = discover(args.paths, args.layout)
    if not runs:
        raise SystemExit(f"No finished {args.layout} multi-goal runs under {[str(p) for p in args.paths]}.")
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({run.seed for run in runs})
    goals, wall = LAYOUTS[args.layout], OBSTACLES[args.layout]
    lines = [
        f"# Multi-goal ({args.layout})",
        "",
        f"Runs: {', '.join(f'`{os.path.relpath(run.directory)}`' for run in runs)}.",
        "",
        f"Probe states: {list(PROBE_STATES)}. Entropy columns: the policy's own estimate (S2AC closed form, "
        f"SAC Monte Carlo; SQL and S2AC-amortized have none) / the k-NN estimate from {PROBE_ACTIONS} actions.",
        "",
        "| policy | seed | frames | obstacle | distinct goals | hit fraction per goal | mean return | acting ms/step "
        "| own entropy estimate | k-NN entropy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    agents = {id(run): load_agent(run) for run in runs}
    labels = sorted({label for run in runs for label in policies(agents[id(run)], run)})
    columns = [(seed, obstacle) for seed in seeds for obstacle in (False, True)]
    fig, axes = plt.subplots(len(labels), len(columns), figsize=(3.2 * len(columns), 3.2 * len(labels)), squeeze=False)
    land_fig, land_axes = plt.subplots(
        len(labels), len(PROBE_STATES), figsize=(2.6 * len(PROBE_STATES), 2.8 * len(labels)), squeeze=False
    )
    grid = torch.linspace(-1, 1, 61)
    summary: dict[tuple[str, bool], list[tuple[int, float]]] = {}
    probe_entropy: dict[str, list[float]] = {}
    estimate_gap: dict[str, list[torch.Tensor]] = {}  # own estimate - k-NN, per probe state and run
    init_std: list[str] = []
    landscape_drawn: set[str] = set()
    for run in runs:
        agent = agents[id(run)]
        for label, policy in policies(agent, run).items():
            torch.manual_seed(run.seed)  # the same test noise on every report of this run
            row = labels.index(label)
            actions, own = probe_actions(agent, label)
            knn = knn_entropy(actions.double())
            probe_entropy.setdefault(label, []).append(knn.mean().item())
            if own is not None:
                estimate_gap.setdefault(label, []).append(own - knn)
            if label == run.label and run.algorithm == "s2ac":
                _, scale = agent.policy.init_distribution(torch.tensor(PROBE_STATES))
                init_std.append(f"{label} seed {run.seed}: {scale.min():.2f}-{scale.max():.2f}")
            for obstacle in (False, True):
                result = test_episodes(policy, run.cfg, obstacle)
                distinct = int((result["hits"] > 0).sum())
                summary.setdefault((label, obstacle), []).append((distinct, result["returns"].mean().item()))
                lines.append(
                    f"| {label} | {run.seed} | {run.cfg.collector.total_frames} | {'yes' if obstacle else 'no'} | "
                    f"{distinct}/{len(goals)} | {fmt(result['hits'].tolist())} | {result['returns'].mean():.1f} | "
                    f"{result['ms_per_step']:.2f} | {fmt(own.tolist()) if own is not None else '-'} | "
                    f"{fmt(knn.tolist())} |"
                )
                ax = axes[row, columns.index((run.seed, obstacle))]
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
                ax.set_title(f"{label} s{run.seed}{' +wall' if obstacle else ''}: {distinct} goals", fontsize=9)
            if label in landscape_drawn:  # the first seed of each policy
                continue
            landscape_drawn.add(label)
            for k, state in enumerate(PROBE_STATES):
                ax = land_axes[row, k]
                ax.contourf(grid, grid, q_landscape(agent, run.algorithm, state, grid), levels=30, cmap="viridis")
                ax.scatter(actions[k, :100, 0], actions[k, :100, 1], color="w", s=8, edgecolors="k", linewidths=0.3)
                ax.set_title(f"{label} s={state}\nk-NN H={knn[k]:.2f}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
    lines += [
        "",
        f"## Summary over seeds {seeds} (mean ± std)",
        "",
        "| policy | obstacle | runs | distinct goals | mean return | k-NN entropy, mean over probe states |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (label, obstacle), values in sorted(summary.items()):
        distinct, returns = np.array(values).T
        entropy = np.array(probe_entropy[label])
        lines.append(
            f"| {label} | {'yes' if obstacle else 'no'} | {len(values)} | "
            f"{distinct.mean():.2f} ± {distinct.std():.2f} / {len(goals)} | "
            f"{returns.mean():.1f} ± {returns.std():.1f} | {entropy.mean():.2f} ± {entropy.std():.2f} |"
        )
    lines.append("")
    for label, gaps in estimate_gap.items():
        gap = torch.cat(gaps)
        lines.append(
            f"- {label}: own entropy estimate minus k-NN estimate over probe states and seeds: mean {gap.mean():.2f}, "
            f"range {gap.min():.2f} to {gap.max():.2f} nats."
        )
    if init_std:
        lines.append(f"- S2AC q0 standard deviation at the probe states (min-max): {'; '.join(init_std)}.")
    fig.tight_layout()
    fig.savefig(args.out / f"trajectories_{args.layout}.png", dpi=80)
    land_fig.tight_layout()
    land_fig.savefig(args.out / f"landscape_{args.layout}.png", dpi=80)
    (args.out / f"results_{args.layout}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
