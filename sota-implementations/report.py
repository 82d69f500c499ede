r"""Report over training runs: scores per run, aggregates with bootstrap confidence intervals, learning curves.

    python sota-implementations/report.py results/hopper_100k --out results/hopper_100k/report
    python sota-implementations/report.py multirun/s2ac/Hopper-v5/2026-* --by s2ac.max_step_ratio --out ablation
    python sota-implementations/report.py results/multigoal_sql_haarnoja --metric eval/goals_reached
    python sota-implementations/report.py results/hopper_ablations results/hopper_100k/sac --at-frames 30000
    python sota-implementations/report.py results/hopper_100k --metric train/episode_return --final-window 10000
    python sota-implementations/report.py results/multigoal_temperature/four_goals --metric eval/goals_reached \
        --across alpha

A run is any directory holding ``metrics.jsonl`` and ``.hydra/`` (a hydra run or multirun job, here or
on a cluster); the paths given are searched recursively. Runs are grouped by task (``env.name``, plus
the layout for the multi-goal task) and label (the algorithm, plus the values of the ``--by`` config
keys that differ from the algorithm's most common ones), so ablations and baselines can be reported
from the same directories.

Per run: the final score (the ``final`` evaluation at the end of training, or with ``--final-window N`` the
metric's mean over the last N frames, for metrics logged while training; runs that have not
finished are listed but left out of the statistics) and the area under the learning curve (the
trapezoid mean of the evaluation curve over frames, i.e. the average score during training).
Per task and label: mean and interquartile mean (IQM) with 95% stratified-bootstrap confidence
intervals, and the probability of improvement of each reference label over every other label
(Agarwal et al. 2021, via ``rliable``). A verdict is "better" when the whole 95% interval of the
probability of improvement lies above 0.5, "worse" when it lies below, "not distinguishable" otherwise,
and none is given while either label has fewer than 3 finished runs. The same pairs matched by seed:
the per-seed differences of the final scores and the exact sign-flip test of a zero mean difference
(``scipy.stats.permutation_test``), which removes what a seed contributes to both runs.
Runs of a task with different budgets (``collector.total_frames``) are reported as separate tasks;
``--at-frames N`` instead scores every run planned for at least N frames at N: its evaluation at exactly
N frames (runs are evaluated every ``logger.eval_every_frames``), so that longer runs serve as baselines
at a shorter budget. ``--across NAME`` compares the runs at each value of a setting swept over every
algorithm (``alpha``: each algorithm's temperature), and plots every label's final score against it. Writes
``report.md`` and one ``curves_<task>.png`` (mean with a 95% bootstrap band) per task, and with
``--diagnostics KEY ...`` a ``diagnostics_<task>.png`` of those training metrics (e.g. S2AC's
``train/init_scale_min``, ``train/svgd_step_ratio``, ``train/entropy``) for every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics  # noqa: E402
from scipy import stats  # noqa: E402

import metrics_log  # noqa: E402


@dataclasses.dataclass
class Run:
    directory: Path
    algorithm: str
    task: str
    label: str
    seed: int
    frames: np.ndarray  # evaluation points
    scores: np.ndarray  # the metric at those points
    final: float | None  # the end-of-training evaluation; None while the run has not finished
    total_frames: int
    records: list[dict]  # every metrics.jsonl record (training diagnostics included)
    settings: tuple[tuple[str, str], ...] = ()  # the --by keys the run has, with their values
    across: float | str | None = None  # its value of the --across setting

    @property
    def auc(self) -> float:
        """Average score over the evaluated span of training (trapezoid rule over frames)."""
        if len(self.frames) < 2:
            return float(self.scores[0]) if len(self.scores) else float("nan")
        return float(np.trapezoid(self.scores, self.frames) / (self.frames[-1] - self.frames[0]))

    @property
    def cost(self) -> tuple[float, float] | None:
        """Wall-clock hours the run has trained (the harness's ``elapsed_s``, summed over resumes) and its
        frames per second over them; ``None`` for records without times."""
        timed = [r for r in self.records if "elapsed_s" in r and r["elapsed_s"] > 0]
        if not timed:
            return None
        return timed[-1]["elapsed_s"] / 3600, timed[-1]["frames"] / timed[-1]["elapsed_s"]


def find_runs(paths: list[Path]) -> list[Path]:
    found = set()
    for path in paths:
        for metrics_file in [path / "metrics.jsonl", *path.rglob("metrics.jsonl")]:
            if metrics_file.is_file() and (metrics_file.parent / ".hydra" / "config.yaml").is_file():
                found.add(metrics_file.parent.resolve())
    return sorted(found)


# Options added after runs were recorded, with the value that reproduces what the scripts did before they existed:
# a run whose saved config lacks one is labelled with it, and groups with the runs that set it explicitly.
OPTIONS_ADDED = {"s2ac.score_dtype": None, "s2ac.compile": False, "s2ac.amortized": False, "s2ac.init_std_min": 0.1}


def load_run(
    directory: Path, metric: str, by: list[str], final_window: int | None = None, across: str | None = None
) -> Run | None:
    """The run in ``directory`` scored by ``metric``. Its final score is the end-of-training evaluation, or with
    ``final_window`` the mean of ``metric`` over the records of the last ``final_window`` frames of a run that
    reached its budget (for metrics logged while training, such as ``train/episode_return``). ``across`` names a
    setting swept over algorithms: the run's ``<algorithm>.<across>`` (``alpha``: ``sac.alpha`` for SAC), or else
    the config key ``across`` itself (``env.goal_radius``)."""
    cfg = OmegaConf.load(directory / ".hydra" / "config.yaml")
    algorithm = OmegaConf.load(directory / ".hydra" / "hydra.yaml").hydra.job.name
    records = metrics_log.read_records(directory / "metrics.jsonl")
    budget = int(cfg.collector.total_frames)
    evals = {r["frames"]: r[metric] for r in records if metric in r and not r.get("final")}
    finals = [r[metric] for r in metrics_log.finals(records, budget) if metric in r]
    if final_window is not None:
        reached = max((r["frames"] for r in records), default=0) >= budget
        window = [value for frames, value in evals.items() if frames > budget - final_window]
        finals = [float(np.mean(window))] if reached and window else []
    if not evals and not finals:
        return None
    task = cfg.env.name + (f"-{cfg.env.layout}" if cfg.env.get("layout") else "")
    label = algorithm.upper()
    variant = []
    for key in by:
        value = OmegaConf.select(cfg, key, default=KeyError)
        if value is KeyError and key in OPTIONS_ADDED and key.split(".")[0] in cfg:
            value = OPTIONS_ADDED[key]
        if value is not KeyError:
            variant.append(f"{key}={value}")
    if variant:  # keys an algorithm does not have (e.g. s2ac.* for SAC) do not split its runs
        label += " " + ",".join(variant)
    value = None
    if across is not None:
        value = OmegaConf.select(cfg, f"{algorithm}.{across}", default=OmegaConf.select(cfg, across, default=KeyError))
        if value is KeyError:
            raise SystemExit(f"--across={across}: {directory} has neither {algorithm}.{across} nor {across}.")
    frames = np.array(sorted(evals), dtype=float)
    return Run(
        directory=directory,
        algorithm=algorithm,
        task=task,
        label=label,
        seed=int(cfg.get("seed", cfg.env.get("seed", 0))),
        frames=frames,
        scores=np.array([evals[f] for f in sorted(evals)], dtype=float),
        final=finals[-1] if finals else None,
        total_frames=budget,
        records=records,
        settings=tuple(tuple(entry.split("=", 1)) for entry in variant),
        across=value,
    )


def compact_labels(runs: list[Run]) -> tuple[list[Run], dict[str, str]]:
    """Labels that show only how a run differs from its algorithm's most common value of each ``--by`` key
    (``S2AC kernel_rule=mean``; the runs at every common value are plain ``S2AC``), and those common settings
    per algorithm. The algorithm's own prefix is dropped from the keys (``s2ac.kernel_rule`` -> ``kernel_rule``)."""
    values = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for key, value in run.settings:
            values[run.algorithm][key].append(value)
    common = {
        algorithm: {key: max(sorted(set(seen)), key=seen.count) for key, seen in keys.items()}  # ties: first sorted
        for algorithm, keys in values.items()
    }

    def short(algorithm: str, key: str) -> str:
        return key.removeprefix(f"{algorithm}.")

    relabelled = []
    for run in runs:
        differs = [f"{short(run.algorithm, k)}={v}" for k, v in run.settings if v != common[run.algorithm][k]]
        label = run.algorithm.upper() + (" " + ",".join(differs) if differs else "")
        relabelled.append(dataclasses.replace(run, label=label))
    described = {
        algorithm.upper(): ", ".join(f"{short(algorithm, k)}={v}" for k, v in settings.items())
        for algorithm, settings in common.items()
        if settings
    }
    return relabelled, described


def at_budget(run: Run, frames: int, final_window: int | None = None) -> Run | None:
    """``run`` as if trained for ``frames`` frames: its curve up to there, and as its final score the evaluation
    at exactly that frame count (the end-of-training one for a run of that length; a periodic one for a longer
    run, whose first ``frames`` frames are the same training), or with ``final_window`` the mean of its
    evaluations over the last ``final_window`` of those frames. ``None`` for a run planned shorter."""
    if run.total_frames < frames:
        return None
    keep = run.frames <= frames
    if run.total_frames == frames:
        final = run.final
    elif final_window is not None:
        window = keep & (run.frames > frames - final_window)
        final = float(run.scores[window].mean()) if (run.frames == frames).any() else None  # in the window
    else:
        final = float(run.scores[run.frames == frames][0]) if (run.frames == frames).any() else None
    records = [
        r for r in run.records if r.get("frames", 0) <= frames and not (r.get("final") and run.total_frames > frames)
    ]
    return dataclasses.replace(
        run, frames=run.frames[keep], scores=run.scores[keep], final=final, total_frames=frames, records=records
    )


def split_budgets(runs: list[Run]) -> list[Run]:
    """Runs of one task with different ``collector.total_frames`` are reported as separate tasks (one per
    budget): a final score is only compared with final scores at the same budget (or use ``--at-frames``)."""
    budgets = defaultdict(set)
    for run in runs:
        budgets[run.task].add(run.total_frames)
    return [
        dataclasses.replace(run, task=f"{run.task}, {run.total_frames:,} frames") if len(budgets[run.task]) > 1 else run
        for run in runs
    ]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value) -> str:
    """An ``--across`` value as labels show it (``1.0`` -> ``1``)."""
    return f"{value:g}" if is_number(value) else str(value)


def split_across(runs: list[Run], name: str) -> list[Run]:
    """Each value of the ``--across`` setting as its own task (``MultiGoal-four_goals, alpha=1``), so that runs
    are compared only with runs at the same value."""
    return [dataclasses.replace(run, task=f"{run.task}, {name}={shown(run.across)}") for run in runs]


def slug(task: str) -> str:
    """``task`` as a file-name part (``Hopper-v5, 30,000 frames`` -> ``Hopper-v5_30000_frames``)."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_-]", "_", task.replace(",", ""))).strip("_")


def interval(scores: dict[str, np.ndarray], function, reps: int) -> tuple[dict, dict]:
    """Point estimates and 95% stratified-bootstrap intervals of ``function`` for each entry of ``scores``; each
    entry's resampling is seeded on its own, so an entry's interval is the same in every report that holds its runs.

    rliable draws its resampling indices from numpy's global generator (``np.random.choice``) and hands
    ``random_state`` (deprecated by its ``arch`` backend) to the rest: both are seeded here, and numpy's global
    state is put back afterwards."""
    points, intervals = {}, {}
    global_state = np.random.get_state()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
            for key, entry in scores.items():
                np.random.seed(0)
                point, ci = rly.get_interval_estimates(
                    {key: entry},
                    function,
                    reps=reps,
                    confidence_interval_size=0.95,
                    random_state=np.random.RandomState(0),
                )
                points.update(point)
                intervals.update(ci)
    finally:
        np.random.set_state(global_state)
    return points, intervals


def aggregates(runs: list[Run], reps: int) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per label: ``{"mean" | "iqm" | "auc mean": (estimate, low, high)}`` over the finished runs."""
    table: dict[str, dict] = {}
    by_label = defaultdict(list)
    for run in runs:
        if run.final is not None:
            by_label[run.label].append(run)
    for label, group in by_label.items():
        final = np.array([[r.final] for r in group])
        auc = np.array([[r.auc] for r in group])
        point, ci = interval(
            {"f": final}, lambda x: np.array([metrics.aggregate_mean(x), metrics.aggregate_iqm(x)]), reps
        )
        auc_point, auc_ci = interval({"a": auc}, lambda x: np.array([metrics.aggregate_mean(x)]), reps)
        table[label] = {
            "n": len(group),
            "mean": (point["f"][0], *ci["f"][:, 0]),
            "iqm": (point["f"][1], *ci["f"][:, 1]),
            "auc mean": (auc_point["a"][0], *auc_ci["a"][:, 0]),
        }
    return table


def finals_by_label(runs: list[Run]) -> dict[str, list[tuple[int, float]]]:
    """``{label: [(seed, final score), ...]}`` over the finished runs."""
    finals = defaultdict(list)
    for run in runs:
        if run.final is not None:
            finals[run.label].append((run.seed, run.final))
    return finals


def reference_pairs(labels, references: list[str]) -> list[tuple[str, str]]:
    """(reference, other) label pairs: a reference names a label exactly, or else every label it begins."""
    is_reference = {
        label: any(label == r or (r not in labels and label.startswith(r)) for r in references) for label in labels
    }
    return [(x, y) for x in labels if is_reference[x] for y in labels if not is_reference[y]]


def improvements(runs: list[Run], references: list[str], reps: int) -> list[tuple[str, str, float, float, float]]:
    """P(reference > other) on final scores, with its 95% interval, for every reference/other pair."""
    finals = finals_by_label(runs)
    rows = []
    for reference, other in reference_pairs(finals, references):
        x, y = (np.array([score for _, score in finals[label]])[:, None] for label in (reference, other))
        point, ci = interval({"p": (x, y)}, metrics.probability_of_improvement, reps)
        rows.append((reference, other, float(point["p"]), *map(float, ci["p"][:, 0])))
    return rows


def paired_differences(runs: list[Run], references: list[str]) -> list[tuple[str, str, list[int], np.ndarray, float]]:
    """Per reference/other pair, the seeds both finished, the final-score differences ``x_s - y_s`` at those
    seeds, and the exact two-sided p-value of the sign-flip test of a zero mean difference.

    Runs with the same seed share the training environments' random streams and (runs from 2026-12-06 on) the
    evaluation episodes, so differencing them removes what the seed alone contributes. Under the null hypothesis
    each difference is as likely negated; the test enumerates all ``2^n`` sign patterns
    (``scipy.stats.permutation_test``), so with ``n`` seeds no p-value is below ``2 / 2^n``.
    A seed with more than one run in either label pairs ambiguously and is left out.
    """
    by_seed = {}
    for label, scores in finals_by_label(runs).items():
        runs_per_seed = Counter(seed for seed, _ in scores)
        by_seed[label] = {seed: score for seed, score in scores if runs_per_seed[seed] == 1}
    rows = []
    for reference, other in reference_pairs(by_seed, references):
        seeds = sorted(set(by_seed[reference]) & set(by_seed[other]))
        if not seeds:
            continue
        x, y = (np.array([by_seed[label][s] for s in seeds]) for label in (reference, other))
        if len(seeds) == 1:  # both sign patterns are as extreme as the one seen (scipy wants two seeds)
            rows.append((reference, other, seeds, x - y, 1.0))
            continue
        test = stats.permutation_test(
            (x, y),
            lambda a, b, axis: np.mean(a - b, axis=axis),
            permutation_type="samples",  # swaps x_s and y_s within a seed: flips the sign of its difference
            n_resamples=np.inf,
            vectorized=True,
        )
        rows.append((reference, other, seeds, x - y, float(test.pvalue)))
    return rows


MIN_RUNS = 3  # fewer finished runs per label than this: the bootstrap interval is degenerate, no verdict


def verdict(low: float, high: float) -> str:
    return "better" if low > 0.5 else "worse" if high < 0.5 else "not distinguishable"


def save_figure(fig, title: str, xlabel: str, ylabel: str, path: Path) -> Path:
    """Titles, labels, a grid and a legend on ``fig``'s single axes, then the figure written to ``path``."""
    ax = fig.axes[0]
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def finished_curves(runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation points all finished runs share, and each finished run's scores there, ``[runs, points]``
    (empty when none finished): an unfinished run neither shortens nor enters the mean curve."""
    finished = [r for r in runs if r.final is not None]
    if not finished:
        return np.array([]), np.empty((0, 0))
    grid = np.array(sorted(set.intersection(*(set(r.frames.tolist()) for r in finished))))
    return grid, np.stack([np.interp(grid, r.frames, r.scores) for r in finished])


def plot_curves(task: str, runs: list[Run], metric: str, out: Path, reps: int) -> Path:
    """Per label the mean curve and its 95% bootstrap band over the finished runs (those the tables aggregate),
    at the evaluation points they share; each unfinished run as a thin dashed line of the same colour."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_label = defaultdict(list)
    for run in runs:
        by_label[run.label].append(run)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    for (label, group), color in zip(sorted(by_label.items()), colors):
        grid, curves = finished_curves(group)
        unfinished = [r for r in group if r.final is None]
        for k, run in enumerate(unfinished):
            name = f"{label} ({len(unfinished)} unfinished)" if not len(grid) and k == 0 else None
            ax.plot(run.frames, run.scores, color=color, lw=0.8, ls="--", alpha=0.6, label=name)
        if not len(grid):
            continue
        if len(curves) > 1:
            point, ci = interval({"c": curves}, lambda x: x.mean(0), reps)
            mean, low, high = point["c"], ci["c"][0], ci["c"][1]
            ax.fill_between(grid, low, high, color=color, alpha=0.2)
        else:
            mean = curves[0]
        count = f"n={len(curves)}" + (f", +{len(unfinished)} unfinished" if unfinished else "")
        ax.plot(grid, mean, color=color, label=f"{label} ({count})")
    return save_figure(
        fig,
        f"{task}: {metric} (mean, 95% bootstrap CI over seeds)",
        "environment frames",
        metric,
        out / f"curves_{slug(task)}.png",
    )


def plot_diagnostics(task: str, runs: list[Run], keys: list[str], out: Path) -> Path:
    """One panel per logged training metric: every run as a thin line, the mean over a label's runs bold."""
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    axes = axes.reshape(1, -1)  # the panels in reading order
    colors = dict(zip(sorted({r.label for r in runs}), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10))
    for ax, key in zip(axes[0], keys):
        for label, color in colors.items():
            series = []
            for run in (r for r in runs if r.label == label):
                points = [(r["frames"], r[key]) for r in run.records if key in r and not r.get("final")]
                if points:
                    frames, values = map(np.array, zip(*points))
                    ax.plot(frames, values, color=color, alpha=0.3, lw=0.8)
                    series.append((frames, values))
            if series:
                # the mean at each logged frame over the runs that reached it (unfinished runs end early)
                grid = np.array(sorted(set().union(*(set(f.tolist()) for f, _ in series))))
                mean = [np.mean([np.interp(x, f, v) for f, v in series if f[0] <= x <= f[-1]]) for x in grid]
                ax.plot(grid, mean, color=color, lw=2, label=f"{label} (n={len(series)})")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("environment frames")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center", ncol=min(len(handles), 4))
    fig.suptitle(f"{task}: training diagnostics")
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))  # room for the legend below
    path = out / f"diagnostics_{slug(task)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(estimate: tuple[float, float, float]) -> str:
    return f"{estimate[0]:.1f} [{estimate[1]:.1f}, {estimate[2]:.1f}]"


def across_section(runs: list[Run], name: str, metric: str, out: Path, reps: int) -> list[str]:
    """Per task, the final score's mean and 95% interval of every label at each value of the ``--across``
    setting: a table (values down, labels across) and a figure of the means against the values (a log axis for
    positive numbers spanning a factor of 10 or more; evenly spaced categories otherwise)."""
    lines = []
    for task in sorted({r.task for r in runs}):
        task_runs = [r for r in runs if r.task == task]
        values = {r.across for r in task_runs}
        numeric = all(map(is_number, values))
        values = sorted(values) if numeric else sorted(values, key=str)
        position = {v: float(v) if numeric else float(i) for i, v in enumerate(values)}
        labels = sorted({r.label for r in task_runs})
        table = {v: aggregates([r for r in task_runs if r.across == v], reps) for v in values}
        lines += [f"## {task}: final `{metric}` across `{name}`", "", f"| {name} | " + " | ".join(labels) + " |"]
        lines.append("| --- |" + " --- |" * len(labels))
        for v in values:
            cells = (
                f"{fmt(table[v][label]['mean'])} (n={table[v][label]['n']})" if label in table[v] else ""
                for label in labels
            )
            lines.append(f"| {shown(v)} | " + " | ".join(cells) + " |")
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        log = numeric and min(values) > 0 and max(values) >= 10 * min(values)
        for k, label in enumerate(labels):
            at = [v for v in values if label in table[v]]
            mean, low, high = (np.array([table[v][label]["mean"][i] for v in at]) for i in range(3))
            offset = 0.04 * (k - (len(labels) - 1) / 2)  # side by side, so overlapping intervals stay readable
            x = np.array([position[v] for v in at])
            x = x * np.exp(offset) if log else x + offset * (np.ptp(list(position.values())) or 1)
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=label)
        if log:
            ax.set_xscale("log")
        ax.set_xticks([position[v] for v in values], [shown(v) for v in values])
        ax.minorticks_off()
        path = save_figure(
            fig,
            f"{task}: mean, 95% bootstrap CI over seeds",
            name,
            f"final {metric}",
            out / f"across_{slug(name)}_{slug(task)}.png",
        )
        lines += ["", f"![{task} across {name}]({path.name})", ""]
    return lines


def report(
    runs: list[Run],
    metric: str,
    references: list[str],
    out: Path,
    reps: int,
    diagnostics=(),
    common=None,
    final_window: int | None = None,
    across: str | None = None,
) -> str:
    lines = [f"# Report: `{metric}`", ""]
    final = (
        "the end-of-training evaluation"
        if final_window is None
        else f"the mean of `{metric}` over each run's last {final_window:,} frames"
    )
    lines += [
        f"Final: {final}; AUC: average over the evaluation curve. Brackets: 95% "
        f"stratified-bootstrap confidence intervals ({reps} resamples, `rliable`). Unfinished runs are listed "
        "but not aggregated. Paired by seed: the differences between runs with the same seed (which share the "
        "training environments' random streams, and from 2026-12-06 on the evaluation episodes), and the exact "
        "two-sided sign-flip test of a zero mean difference; with n seeds its p-value cannot fall below 2 / 2^n "
        "(0.25 at 3 seeds, 0.06 at 5).",
        "",
    ]
    for algorithm, settings in (common or {}).items():
        lines += [f"{algorithm} labels name only what differs from its most common settings: {settings}.", ""]
    if across is not None:
        lines += across_section(runs, across, metric, out, reps)
        runs = split_across(runs, across)
    for task in sorted({r.task for r in runs}):
        task_runs = [r for r in runs if r.task == task]
        lines += [
            f"## {task}",
            "",
            "| label | n | final: mean | final: IQM | AUC: mean |",
            "| --- | --- | --- | --- | --- |",
        ]
        table = aggregates(task_runs, reps)
        for label, row in sorted(table.items()):
            lines.append(f"| {label} | {row['n']} | {fmt(row['mean'])} | {fmt(row['iqm'])} | {fmt(row['auc mean'])} |")
        pairs = improvements(task_runs, references, reps)
        if pairs:
            lines += ["", "| P(X > Y) on final scores | estimate [95% CI] | verdict for X |", "| --- | --- | --- |"]
            for x, y, p, low, high in pairs:
                counts = (table[x]["n"], table[y]["n"])
                said = verdict(low, high) if min(counts) >= MIN_RUNS else f"none yet: {counts[0]} and {counts[1]} runs"
                lines.append(f"| {x} > {y} | {p:.2f} [{low:.2f}, {high:.2f}] | {said} |")
        paired = paired_differences(task_runs, references)
        if paired:
            lines += [
                "",
                "| paired by seed: X - Y, final scores | seeds | difference per seed | mean | X higher | sign-flip p |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for x, y, seeds, differences, p_value in paired:
                lines.append(
                    f"| {x} - {y} | {', '.join(map(str, seeds))} | {', '.join(f'{d:+.1f}' for d in differences)} "
                    f"| {differences.mean():+.1f} | {(differences > 0).sum()} of {len(seeds)} | {p_value:.2f} |"
                )
        lines += [
            "",
            "| label | seed | frames evaluated | final | AUC | wall-clock h (frames/s) | run |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(task_runs, key=lambda r: (r.label, r.seed)):
            final = f"{r.final:.1f}" if r.final is not None else "unfinished"
            reached = int(r.frames[-1]) if len(r.frames) else 0
            cost = r.cost
            cost = "" if cost is None else f"{cost[0]:.2f} ({cost[1]:.1f})"
            lines.append(
                f"| {r.label} | {r.seed} | {reached:,} / {r.total_frames:,} | {final} | {r.auc:.1f} | {cost} "
                f"| `{r.directory.parent.name}/{r.directory.name}` |"
            )
        figure = plot_curves(task, task_runs, metric, out, reps)
        lines += ["", f"![{task}]({figure.name})", ""]
        if diagnostics:
            figure = plot_diagnostics(task, task_runs, list(diagnostics), out)
            lines += [f"![{task} diagnostics]({figure.name})", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", help="run directories or folders holding them")
    parser.add_argument("--metric", default="eval/return", help="metrics.jsonl key to score")
    parser.add_argument("--by", nargs="*", default=[], help="config keys that tell variants of an algorithm apart")
    parser.add_argument(
        "--reference", nargs="*", default=["S2AC"], help="labels compared to the others (exact, or else prefixes)"
    )
    parser.add_argument("--reps", type=int, default=20_000, help="bootstrap resamples")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first path)")
    parser.add_argument(
        "--diagnostics", nargs="*", default=[], help="training metrics to plot per run, e.g. train/init_scale_min"
    )
    parser.add_argument(
        "--at-frames",
        type=int,
        default=None,
        help="compare every run at this budget: its evaluation at exactly this frame count (longer runs included)",
    )
    parser.add_argument(
        "--across",
        default=None,
        help="a setting swept over every algorithm (alpha: sac.alpha, s2ac.alpha, ...; or a config key such as "
        "env.goal_radius): runs are compared at each of its values, and a figure shows the scores against them",
    )
    parser.add_argument(
        "--final-window",
        type=int,
        default=None,
        help="final score: the metric's mean over the last N frames of each finished run (a training metric)",
    )
    args = parser.parse_args()
    if args.final_window is not None and args.final_window < 1:
        raise SystemExit(f"--final-window={args.final_window} must be >= 1.")
    runs = [load_run(d, args.metric, args.by, args.final_window, args.across) for d in find_runs(args.paths)]
    runs = [run for run in runs if run is not None]
    if args.at_frames is not None:
        if args.at_frames < 1:
            raise SystemExit(f"--at-frames={args.at_frames} must be >= 1.")
        runs = [run for run in (at_budget(r, args.at_frames, args.final_window) for r in runs) if run is not None]
    runs = split_budgets(runs)
    runs, common = compact_labels(runs)
    if not runs:
        raise SystemExit(
            f"No runs with metrics.jsonl, .hydra/ and '{args.metric}' under {[str(p) for p in args.paths]}"
            + (f" planned for at least {args.at_frames} frames." if args.at_frames is not None else ".")
        )
    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    text = report(
        runs, args.metric, args.reference, out, args.reps, args.diagnostics, common, args.final_window, args.across
    )
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
