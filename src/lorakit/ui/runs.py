"""What the dashboard knows about runs: found by walking --runs, read from the files a training run writes.

    config.yaml      the resolved config (method, base, data, ...)
    metrics.jsonl    one JSON object per logged step; read incrementally by byte offset while a run trains
    summary.json     written at the end: status (completed / interrupted / early stopping), steps, wall time
    .lorakit.lock    held while a run trains: {"pid", "host", "started", ...}
    adapter/lorakit.json   the data hash; checkpoints/step-*/; eval/eval.json; train.log (runs the UI started)

Nothing here imports a run: every value is read from its files, so a run started from the command line, on
another machine, or by an older lorakit shows the same way.

Run ids are paths relative to the runs root. `RunsRoot.resolve` is the one door from an id to a directory:
no absolute paths, no `..`, no hidden parts, and the resolved path (symlinks followed) must stay inside the
root -- so nothing the browser sends can name a file outside --runs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.adapters import read_metadata
from lorakit.config import yaml_load
from lorakit.errors import LorakitError

Status = Literal["running", "completed", "failed", "stopped"]
LOCK_FILE = ".lorakit.lock"  # held by `lorakit train` while it runs: {"pid", "host", "started", "command"}
CHILD_FILE = ".lorakit-ui.json"  # the same facts, written by the UI for a trainer it started (jobs.Trainer)
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
MAX_DEPTH = 4  # runs/<group>/<sub>/<run>: deep enough for grouped experiments, bounded for a huge tree
RECENT_S = 90.0  # NOTE: without a lock file, a run whose metrics changed this recently is taken as running
ID_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]{0,99}")


class UIError(LorakitError):
    """A request the dashboard refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class RunsRoot:
    """The directory given as --runs, and the only way from a run id to a path."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def check_id(self, run_id: str) -> list[str]:
        parts = run_id.split("/") if isinstance(run_id, str) else []
        bad = [p for p in parts if not ID_PART.fullmatch(p)]
        if not run_id or bad or len(parts) > MAX_DEPTH:
            raise UIError(f"run {run_id!r} is not a run name under {self.root}: use up to {MAX_DEPTH} parts of "
                          "letters, digits and . _ + = - separated by '/', none starting with '.' (no '..')")
        return parts

    def path(self, run_id: str) -> Path:
        """root/run_id, refused unless it stays inside the root once symlinks are followed (it may not exist)."""
        path = self.root.joinpath(*self.check_id(run_id))
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise UIError(f"run {run_id!r} points outside {self.root} (a symlink?); runs must live under --runs", 403)
        return path

    def resolve(self, run_id: str) -> Path:
        """An existing run directory (404 when there is none)."""
        path = self.path(run_id)
        if not path.is_dir() or not any((path / f).is_file() for f in RUN_FILES):
            raise UIError(f"no run {run_id!r} under {self.root}", 404)
        return path

    def run_id(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def discover(self) -> list[Path]:
        """Every run directory under the root: one holding config.yaml, metrics.jsonl or summary.json. A run's
        own sub-folders are not searched; hidden and symlinked folders are skipped."""
        found = []
        for top, dirs, files in os.walk(self.root, followlinks=False):
            here = Path(top)
            depth = len(here.relative_to(self.root).parts)
            if here != self.root and any(f in files for f in RUN_FILES):
                found.append(here)
                dirs[:] = []
                continue
            dirs[:] = [d for d in sorted(dirs) if depth < MAX_DEPTH and ID_PART.fullmatch(d)
                       and not (here / d).is_symlink()]
        return found


# --------------------------------------------------------------------------- reading a run's files


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml as a plain mapping ({} when missing or unreadable): shown as it is, never validated here."""
    try:
        data = yaml_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class MetricsChunk:
    rows: list[dict[str, Any]]
    offset: int  # bytes read so far: pass it back to get only what came after
    ino: int  # the file's identity: a resume rewrites metrics.jsonl (a new file), and the reader starts over
    reset: bool  # True when these rows replace everything read before


def read_metrics(run_dir: Path, offset: int = 0, ino: int = 0) -> MetricsChunk:
    """The complete lines of metrics.jsonl from byte `offset` on; from 0 when the file was replaced or shrank."""
    path = run_dir / "metrics.jsonl"
    try:
        stat = path.stat()
    except OSError:
        return MetricsChunk([], 0, 0, offset > 0)
    reset = stat.st_ino != ino or stat.st_size < offset
    start = 0 if reset else offset
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(_finite(row))
    return MetricsChunk(rows, start + end, stat.st_ino, reset)


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinity are not JSON: they go to the browser as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def read_lock(run_dir: Path) -> dict[str, Any] | None:
    """Who trains (or trained) in run_dir: {"pid", "host", "started", ...} from the trainer's lock file, else
    from the UI's record of a trainer it started (so a restarted UI finds its runs again); None when neither."""
    for name in (LOCK_FILE, CHILD_FILE):
        if (run_dir / name).exists():
            return read_json(run_dir / name) or {}
    return None


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """The lock's holder while it still trains: its pid runs on this host, or it is another host's (we cannot
    tell, so it counts as running). None when there is no lock or its holder is gone."""
    info = read_lock(run_dir)
    if info is None:
        return None
    if info.get("host") not in (None, socket.gethostname()):
        return info
    return info if pid_alive(info.get("pid")) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def current_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json, unless it belongs to an earlier attempt: a resumed run rewrites metrics.jsonl after it."""
    summary = read_json(run_dir / "summary.json")
    written, metrics = _mtime(run_dir / "summary.json"), _mtime(run_dir / "metrics.jsonl")
    if summary is not None and written is not None and metrics is not None and metrics > written + 1.0:
        return None
    return summary


def run_status(run_dir: Path, child: Literal["alive", "stopped", "failed"] | None = None) -> Status:
    """running / completed / failed / stopped, from the files (and what the UI knows of a child it started).

    running    the lock's holder still runs, or the UI's own child does (or, with no lock file at all,
               metrics.jsonl changed in the last RECENT_S seconds and no summary says the run ended)
    completed  summary.json: completed or stopped early by early stopping
    stopped    summary.json: interrupted, or the trainer the UI started exited 130 (Ctrl-C / Stop: a
               checkpoint was saved), as its child or as recorded in .lorakit-ui.json
    failed     anything else: the process is gone without writing a summary"""
    if child == "alive" or lock_holder(run_dir) is not None:
        return "running"
    summary = current_summary(run_dir)
    if summary is not None:
        return "stopped" if summary.get("status") == "interrupted" else "completed"
    exit_code = (read_json(run_dir / CHILD_FILE) or {}).get("exit_code") if child is None else None
    if child == "stopped" or exit_code in (130, -2):  # -2: killed by SIGINT itself
        return "stopped"
    recent = (_mtime(run_dir / "metrics.jsonl") or 0) > time.time() - RECENT_S
    if child is None and recent and read_lock(run_dir) is None:
        return "running"
    return "failed"


def checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """checkpoints/step-*/, oldest first, with their step and size."""
    out = []
    for path in sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: _step_of(p.name)):
        if path.is_dir() and not path.name.startswith("."):
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            out.append({"name": path.name, "step": _step_of(path.name), "bytes": size,
                        "modified": _iso(_mtime(path))})
    return out


def _step_of(name: str) -> int:
    digits = name.removeprefix("step-")
    return int(digits) if digits.isdigit() else -1


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def data_hash(run_dir: Path) -> str | None:
    try:
        return read_metadata(run_dir / "adapter").get("data_hash")
    except (LorakitError, OSError, ValueError):
        return None


def base_label(base: Any) -> str:
    """A short name for a base model: a hub id as it is, a local directory by its last folder."""
    if not isinstance(base, str) or not base:
        return "?"
    return Path(base).name if base.startswith(("/", ".", "~")) else base


def _last_steps(run_dir: Path) -> tuple[int | None, float | None]:
    """(last logged step, best eval loss) from metrics.jsonl, for a run without a summary yet."""
    rows = read_metrics(run_dir).rows
    evals = [r["eval_loss"] for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    return (rows[-1]["step"] if rows else None), (min(evals) if evals else None)


def run_row(root: RunsRoot, run_dir: Path, child: Any = None, started: float | None = None) -> dict[str, Any]:
    """One line of the runs table. `child`/`started`: what the UI knows of a process it started itself."""
    config, summary = read_config(run_dir), current_summary(run_dir)
    status = run_status(run_dir, child)
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    step, best = _last_steps(run_dir)
    if summary is not None and status != "running":
        step, best = summary.get("steps", step), summary.get("best_eval_loss", best)
    lock = read_lock(run_dir) or {}
    wall = summary.get("wall_time_s") if summary and status != "running" else None
    if wall is None and status == "running":
        since = started or _parse_iso(lock.get("started"))
        wall = round(time.time() - since, 1) if since else None
    return {
        "id": root.run_id(run_dir), "status": status, "method": config.get("method"),
        "base": base_label(config.get("base_model")), "base_model": config.get("base_model"),
        "task": config.get("task"), "data_hash": data_hash(run_dir), "step": step,
        "total_steps": (summary or {}).get("total_steps") or train.get("max_steps"),
        "best_eval_loss": best, "wall_time_s": wall, "modified": _iso(_latest_mtime(run_dir)),
        "has_adapter": (run_dir / "adapter" / "adapter_config.json").is_file(),
        "resumable": status in ("stopped", "failed") and any((run_dir / "checkpoints").glob("step-*")),
    }


def _latest_mtime(run_dir: Path) -> float | None:
    times = [t for t in (_mtime(run_dir / f) for f in RUN_FILES) if t is not None]
    return max(times) if times else None


def _parse_iso(text: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def eval_report(run_dir: Path) -> dict[str, Any] | None:
    """eval/eval.json (base vs tuned) and eval.md, when the run was evaluated."""
    report = read_json(run_dir / "eval" / "eval.json")
    if report is None:
        return None
    md = run_dir / "eval" / "eval.md"
    return {"json": report, "markdown": md.read_text(encoding="utf-8") if md.is_file() else None}


def log_tail(run_dir: Path, max_bytes: int = 8000) -> str | None:
    """The end of train.log (the stdout and stderr of a run the UI started), each progress-bar line shown as
    its last state (a bar redraws itself with carriage returns)."""
    path = run_dir / "train.log"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))
