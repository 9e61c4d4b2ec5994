"""The data pipeline: files -> hygiene (dedup, hash split, leakage) -> token ids with a loss mask.

Order matters: dedup and the train/eval split run on the raw rows *before* any tokenization or
truncation, so an example's side never depends on the tokenizer or max_seq_len, and a duplicate can
never sit on both sides. `prepare_data` returns everything training and evaluation need, plus the
statistics that `lorakit data inspect` prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from lorakit.data.collate import (
    PackedRow,
    collate,
    model_inputs,
    pack_examples,
    packed_positions_and_mask,
    padding_waste,
)
from lorakit.data.formats import DataError, Record, load_records, read_rows
from lorakit.data.split import dedup, hash_split, leakage
from lorakit.data.templates import (
    BUILTIN_TEMPLATES,
    CHARS_PER_TOKEN,
    IGNORE,
    Example,
    clip_record,
    encode_classification,
    encode_record,
    resolve_template,
)

__all__ = [
    "BUILTIN_TEMPLATES", "IGNORE", "DataError", "Example", "PackedRow", "PreparedData", "Record", "check_num_labels",
    "collate", "encode_classification", "encode_record", "inspect_data", "model_inputs", "pack_examples",
    "packed_positions_and_mask", "padding_waste", "prepare_data", "read_rows", "read_rows_only", "training_rows",
]
log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # saved with the adapter so inference renders exactly the same
    label_names: list[str] | None = None  # seq_cls with named classes


def training_rows(examples: list[Example], packing: bool, task: str, max_seq_len: int) -> list[Any]:
    """What a micro-batch samples from, in training and in eval alike: packed rows of several examples
    (causal LM with packing), else the examples themselves."""
    if not packing or task != "causal_lm":
        return list(examples)
    return pack_examples(examples, max_seq_len)


def read_rows_only(source: str) -> list[dict[str, Any]]:
    """The rows of `source` (file, directory or hub id) without their origins: eval prompts, canaries."""
    return [row for row, _ in read_rows(source)]


def prepare_data(config: Any, tokenizer: Any, task: str = "causal_lm", batch_size: int = 4,
                 label_names: list[str] | None = None) -> PreparedData:
    """`config` is a DataConfig. Reads, cleans, splits and tokenizes; raises DataError on bad input.

    seq_cls with class names: `label_names` is the id order a trained head uses (the adapter's); None = the
    names found in the data, sorted."""
    if not config.train:
        raise DataError("data.train is not set: point it at a .jsonl/.json/.csv/.parquet file or directory")
    stats: dict[str, Any] = {}
    train = load_records(config.train, config.format, task)
    stats["rows_read"] = len(train)
    if config.dedup:
        keep, counts = dedup([r.text() for r in train])
        train = [train[i] for i in keep]
        stats.update(counts)
    train, evals = _split(train, config, task, stats)
    stats["leakage"] = leakage([r.text() for r in train], [r.text() for r in evals]) if evals else None
    if stats["leakage"] and (stats["leakage"]["exact"] or stats["leakage"]["near"]):
        log.warning("%d eval examples also appear in train (%d exact, %d near); see `lorakit data inspect`",
                    stats["leakage"]["exact"] + stats["leakage"]["near"], stats["leakage"]["exact"], stats["leakage"]["near"])
    stats["data_hash"] = data_hash(train, evals)
    label_names = _label_names(train + evals, label_names, config) if task == "seq_cls" else None
    needs_template = any(r.format == "chat" for r in train + evals)
    template = resolve_template(tokenizer, config.chat_template) if needs_template else None
    train_ex = _encode(train, tokenizer, template, config, label_names, stats, "train")
    eval_ex = _encode(evals, tokenizer, template, config, label_names, stats, "eval")
    if not train_ex:
        raise DataError(f"{config.train}: no training example has a supervised token left "
                        f"(see stats: {stats['train']}); raise data.max_seq_len or check the assistant turns")
    stats.update(token_stats(train_ex, config, task, batch_size))
    return PreparedData(train_ex, eval_ex, stats, template, label_names)


def _split(train: list[Record], config: Any, task: str, stats: dict[str, Any]) -> tuple[list[Record], list[Record]]:
    if config.eval:
        evals = load_records(config.eval, config.format, task)
        stats["split"] = f"eval from {config.eval}"
    elif config.eval_fraction > 0:
        t, e = hash_split([r.text() for r in train], config.eval_fraction, config.seed)
        if not t:  # a handful of rows can all hash to eval
            raise DataError(f"{config.train}: the hash split put all {len(train)} rows in the eval set "
                            f"(data.eval_fraction={config.eval_fraction}); add rows, lower data.eval_fraction, "
                            "or give a separate data.eval file")
        train, evals = [train[i] for i in t], [train[i] for i in e]
        stats["split"] = f"hash split, eval_fraction={config.eval_fraction}, seed={config.seed}"
    else:
        evals = []
        stats["split"] = "no eval set"
    stats["train_rows"], stats["eval_rows"] = len(train), len(evals)
    return train, evals


def data_hash(train: list[Record], evals: list[Record]) -> str:
    """sha256 of the cleaned rows of both splits: which data an adapter saw, recorded in its metadata."""
    h = hashlib.sha256()
    for side, records in (("train", train), ("eval", evals)):
        for r in records:
            pair = [] if r.text_pair is None else [r.text_pair]  # rows without a pair hash as they always did
            h.update(json.dumps([side, r.format, r.messages, r.prompt, r.response, r.label, *pair]).encode())
    return h.hexdigest()[:16]


def _label_names(records: list[Record], known: list[str] | None, config: Any) -> list[str] | None:
    labels = {r.label for r in records}
    if all(isinstance(x, int) for x in labels):
        return None
    if not all(isinstance(x, str) for x in labels):
        raise DataError("seq_cls labels mix class ids and class names; use one or the other")
    if known is None:
        return sorted(labels)
    unknown = sorted(labels - set(known))
    if unknown:
        raise DataError(f"{config.eval or config.train}: labels {unknown} are not among the classes the model was "
                        f"trained on ({known}, the adapter's id2label); use those names, or retrain with this data")
    return list(known)


def check_num_labels(data: PreparedData, num_labels: int, where: str, fix: str) -> None:
    """Raise DataError when a class id of the data does not fit a head with `num_labels` outputs; `where`
    names that head (e.g. "num_labels in the config") and `fix` says what to change."""
    ids = sorted({e.labels for e in data.train + data.eval if isinstance(e.labels, int)})
    named_all = data.label_names is None or len(data.label_names) == num_labels  # a named head names every output
    if named_all and (not ids or (ids[0] >= 0 and ids[-1] < num_labels)):
        return
    what = f"{len(data.label_names)} classes {data.label_names}" if data.label_names else f"class ids {ids[0]}..{ids[-1]}"
    raise DataError(f"the data has {what}, but {where} is {num_labels} (class ids 0..{num_labels - 1}); {fix}")


def _encode(records: list[Record], tokenizer: Any, template: str | None, config: Any, label_names: list[str] | None,
            stats: dict[str, Any], side: str) -> list[Example]:
    """Tokenize, truncate (or drop) at max_seq_len, and drop examples left without supervision.

    Text beyond max_seq_len × CHARS_PER_TOKEN characters is cut before tokenizing (bounded memory); such a
    row counts as truncated, and its tokens_lost_to_truncation only up to the cut."""
    out, truncated, lost, dropped_long, unsupervised, cut_rows = [], 0, 0, 0, [], 0
    for r in records:
        r, cut = clip_record(r, config.max_seq_len * CHARS_PER_TOKEN)
        cut_rows += cut
        ex = encode_record(r, tokenizer, template, config.train_on)
        if cut or len(ex) > config.max_seq_len:
            if config.truncation == "drop":
                dropped_long += 1
                continue
            truncated += 1
            lost += max(0, len(ex) - config.max_seq_len)
            ex = _truncate(ex, r, tokenizer, config.max_seq_len)
        if label_names is not None:
            ex.labels = label_names.index(ex.labels)
        if ex.supervised() == 0:
            unsupervised.append(r.origin)
            continue
        out.append(ex)
    stats[side] = {"examples": len(out), "truncated": truncated, "tokens_lost_to_truncation": lost,
                   "dropped_too_long": dropped_long, "dropped_no_supervised_tokens": len(unsupervised),
                   "dropped_examples": unsupervised[:3], "cut_before_tokenizing": cut_rows}
    if unsupervised:
        log.warning("%s: dropped %d examples with no supervised token after truncation (e.g. %s)",
                    side, len(unsupervised), ", ".join(unsupervised[:3]))
    return out


def _truncate(ex: Example, record: Record, tokenizer: Any, max_len: int) -> Example:
    """The first max_len tokens; a classification row is cut by the tokenizer, so [SEP] still closes it."""
    if record.label is not None:
        return encode_classification(record, tokenizer, max_len)
    return Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.origin)


def token_stats(examples: list[Example], config: Any, task: str, batch_size: int) -> dict[str, Any]:
    lengths = sorted(len(e) for e in examples)
    total = sum(lengths)
    out = {
        "tokens": total,
        "length_percentiles": {f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (50, 90, 99)}
        | {"max": lengths[-1]},
        "supervised_fraction": round(sum(e.supervised() for e in examples) / max(1, total), 4),
        "padding_waste_unpacked": round(padding_waste(examples, batch_size), 4),
    }
    if task == "causal_lm":
        packed = pack_examples(examples, config.max_seq_len)
        out["packed_rows"] = len(packed)
        out["padding_waste_packed"] = round(padding_waste(packed, batch_size), 4)
    return out


# --------------------------------------------------------------------------- inspect


def mark_supervised(tokenizer: Any, ex: Example, open_mark: str = "⟦", close_mark: str = "⟧") -> str:
    """The example's text with every run of supervised tokens wrapped in ⟦ ⟧."""
    if isinstance(ex.labels, int):
        return f"{tokenizer.decode(ex.input_ids)}  -> label {ex.labels}"
    parts, run, supervised = [], [], None
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        is_sup = label != IGNORE
        if supervised is not None and is_sup != supervised:
            parts.append(_wrap(tokenizer.decode(run), supervised, open_mark, close_mark))
            run = []
        run.append(token)
        supervised = is_sup
    if run:
        parts.append(_wrap(tokenizer.decode(run), supervised, open_mark, close_mark))
    return "".join(parts)


def _wrap(text: str, supervised: bool, open_mark: str, close_mark: str) -> str:
    return f"{open_mark}{text}{close_mark}" if supervised else text


def inspect_data(config: Any, tokenizer: Any, n: int = 5, as_json: bool = False, task: str = "causal_lm",
                 batch_size: int = 4) -> str:
    """`lorakit data inspect`: the first n training examples exactly as the model sees them, and stats."""
    data = prepare_data(config, tokenizer, task, batch_size)
    shown = data.train[:n]
    if as_json:
        examples = [{"input_ids": e.input_ids, "labels": e.labels, "text": tokenizer.decode(e.input_ids), "origin": e.origin}
                    for e in shown]
        return json.dumps({"stats": data.stats, "examples": examples}, indent=2, ensure_ascii=False)
    lines = [f"First {len(shown)} training examples as the model sees them; ⟦supervised tokens⟧ carry the loss:"]
    for i, e in enumerate(shown):
        lines += [f"\n--- example {i} ({e.origin}, {len(e)} tokens, {e.supervised()} supervised)", mark_supervised(tokenizer, e)]
    lines += ["\n--- statistics", json.dumps(data.stats, indent=2, ensure_ascii=False)]
    return "\n".join(lines)
