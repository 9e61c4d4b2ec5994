"""Work the dashboard starts: training runs as their own processes, exports as threads with progress.

Training: `python -m lorakit train CONFIG --quiet [--resume]`, a separate process in its own session, its
stdout and stderr appended to <run>/train.log. The UI never waits on it and never blocks on it; it survives
the UI (a Ctrl-C in the UI's terminal goes to the UI's process group, not to the run's), and the UI
finds it again after a restart through the run's lock file. Stop sends SIGINT, exactly a Ctrl-C: the
trainer finishes the step in flight, saves a checkpoint there, writes its outputs and summary (status
"interrupted"; lorakit.runtime.interrupt), and `--resume` continues from that checkpoint with the next step.
A Stop before training has started (the model still loading) ends the process with nothing to save.

Export: merge (a standard transformers checkpoint, `lorakit.export.merge_stream`) or GGUF
(`lorakit.export.gguf`) in a thread of the UI. Both write into a temp folder beside the output, renamed
into place at the end (`runtime.outdir.replace_files`, `runtime.atomic.atomic_directory`); the progress
shown is the bytes in that folder over the bytes expected (the base checkpoint's tensors at the output's bytes
per weight). The outputs are the run's own <run>/merged and <run>/gguf-<dtype>: exporting again replaces the
files an export writes there (--force), never anything else.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorakit.adapters import read_adapter_config
from lorakit.errors import LorakitError
from lorakit.export.gguf import export_gguf
from lorakit.export.merge_stream import merge_adapter_streaming
from lorakit.quant.safetensors_io import CheckpointFiles
from lorakit.ui.runs import CHILD_FILE, UIError, pid_alive, read_config, read_json, read_lock

# --------------------------------------------------------------------------- training processes


@dataclass
class TrainProcess:
    run_dir: Path
    popen: subprocess.Popen
    started: float
    resume: bool

    def state(self) -> Literal["alive", "stopped", "failed"] | None:
        """alive while it runs; after: stopped (exit 130: interrupted), failed, or None (exited 0)."""
        code = self.popen.poll()
        if code is None:
            return "alive"
        self.record_exit(code)
        return exit_state(code)

    def record_exit(self, code: int) -> None:
        """The exit status into .lorakit-ui.json, once: a restarted UI still tells stopped from failed."""
        path = self.run_dir / CHILD_FILE
        info = read_json(path) or {}
        if info.get("pid") == self.popen.pid and "exit_code" not in info:
            path.write_text(json.dumps({**info, "exit_code": code}))


def exit_state(code: int) -> Literal["stopped", "failed"] | None:
    if code in (130, -signal.SIGINT):  # the CLI's status after Ctrl-C / SIGINT (a checkpoint was saved)
        return "stopped"
    return None if code == 0 else "failed"


class Trainer:
    """The training processes this UI started, by run directory."""

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None):
        self.python, self.env = python, env
        self.processes: dict[Path, TrainProcess] = {}
        self.lock = threading.Lock()

    def start(self, run_dir: Path, resume: bool = False) -> TrainProcess:
        """`lorakit train <run>/config.yaml` (with --resume: from the newest checkpoint) as its own process."""
        with self.lock:
            if self.child_state(run_dir) == "alive" or _holder_alive(run_dir):
                raise UIError(f"{run_dir.name} is already training; stop it first", 409)
            command = [self.python, "-m", "lorakit", "train", str(run_dir / "config.yaml"), "--quiet"]
            if resume:
                command.append("--resume")
            with open(run_dir / "train.log", "ab") as log:
                log.write(f"\n$ {' '.join(command[1:])}\n".encode())
                log.flush()
                # the UI's working directory: relative paths in the config mean what they mean to the CLI there
                popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
            process = TrainProcess(run_dir, popen, time.time(), resume)
            (run_dir / CHILD_FILE).write_text(json.dumps({
                "pid": popen.pid, "host": socket.gethostname(), "command": " ".join(command[1:]),
                "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}))
            self.processes[run_dir] = process
            return process

    def child_state(self, run_dir: Path) -> Literal["alive", "stopped", "failed"] | None:
        process = self.processes.get(run_dir)
        return process.state() if process else None

    def started(self, run_dir: Path) -> float | None:
        process = self.processes.get(run_dir)
        return process.started if process and process.state() == "alive" else None

    def stop(self, run_dir: Path) -> int:
        """SIGINT to the run's trainer (this UI's child, or the lock's holder on this host); returns its pid."""
        process = self.processes.get(run_dir)
        if process is not None and process.state() == "alive":
            pid = process.popen.pid
        else:
            info = read_lock(run_dir) or {}
            if info.get("host") not in (None, socket.gethostname()) or not pid_alive(info.get("pid")):
                raise UIError(f"{run_dir.name} is not training on this machine; nothing to stop", 409)
            pid = info["pid"]
        os.kill(pid, signal.SIGINT)
        return pid

    def close(self) -> None:
        """Reap the children that ended; running ones are left to finish (they do not need the UI)."""
        for process in self.processes.values():
            process.popen.poll()


def _holder_alive(run_dir: Path) -> bool:
    info = read_lock(run_dir)
    return info is not None and info.get("host") in (None, socket.gethostname()) and pid_alive(info.get("pid"))


# --------------------------------------------------------------------------- exports

ExportKind = Literal["merge", "gguf", "gguf-lora"]
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


@dataclass
class ExportJob:
    kind: ExportKind
    out: Path
    expected_bytes: int
    state: Literal["running", "done", "failed"] = "running"
    message: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        tmp = self.out.with_name(f".{self.out.name}.tmp{os.getpid()}")  # runtime.atomic's temp folder
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
        return min(0.99, written / max(self.expected_bytes, 1))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "out": str(self.out), "state": self.state, "message": self.message,
                "progress": round(self.progress(), 3), "elapsed_s": round((self.finished or time.time()) - self.started, 1)}


class Exporter:
    """One export at a time per run, in a thread; `resolve_base` turns a config's base_model into a path."""

    def __init__(self, resolve_base: Any = None):
        self.resolve_base = resolve_base or (lambda name: name)
        self.jobs: dict[Path, ExportJob] = {}
        self.lock = threading.Lock()

    def start(self, run_dir: Path, kind: ExportKind, dtype: str = "f16") -> ExportJob:
        if kind not in ("merge", "gguf", "gguf-lora"):
            raise UIError(f"export kind must be one of merge, gguf, gguf-lora; got {kind!r}")
        if kind != "merge" and dtype not in BYTES_PER_WEIGHT:
            raise UIError(f"GGUF dtype must be one of {', '.join(BYTES_PER_WEIGHT)}; got {dtype!r}")
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise UIError(f"{run_dir.name} has no adapter/ yet: export after training has saved one", 409)
        base = self.resolve_base(str(read_config(run_dir).get("base_model") or ""))
        with self.lock:
            if run_dir in self.jobs and self.jobs[run_dir].state == "running":
                raise UIError(f"an export of {run_dir.name} is already running", 409)
            out = run_dir / ("merged" if kind == "merge" else f"{kind}-{dtype}")
            job = ExportJob(kind, out, _expected_bytes(base, kind, dtype))
            self.jobs[run_dir] = job
        threading.Thread(target=self._run, args=(job, run_dir, base, dtype), daemon=True).start()
        return job

    def _run(self, job: ExportJob, run_dir: Path, base: str, dtype: Any) -> None:
        try:
            if job.kind == "merge":
                task_type = read_adapter_config(run_dir / "adapter").get("task_type", "CAUSAL_LM")
                merge_adapter_streaming(base, run_dir / "adapter", job.out, force=True,
                                        task="seq_cls" if task_type == "SEQ_CLS" else "causal_lm")
                job.message = f"merged model written to {job.out} (transformers format, safetensors)"
            else:
                result = export_gguf(run_dir, job.out, fmt=job.kind, dtype=dtype, base=base, force=True, progress=False)
                job.message = result.summary()
            job.state = "done"
        except (LorakitError, OSError, ImportError, ValueError) as e:
            job.state, job.message = "failed", f"{type(e).__name__}: {e}"
        finally:
            job.finished = time.time()


def _expected_bytes(base: str, kind: ExportKind, dtype: str) -> int:
    """The output's size, roughly: the base's tensors at the output's bytes per weight (0 when unknown: a hub
    id is not downloaded here just to count)."""
    if not Path(base).is_dir():
        return 0
    try:
        files = CheckpointFiles.open(base)
    except (LorakitError, OSError, ValueError):
        return 0
    infos = list(files.tensors.values())
    if kind == "merge":
        return sum(info.nbytes for info in infos)
    return int(sum(_numel(info.shape) for info in infos) * BYTES_PER_WEIGHT[dtype])


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
