"""The training data as the advisor sees it: how many examples, and how long they are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import AdviceError


@dataclass
class DataStats:
    examples: int
    mean_tokens: float | None  # estimated at 4 characters per token
    p95_tokens: int | None


def data_stats(path: str | Path) -> DataStats:
    """Count examples in a .jsonl/.json/.csv/.parquet file (or a directory of them) and estimate their
    token lengths at ~4 characters per token (NOTE: no tokenizer is loaded; ±30% by language)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".csv", ".parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise AdviceError(f"data {path} is not a .jsonl/.json/.csv/.parquet file or a directory of them")
    lengths: list[int] = []
    for f in files:
        lengths += _row_lengths(f)
    if not lengths:
        return DataStats(0, None, None)
    tokens = sorted(max(1, n // 4) for n in lengths)
    return DataStats(len(tokens), sum(tokens) / len(tokens), tokens[min(len(tokens) - 1, int(0.95 * len(tokens)))])


def _row_lengths(f: Path) -> list[int]:
    if f.suffix == ".jsonl":
        with open(f, encoding="utf-8") as fh:
            return [len(line) for line in fh if line.strip()]
    if f.suffix == ".json":
        rows = json.loads(f.read_text(encoding="utf-8"))
        rows = rows if isinstance(rows, list) else rows.get("data", [])
        return [len(json.dumps(r)) for r in rows]
    if f.suffix == ".csv":
        import csv

        with open(f, encoding="utf-8", newline="") as fh:
            return [sum(len(c) for c in row) for row in list(csv.reader(fh))[1:]]
    import pyarrow.parquet as pq

    return [len(json.dumps(r, default=str)) for r in pq.read_table(f).to_pylist()]


