"""The training data as the advisor sees it: how many examples and rows, and how long they are.

Read through lorakit.data, the one reader of data files. With the model's tokenizer at hand, the data
goes through the training pipeline itself (dedup, the eval split, templates, truncation, packing), so the
widest micro-batch the run will see is known exactly; without it, lengths are estimated from the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.config import RunConfig
from lorakit.data import prepare_data, training_rows
from lorakit.data.formats import load_records
from lorakit.models import load_tokenizer

CHARS_PER_TOKEN = 4
"""The estimate used without a tokenizer (NOTE: ±30% by language and tokenizer)."""


@dataclass
class DataStats:
    """Examples and token lengths of a training set. `rows` and `longest_row` are known only when the
    data was tokenized (`tokenized`): the rows micro-batches draw from (packed rows when packing) and
    the widest of them in tokens, which is the sequence length of the widest micro-batch."""

    examples: int
    mean_tokens: float | None
    p95_tokens: int | None
    tokenized: bool = False
    rows: int | None = None
    longest_row: int | None = None


def data_stats(path: str | Path, data_format: str = "auto", task: str = "causal_lm") -> DataStats:
    """Count the examples of a .jsonl/.json/.csv/.parquet file (or a directory of them) and estimate their
    token lengths at CHARS_PER_TOKEN characters per token (no tokenizer is loaded)."""
    records = load_records(str(path), data_format, task)
    tokens = sorted(max(1, len(r.text()) // CHARS_PER_TOKEN) for r in records)
    return _stats(tokens)


def run_data_stats(config: RunConfig) -> DataStats:
    """The run's training data exactly as lorakit.train prepares it (tokenizer and data pipeline; no
    weights): examples after dedup and the eval split, their lengths after templates and truncation, and
    the rows micro-batches draw from (packed to data.max_seq_len when data.packing, for causal LMs)."""
    tokenizer = load_tokenizer(config.base_model, config.revision)
    data = prepare_data(config.data, tokenizer, config.task, config.train.micro_batch_size)
    rows = training_rows(data.train, config.data.packing, config.task, config.data.max_seq_len)
    stats = _stats(sorted(len(e) for e in data.train))
    stats.tokenized, stats.rows = True, len(rows)
    stats.longest_row = min(config.data.max_seq_len, max(len(r) for r in rows))  # collate pads to the row's width
    return stats


def _stats(tokens: list[int]) -> DataStats:
    """`tokens`: sorted lengths."""
    if not tokens:
        return DataStats(0, None, None)
    return DataStats(len(tokens), sum(tokens) / len(tokens), tokens[min(len(tokens) - 1, int(0.95 * len(tokens)))])
