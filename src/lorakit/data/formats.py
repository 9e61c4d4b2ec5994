"""Read training rows from files and normalize every row format into one shape.

Accepted sources: a .jsonl / .json / .csv / .parquet file, a directory of them, or a `datasets` hub id.
Accepted row formats (detected from the fields, or declared with `data.format`):

    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    alpaca      {"instruction": "...", "input": "..." (optional), "output": "..."}
    completion  {"prompt": "...", "completion": "..."}
    text        {"text": "..."}

With task seq_cls every row is {"text": "...", "label": class id or name}, plus "text_pair" for a sentence
pair (NLI: premise in text, hypothesis in text_pair).

Each row keeps its origin (`file:line`), so every later error can point at the line to fix. Errors
are `DataError`s with a message a person can act on -- never a traceback from inside a parser.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
FORMAT_FIELDS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
ACCEPTED = "messages (chat), instruction+output (alpaca), prompt+completion (completion), text (text)"




@dataclass
class Record:
    """One normalized row: chat messages, or raw prompt/response text for completion and text rows."""

    format: str  # chat | completion | text (alpaca rows become chat)
    origin: str  # "path:line"
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    response: str = ""
    label: Any = None  # seq_cls: the class of a text row
    text_pair: str | None = None  # seq_cls: the second text of a sentence pair (the row's text is in response)

    def text(self) -> str:
        """All of the row's text, for dedup, hashing and leakage checks."""
        if self.format == "chat":
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)
        if self.text_pair is not None:
            return f"{self.response}\n{self.text_pair}"
        return f"{self.prompt}\n{self.response}" if self.prompt else self.response


# --------------------------------------------------------------------------- reading files


def read_rows(source: str) -> list[tuple[dict[str, Any], str]]:
    """(row, origin) for every row of `source`: a file, a directory of files, or a hub id."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
        return [row for f in files for row in read_file(f)]
    if path.is_file():
        return read_file(path)
    if path.suffix in SUFFIXES or "/" not in source or source.startswith((".", "/")):
        raise DataError(f"data file {source} does not exist (pass a .jsonl/.json/.csv/.parquet file, a directory, or a hub id)")
    return read_hub(source)


def read_file(path: Path) -> list[tuple[dict[str, Any], str]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    rows = readers[path.suffix](path)
    if not rows:
        raise DataError(f"{path}: the file is empty (no rows); each row is one training example, e.g. "
                        '{"messages": [...]} or {"text": "..."}')
    for row, origin in rows:
        if not isinstance(row, dict):
            raise DataError(f"{origin}: each row must be a JSON object with named fields, got {type(row).__name__}")
    return rows


def _text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}: byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                        "re-save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[tuple[Any, str]]:
    rows = []
    # split on \n only: str.splitlines() also breaks at U+2028/U+2029/\x85, which JSON strings may hold raw
    for number, line in enumerate(_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), f"{path}:{number}"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
    return rows


def _read_json(path: Path) -> list[tuple[Any, str]]:
    text = _text(path)
    if not text.strip():
        return []  # read_file reports the empty file
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; it looks like JSON Lines (one object per line): rename it to .jsonl" if e.msg == "Extra data" else ""
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold a list of rows (or {{\"data\": [...]}}), got {type(data).__name__}")
    return [(row, f"{path}:row {i}") for i, row in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[Any, str]]:
    # a file-like with newline="" keeps the line breaks inside quoted fields (splitlines() dropped them)
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    if reader.fieldnames is None:
        return []
    rows, last_line = [], reader.line_num
    for row in reader:  # a quoted field may span lines: the origin is the line the row starts on
        rows.append(({k: v for k, v in row.items() if k is not None}, f"{path}:{last_line + 1}"))
        last_line = reader.line_num
    return rows


def _read_parquet(path: Path) -> list[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'lorakit[data]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    return [(row, f"{path}:row {i}") for i, row in enumerate(table.to_pylist())]


def read_hub(name: str, split: str = "train") -> list[tuple[dict[str, Any], str]]:
    """A `datasets` hub id (or anything `datasets.load_dataset` accepts); downloads when online."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} is not a local file or directory; to load a hub dataset: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, missing split
        raise DataError(f"could not load dataset {name!r} (split {split!r}) from the hub: {e}") from None
    return [(row, f"{name}[{split}]:row {i}") for i, row in enumerate(ds)]


# --------------------------------------------------------------------------- normalizing rows


def detect_format(row: dict[str, Any], origin: str, declared: str = "auto") -> str:
    if declared != "auto":
        missing = [f for f in FORMAT_FIELDS[declared] if f not in row]
        if missing:
            raise DataError(f"{origin}: data.format is {declared} but the row lacks {missing}; fields found: "
                            f"{sorted(row)}. Accepted formats: {ACCEPTED}")
        return declared
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in row for f in fields):
            return fmt
    raise DataError(f"{origin}: cannot tell the row format from its fields {sorted(row)}; accepted: {ACCEPTED}")


def normalize(row: dict[str, Any], origin: str, declared: str = "auto", task: str = "causal_lm") -> Record:
    """One raw row -> Record, with every field checked (types, roles, empty content)."""
    if task == "seq_cls":
        return _classification_record(row, origin)
    fmt = detect_format(row, origin, declared)
    if fmt == "chat":
        return Record("chat", origin, messages=_messages(row["messages"], origin))
    if fmt == "alpaca":
        instruction, output = _string(row, "instruction", origin), _string(row, "output", origin)
        extra = row.get("input")
        extra = _string(row, "input", origin) if extra not in (None, "") else ""
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Record("chat", origin, messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    if fmt == "completion":
        return Record("completion", origin, prompt=_string(row, "prompt", origin), response=_string(row, "completion", origin))
    return Record("text", origin, response=_string(row, "text", origin))


def _classification_record(row: dict[str, Any], origin: str) -> Record:
    if "text" not in row or "label" not in row:
        raise DataError(f"{origin}: task seq_cls needs rows with 'text' and 'label' (and 'text_pair' for a sentence "
                        f"pair); fields found: {sorted(row)}")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{origin}: 'label' must be an integer class id or a class name, got {label!r}")
    pair = _string(row, "text_pair", origin) if row.get("text_pair") is not None else None
    return Record("text", origin, response=_string(row, "text", origin), label=label, text_pair=pair)


def _string(row: dict[str, Any], key: str, origin: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {key!r} must be a string, got {type(value).__name__} ({str(value)[:40]!r})")
    return value


def _messages(messages: Any, origin: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{origin}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{origin}: messages[{i}] must be an object with 'role' and 'content', got {str(m)[:60]!r}")
        if m["role"] not in ROLES:
            raise DataError(f"{origin}: messages[{i}] has unknown role {m['role']!r}; roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{origin}: messages[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def load_records(source: str, declared: str = "auto", task: str = "causal_lm") -> list[Record]:
    return [normalize(row, origin, declared, task) for row, origin in read_rows(source)]
