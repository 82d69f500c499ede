"""A run's ``metrics.jsonl``: one JSON record per line, appended while it trains.

Every record holds ``frames`` (the frames collected when it was written); the end-of-training evaluation also holds
``final: 1``. A kill can tear the line being written: the readers here skip such a line, so that a run directory
can be read while its run is going or after it was killed.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """The records of ``path`` in order (none if it does not exist), without lines torn by a kill."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "frames" in record:
            records.append(record)
    return records


def finals(records: list[dict], budget: int = 0) -> list[dict]:
    """The end-of-training evaluations among ``records`` written at ``budget`` frames or more. A run continued
    with a larger budget keeps its earlier end-of-training record; until it reaches the new budget it has none."""
    return [record for record in records if record.get("final") and record["frames"] >= budget]


def final_records(path: Path, budget: int = 0) -> list[dict]:
    """:func:`finals` of the records of ``path``."""
    return finals(read_records(path), budget)


def truncate(path: Path, frames: int) -> None:
    """Drop the records of ``path`` written after ``frames`` (by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    kept = "".join(json.dumps(record) + "\n" for record in read_records(path) if record["frames"] <= frames)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(kept)
    tmp.replace(path)
