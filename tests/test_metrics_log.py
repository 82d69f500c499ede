import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sota-implementations"))
import metrics_log  # noqa: E402


def write(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)


def test_readers_skip_a_line_torn_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"frames": 1000, "x": 1.0}, {"frames": 2000, "x": 2.0, "final": 1}, {"frames": 3000, "x": 3.0}]
    write(path, records, tail='{"frames": 4000, "x": ')
    assert metrics_log.read_records(path) == records
    assert metrics_log.read_records(tmp_path / "absent.jsonl") == []


def test_final_records_below_the_budget_are_not_final(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, [{"frames": 2000, "final": 1}, {"frames": 3000}, {"frames": 5000, "final": 1}])
    assert [r["frames"] for r in metrics_log.final_records(path)] == [2000, 5000]
    assert [r["frames"] for r in metrics_log.final_records(path, 3000)] == [5000]
    assert metrics_log.final_records(path, 6000) == []


def test_truncate_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"frames": 1000, "x": 0.1}, {"frames": 2000, "x": 0.2}, {"frames": 3000, "x": 0.3}]
    write(path, records, tail='{"frames": 35')
    metrics_log.truncate(path, 2000)
    assert path.read_text() == "".join(json.dumps(record) + "\n" for record in records[:2])
    metrics_log.truncate(tmp_path / "absent.jsonl", 1000)
    assert not (tmp_path / "absent.jsonl").exists()
