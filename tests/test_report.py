"""report.py (statistics over run directories) and hydra multirun sweeps of the training scripts."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sota-implementations"))
import report  # noqa: E402

import torchrl_s2ac  # noqa: E402


def fake_run(root: Path, algorithm: str, seed: int, curve: list[float], final: float | None, **config) -> Path:
    """A run directory as the harness writes it: .hydra/{config,hydra}.yaml and metrics.jsonl."""
    directory = root / algorithm / f"{seed}_seed{seed}"
    (directory / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "env": {"name": "Hopper-v5"}, "collector": {"total_frames": 1000 * len(curve)}, **config}
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (directory / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": algorithm}}}))
    records = [{"frames": 1000 * (i + 1), "eval/return": value} for i, value in enumerate(curve)]
    if final is not None:
        records.append({"frames": 1000 * len(curve), "eval/return": final, "final": 1})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def test_scores_auc_and_aggregates_against_numpy(tmp_path):
    finals = {"s2ac": [10.0, 12.0, 14.0, 30.0], "sac": [1.0, 2.0, 3.0, 4.0]}
    for algorithm, values in finals.items():
        for seed, final in enumerate(values):
            fake_run(tmp_path, algorithm, seed, [0.0, final / 2, final], final)
    fake_run(tmp_path, "sac", 9, [0.0, 5.0], None)  # unfinished: listed, not aggregated
    runs = [report.load_run(d, "eval/return", []) for d in report.find_runs([tmp_path])]
    assert len(runs) == 9
    run = next(r for r in runs if r.label == "S2AC" and r.seed == 3)
    # trapezoid over frames 1000..3000 of (0, 15, 30) divided by 2000 frames
    assert run.auc == pytest.approx(((0 + 15) / 2 + (15 + 30) / 2) / 2)
    table = report.aggregates([r for r in runs if r.task == "Hopper-v5"], reps=2000)
    assert table["SAC"]["n"] == 4
    for label, algorithm in (("S2AC", "s2ac"), ("SAC", "sac")):
        values = np.array(finals[algorithm])
        mean, low, high = table[label]["mean"]
        assert mean == pytest.approx(values.mean())
        assert low <= mean <= high and low >= values.min() and high <= values.max()
        # IQM of 4 runs: the mean of the middle two
        assert table[label]["iqm"][0] == pytest.approx(np.sort(values)[1:3].mean())
    # The SAC curve: the finished runs' mean at their shared points, not cut short by the unfinished run
    grid, curves = report.finished_curves([r for r in runs if r.label == "SAC"])
    np.testing.assert_array_equal(grid, [1000, 2000, 3000])
    np.testing.assert_allclose(curves.mean(0), [0.0, np.mean(finals["sac"]) / 2, np.mean(finals["sac"])])
    (reference, other, p, low, high), *rest = report.improvements(runs, ["S2AC"], reps=2000)
    assert (reference, other, rest) == ("S2AC", "SAC", [])
    assert p == pytest.approx(1.0)  # every S2AC score beats every SAC score
    assert report.verdict(low, high) == "better"


def test_cost_is_the_last_timed_record_also_at_a_shorter_budget(tmp_path):
    directory = fake_run(tmp_path, "s2ac", 0, [1.0, 2.0, 3.0], 3.0)
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    for record, elapsed in zip(records, (0.0, 400.0, 900.0, 900.0)):  # a first record before any time passed
        record["elapsed_s"] = elapsed
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = report.load_run(directory, "eval/return", [])
    assert run.cost == pytest.approx((900.0 / 3600, 3000 / 900.0))
    assert report.at_budget(run, 2000).cost == pytest.approx((400.0 / 3600, 2000 / 400.0))
    untimed = report.load_run(fake_run(tmp_path, "sac", 0, [1.0], 1.0), "eval/return", [])
    assert untimed.cost is None


def test_a_run_continued_to_a_larger_budget_is_unfinished_until_it_reaches_it(tmp_path):
    # Finished at 3k frames, then continued toward 5k: its 3k final record stays in metrics.jsonl, the config
    # now says 5k, and the run is killed while writing its 4k record.
    directory = fake_run(tmp_path, "s2ac", 0, [1.0, 2.0, 3.0], 3.0)
    config = yaml.safe_load((directory / ".hydra" / "config.yaml").read_text())
    config["collector"]["total_frames"] = 5000
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with (directory / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"frames": 4000, "eval/return": 4.0}) + "\n" + '{"frames": 45')
    run = report.load_run(directory, "eval/return", [])
    assert run.final is None and run.total_frames == 5000
    np.testing.assert_array_equal(run.scores, [1.0, 2.0, 3.0, 4.0])
    assert report.at_budget(run, 3000).final == 3.0  # its evaluation at 3k frames, a valid 3k-frame score
    with (directory / "metrics.jsonl").open("a") as metrics:
        metrics.write("\n" + json.dumps({"frames": 5000, "eval/return": 5.0, "final": 1}) + "\n")
    assert report.load_run(directory, "eval/return", []).final == 5.0


def test_overlapping_groups_are_not_distinguishable(tmp_path):
    rng = np.random.default_rng(0)
    for algorithm in ("s2ac", "sac"):
        for seed in range(5):
            fake_run(tmp_path, algorithm, seed, [0.0], float(rng.normal()))
    runs = [report.load_run(d, "eval/return", []) for d in report.find_runs([tmp_path])]
    (row,) = report.improvements(runs, ["S2AC"], reps=2000)
    _, _, p, low, high = row
    assert low < 0.5 < high and report.verdict(low, high) == "not distinguishable"
    # The bootstrap is seeded: the same runs give the same intervals, whatever numpy's global stream holds,
    # and the global stream is left as it was.
    for seed in (1, 2):
        np.random.seed(seed)
        assert report.improvements(runs, ["S2AC"], reps=2000) == [row]
        assert np.random.randint(2**31) == np.random.RandomState(seed).randint(2**31)


def test_by_splits_variants_and_ignores_keys_an_algorithm_lacks(tmp_path):
    fake_run(tmp_path, "s2ac", 0, [1.0], 1.0, s2ac={"max_step_ratio": 0.5})
    fake_run(tmp_path / "b", "s2ac", 0, [1.0], 1.0, s2ac={"max_step_ratio": None})
    fake_run(tmp_path, "sac", 0, [1.0], 1.0)
    labels = {report.load_run(d, "eval/return", ["s2ac.max_step_ratio"]).label for d in report.find_runs([tmp_path])}
    assert labels == {"S2AC s2ac.max_step_ratio=0.5", "S2AC s2ac.max_step_ratio=None", "SAC"}


def test_a_key_missing_from_an_older_run_takes_the_scripts_default(tmp_path):
    """A run saved before an option existed is labelled with the option's default, so it groups with the runs
    that set that default explicitly (and not with those that changed it)."""
    fake_run(tmp_path / "old", "s2ac", 0, [1.0], 1.0, s2ac={"max_step_ratio": 0.5})
    fake_run(tmp_path / "new", "s2ac", 1, [1.0], 1.0, s2ac={"max_step_ratio": 0.5, "score_dtype": None})
    fake_run(tmp_path / "bf16", "s2ac", 2, [1.0], 1.0, s2ac={"max_step_ratio": 0.5, "score_dtype": "bfloat16"})
    labels = [report.load_run(d, "eval/return", ["s2ac.score_dtype"]).label for d in report.find_runs([tmp_path])]
    assert sorted(labels) == ["S2AC s2ac.score_dtype=None"] * 2 + ["S2AC s2ac.score_dtype=bfloat16"]


def test_budgets_are_never_mixed_and_at_frames_scores_longer_runs_at_the_shorter_budget(tmp_path):
    fake_run(tmp_path / "short", "s2ac", 0, [1.0, 2.0, 3.0], 3.5)  # 3k frames, evaluated every 1k
    fake_run(tmp_path / "long", "sac", 0, [10.0, 20.0, 30.0, 40.0, 50.0], 55.0)  # 5k frames
    fake_run(tmp_path / "tiny", "sql", 0, [7.0, 8.0], 8.5)  # 2k frames: shorter than the budget below
    runs = [report.load_run(d, "eval/return", []) for d in report.find_runs([tmp_path])]
    split = report.split_budgets(runs)
    assert {r.task for r in split} == {f"Hopper-v5, {n:,} frames" for n in (2000, 3000, 5000)}
    assert report.slug("Hopper-v5, 30,000 frames") == "Hopper-v5_30000_frames"
    at = [r for r in (report.at_budget(r, 3000) for r in runs) if r is not None]
    assert sorted(r.algorithm for r in at) == ["s2ac", "sac"]  # the 2k-frame run cannot be scored at 3k
    by_algorithm = {r.algorithm: r for r in report.split_budgets(at)}
    assert by_algorithm["s2ac"].final == 3.5  # its own end-of-training evaluation
    assert by_algorithm["sac"].final == 30.0  # the periodic evaluation at 3k frames, not its final 55
    assert list(by_algorithm["sac"].frames) == [1000, 2000, 3000] and by_algorithm["sac"].task == "Hopper-v5"
    sac = next(r for r in runs if r.algorithm == "sac")
    assert report.at_budget(sac, 2500).final is None  # no evaluation at exactly 2.5k frames: not scored
    # with a final window: the mean of the evaluations in (1k, 3k] frames, those at 2k and 3k
    assert report.at_budget(sac, 3000, final_window=2000).final == pytest.approx((20.0 + 30.0) / 2)
    assert report.at_budget(sac, 2500, final_window=2000).final is None


def test_compact_labels_name_what_differs_and_exact_references(tmp_path):
    arms = {"base": {}, "cap": {"max_step_ratio": None}, "rule": {"kernel_rule": "mean"}}
    for arm, change in arms.items():
        for seed in range(2):
            settings = {"max_step_ratio": 0.5, "kernel_rule": "median", **change}
            fake_run(tmp_path / arm, "s2ac", seed, [1.0], float(seed), s2ac=settings)
    fake_run(tmp_path, "sac", 0, [1.0], 1.0)
    keys = ["s2ac.max_step_ratio", "s2ac.kernel_rule"]
    runs = [report.load_run(d, "eval/return", keys) for d in report.find_runs([tmp_path])]
    runs, common = report.compact_labels(runs)
    assert {r.label for r in runs} == {"S2AC", "S2AC max_step_ratio=None", "S2AC kernel_rule=mean", "SAC"}
    assert common == {"S2AC": "max_step_ratio=0.5, kernel_rule=median"}
    pairs = report.improvements(runs, ["S2AC"], reps=200)  # exact: the common-settings arm against the others
    assert sorted(other for _, other, *_ in pairs) == ["S2AC kernel_rule=mean", "S2AC max_step_ratio=None", "SAC"]
    assert {reference for reference, *_ in pairs} == {"S2AC"}


def test_command_line_writes_markdown_and_curves(tmp_path):
    for algorithm in ("s2ac", "sac", "sql"):
        for seed in range(3):
            fake_run(tmp_path / "runs", algorithm, seed, [0.0, seed + 1.0], seed + 1.0)
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, str(ROOT / "sota-implementations" / "report.py"), str(tmp_path / "runs"), "--out", str(out)]
        + ["--reps", "500"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = (out / "report.md").read_text()
    assert "| S2AC > SAC |" in text and "| S2AC > SQL |" in text
    assert (out / "curves_Hopper-v5.png").stat().st_size > 10_000
    assert not (out / "diagnostics_Hopper-v5.png").exists()  # only when asked for


def test_hydra_multirun_sweep_runs_each_seed_in_its_own_directory(tmp_path):
    """`-m seed=0,1`: two parallel runs (joblib launcher), one W&B group, each with one torch thread."""
    overrides = [
        "env=multigoal",
        "seed=0,1",
        "collector.total_frames=100",
        "collector.frames_per_batch=50",
        "collector.init_random_frames=50",
        "collector.learning_starts=50",
        "optim.batch_size=16",
        "logger.eval_every_frames=100",
        "logger.eval_episodes=2",
        "env.coverage_episodes=4",
        "network.actor_cells=[16]",
        "network.critic_cells=[16]",
        "replay_buffer.size=200",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, str(ROOT / "sota-implementations" / "sac.py"), "-m", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*_seed*"))
    assert [r.name for r in runs] == ["0_seed0", "1_seed1"]
    configs = []
    for seed, run in enumerate(runs):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["final"] == 1 and "eval/goals_reached" in records[-1]
        assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["seed"] == seed
        configs.append(json.loads((run / "run.json").read_text()))
    sweep = "/".join((tmp_path / "sweep").parts[-3:])  # the W&B group of both runs
    assert [(c["algorithm"], c["seed"], c["group"]) for c in configs] == [("sac", 0, sweep), ("sac", 1, sweep)]
    assert {c["torch_threads"] for c in configs} == {max(1, os.cpu_count() // 2)}  # launcher.n_jobs = 2
    assert {c["machine"] for c in configs} == {torchrl_s2ac.describe_device("cpu")}


def test_no_verdict_below_three_runs_per_label(tmp_path):
    for seed in range(2):
        fake_run(tmp_path / "runs", "s2ac", seed, [0.0, 10.0], 10.0 + seed)
    for seed in range(3):
        fake_run(tmp_path / "runs", "sac", seed, [0.0, 1.0], 1.0 + seed)
    runs = [report.load_run(d, "eval/return", []) for d in report.find_runs([tmp_path / "runs"])]
    text = report.report(runs, "eval/return", ["S2AC"], tmp_path, reps=200)
    assert "| S2AC > SAC | 1.00 [1.00, 1.00] | none yet: 2 and 3 runs |" in text
    fake_run(tmp_path / "runs", "s2ac", 2, [0.0, 10.0], 12.0)
    runs = [report.load_run(d, "eval/return", []) for d in report.find_runs([tmp_path / "runs"])]
    assert "| S2AC > SAC | 1.00 [1.00, 1.00] | better |" in report.report(runs, "eval/return", ["S2AC"], tmp_path, 200)


def test_paired_differences_match_seeds_and_enumerate_every_sign_flip(tmp_path):
    """Per-seed differences, and the sign-flip p-value against a plain enumeration of the 2^n sign patterns."""
    scores = {"s2ac": {0: 530.0, 1: 998.0, 2: 328.0, 3: 700.0}, "sac": {0: 375.0, 1: 1046.0, 2: 296.0, 4: 10.0}}
    for algorithm, finals in scores.items():
        for seed, final in finals.items():
            fake_run(tmp_path, algorithm, seed, [0.0, final], final)
    fake_run(tmp_path / "twice", "sac", 2, [0.0, 1.0], 1.0)  # seed 2 twice in SAC: ambiguous, left out
    runs = [report.load_run(d, "eval/return", []) for d in report.find_runs([tmp_path])]
    ((x, y, seeds, differences, p_value),) = report.paired_differences(runs, ["S2AC"])
    assert (x, y, seeds) == ("S2AC", "SAC", [0, 1])
    np.testing.assert_allclose(differences, [155.0, -48.0])
    signs = np.array(list(itertools.product((1, -1), repeat=2)))
    flipped = np.abs((signs * differences).mean(1))
    assert p_value == pytest.approx((flipped >= abs(differences.mean()) - 1e-9).mean())  # here every pattern: 1
    ((*_, seeds, _, p_value),) = report.paired_differences([r for r in runs if r.seed != 1], ["S2AC"])
    assert (seeds, p_value) == ([0], 1.0)

    rng = np.random.default_rng(1)
    base = rng.normal(size=6) * 100  # what each seed contributes to both labels
    differences = np.array([3.0, 5.0, 4.0, 6.0, 2.0, 5.0])
    for seed in range(6):
        fake_run(tmp_path / "six", "s2ac", seed, [0.0], base[seed] + differences[seed])
        fake_run(tmp_path / "six", "sac", seed, [0.0], base[seed])
    runs = [report.load_run(d, "eval/return", []) for d in report.find_runs([tmp_path / "six"])]
    ((_, _, seeds, found, p_value),) = report.paired_differences(runs, ["S2AC"])
    np.testing.assert_allclose(found, differences)
    assert p_value == pytest.approx(2 / 2**6)  # all differences positive: only the all-+ and all-- patterns
    ((_, _, _, low, high),) = report.improvements(runs, ["S2AC"], reps=500)
    assert report.verdict(low, high) == "not distinguishable"  # unpaired, the seeds' spread hides the shift
    text = report.report(runs, "eval/return", ["S2AC"], tmp_path, reps=200)
    assert "| S2AC - SAC | 0, 1, 2, 3, 4, 5 | +3.0, +5.0, +4.0, +6.0, +2.0, +5.0 | +4.2 | 6 of 6 | 0.03 |" in text


def test_final_window_scores_a_training_metric_by_its_last_frames(tmp_path):
    finished = fake_run(tmp_path, "s2ac", 0, [0.0, 5.0, 10.0], None)  # 3000 frames planned, all reached
    run = report.load_run(finished, "eval/return", [], final_window=1500)
    assert run.final == pytest.approx(7.5)  # the records at 2000 and 3000 frames
    assert report.load_run(finished, "eval/return", []).final is None  # no end-of-training evaluation
    short = fake_run(tmp_path, "sac", 1, [0.0, 5.0], None)
    short.joinpath(".hydra", "config.yaml").write_text(
        yaml.safe_dump({"seed": 1, "env": {"name": "Hopper-v5"}, "collector": {"total_frames": 5000}})
    )
    assert report.load_run(short, "eval/return", [], final_window=1500).final is None  # budget not reached
    text = report.report([run], "eval/return", [], tmp_path, reps=50, final_window=1500)
    assert "Final: the mean of `eval/return` over each run's last 1,500 frames;" in text


def test_across_compares_algorithms_at_each_value_of_their_own_setting(tmp_path):
    """``--across alpha`` reads ``s2ac.alpha`` for S2AC and ``sac.alpha`` for SAC, compares them only at equal
    values, and tabulates every label's mean final score per value."""
    finals = {("s2ac", 0.2): [2.0, 3.0, 4.0], ("sac", 0.2): [1.0, 1.0, 1.0], ("s2ac", 10.0): [4.0, 4.0, 4.0]}
    finals[("sac", 10.0)] = [4.0, 3.0, 4.0]
    for (algorithm, alpha), values in finals.items():
        for seed, final in enumerate(values):
            fake_run(tmp_path / f"alpha{alpha}", algorithm, seed, [0.0, final], final, **{algorithm: {"alpha": alpha}})
    fake_run(tmp_path / "nokey", "sql", 0, [1.0], 1.0, env={"name": "Hopper-v5", "goal_radius": 0.5})
    with pytest.raises(SystemExit, match="sql.alpha nor alpha"):
        report.load_run(tmp_path / "nokey" / "sql" / "0_seed0", "eval/return", [], across="alpha")
    radius = report.load_run(tmp_path / "nokey" / "sql" / "0_seed0", "eval/return", [], across="env.goal_radius")
    assert radius.across == 0.5  # a config key that is not an algorithm's own
    runs = [
        report.load_run(d, "eval/return", [], across="alpha")
        for d in report.find_runs([tmp_path / "alpha0.2", tmp_path / "alpha10.0"])
    ]
    split = report.split_across(runs, "alpha")
    assert {r.task for r in split} == {"Hopper-v5, alpha=0.2", "Hopper-v5, alpha=10"}
    pairs = {r.task: report.improvements([s for s in split if s.task == r.task], ["S2AC"], reps=500) for r in split}
    assert [p for _, _, p, *_ in pairs["Hopper-v5, alpha=0.2"]] == [pytest.approx(1.0)]
    assert [p for _, _, p, *_ in pairs["Hopper-v5, alpha=10"]] == [pytest.approx((3 * 0.5 + 3 * 1.0 + 3 * 0.5) / 9)]
    lines = report.across_section(runs, "alpha", "eval/return", tmp_path, reps=500)
    rows = [line for line in lines if line.startswith("| 0.2 |") or line.startswith("| 10 |")]
    assert rows[0].startswith("| 0.2 | 3.0 [") and "(n=3) | 1.0 [1.0, 1.0] (n=3) |" in rows[0]
    assert rows[1].startswith("| 10 | 4.0 [4.0, 4.0] (n=3) | 3.7 [")
    assert (tmp_path / "across_alpha_Hopper-v5.png").stat().st_size > 10_000
