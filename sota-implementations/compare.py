"""Run S2AC, SAC (and SQL) on the same task and budget, then draw their learning curves.

    python sota-implementations/compare.py --env hopper --frames 40000 --seeds 0 --out results/hopper

Each run is the ordinary training script (s2ac.py / sac.py / sql.py) with the same
overrides; the algorithms run side by side (``--algorithms``, default S2AC and SAC). Runs
already finished in ``--out`` are reused (``--plot-only`` skips training).
Writes ``curves.png`` and ``results.md`` (final evaluation return and
wall-clock time per run) into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

ALGORITHMS = ("s2ac", "sac", "sql")
COLORS = {"s2ac": "tab:red", "sac": "tab:blue", "sql": "tab:green"}


def run_dir(out: Path, algorithm: str, seed: int) -> Path:
    return out / "runs" / f"{algorithm}_seed{seed}"


def launch(args, algorithm: str, seed: int) -> subprocess.Popen | None:
    directory = run_dir(args.out, algorithm, seed)
    if (directory / "metrics.jsonl").exists() and any(r.get("final") for r in read(directory)):
        return None
    overrides = [
        f"env={args.env}",
        f"seed={seed}",
        f"collector.total_frames={args.frames}",
        f"logger.eval_every_frames={args.eval_every}",
        f"logger.eval_episodes={args.eval_episodes}",
        f"checkpoint.every_frames={args.frames // 4}",
        f"num_threads={args.threads}",
        f"hydra.run.dir={directory}",
        *args.overrides,
    ]
    resume = directory / "checkpoints" / "last.pt"
    if resume.exists():
        overrides.append(f"resume={resume}")
    log = (args.out / "runs" / f"{algorithm}_seed{seed}.log").open("a")
    return subprocess.Popen([sys.executable, str(HERE / f"{algorithm}.py"), *overrides], stdout=log, stderr=log)


def read(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_and_tabulate(args) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    for algorithm in args.algorithms:
        color = COLORS[algorithm]
        for seed in args.seeds:
            records = read(run_dir(args.out, algorithm, seed))
            if not records:
                continue
            label = f"{algorithm.upper()} seed {seed}"
            evals = [(r["frames"], r["eval/return"]) for r in records if "eval/return" in r]
            train = [(r["frames"], r["train/episode_return"]) for r in records if "train/episode_return" in r]
            if evals:
                axes[0].plot(*zip(*evals), color=color, marker="o", ms=3, label=label)
            if train:
                axes[1].plot(*zip(*train), color=color, alpha=0.8, label=label)
            final = [r for r in records if r.get("final")]
            if final:
                rows.append(
                    (
                        algorithm.upper(),
                        seed,
                        final[-1]["frames"],
                        final[-1]["eval/return"],
                        final[-1].get("eval/return_std", float("nan")),
                        final[-1]["elapsed_s"] / 60,
                    )
                )
    for ax, title in zip(axes, ("evaluation return (deterministic selection)", "training episode return")):
        ax.set_title(f"{args.env}: {title}")
        ax.set_xlabel("environment frames")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)
    lines = [
        "| algorithm | seed | frames | final eval return (mean ± std over episodes) | wall-clock (min) |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {a} | {s} | {f} | {r:.1f} ± {sd:.1f} | {t:.1f} |" for a, s, f, r, sd, t in rows],
    ]
    for algorithm in args.algorithms:
        finals = [r[3] for r in rows if r[0] == algorithm.upper()]
        if len(finals) > 1:
            lines.append(
                f"| {algorithm.upper()} mean over seeds | | | {np.mean(finals):.1f} ± {np.std(finals):.1f} | |"
            )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="hopper", help="env config group (sota-implementations/config/env)")
    parser.add_argument("--frames", type=int, default=40_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-every", type=int, default=5_000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/hopper"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--algorithms", nargs="+", default=["s2ac", "sac"], choices=ALGORITHMS)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every script")
    args = parser.parse_args()
    args.out = args.out.resolve()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        harness.train_side_by_side(functools.partial(launch, args), args.algorithms, args.seeds, args.out / "runs")
    plot_and_tabulate(args)


if __name__ == "__main__":
    main()
