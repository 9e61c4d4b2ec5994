"""Claiming a run directory: one run at a time, and nothing of a previous run lost without being asked.

A training run holds `<output_dir>/.lorakit.lock` from start to end. The lock is an exclusive `flock` on
that file (the kernel drops it when the process dies, however it dies), and the file holds who took it
(pid, host, start time, command) for the message the next run prints. Where `flock` is not supported
the file is created exclusively instead, and a lock whose pid no longer runs on this host is stale.

What happens to a previous run in the directory is decided in two steps, so that a typo never costs the
user anything:

    enter     lock; refuse at once a plain `train` into a directory holding a previous run
              (it names what is there and the two ways forward: --resume or --overwrite)
    commit    after config, data and model are validated: --overwrite moves the previous run's
              files to `<output_dir>.old-<time>/` (renames, nothing deleted); files the user put
              there (notes, data) stay where they are

Under torch.distributed, rank 0 alone locks and moves; every rank checks (the same files, the same answer).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from lorakit.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: the exclusive-create fallback below
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lorakit.lock"
# What a training run writes into its directory; anything else there belongs to the user.
RUN_OUTPUTS = ("adapter", "model", "adapter-last", "model-last", "checkpoints", "best", "eval", "merged",
               "metrics.jsonl", "summary.json", "loss.png", "config.yaml", "judge.jsonl")  # judge_cache.jsonl is reused
Mode = Literal["new", "resume", "overwrite"]


# --------------------------------------------------------------------------- what a directory holds


def previous_run(run_dir: str | Path, source: str | Path | None = None) -> list[str]:
    """Names of a previous run's outputs in `run_dir`, [] when there are none.

    `source` is the YAML the run was started from: a config.yaml that *is* that file is the user's
    input, not a previous run (`lorakit train runs/r/config.yaml` into an otherwise empty runs/r)."""
    run_dir = Path(run_dir)
    found = [n for n in RUN_OUTPUTS if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    if found == ["config.yaml"] and source is not None and _same_file(run_dir / "config.yaml", Path(source)):
        return []
    return found


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def refusal(run_dir: Path, found: list[str]) -> str:
    listed = ", ".join(f"{n}/" if (run_dir / n).is_dir() else n for n in found)
    return (f"output_dir {run_dir} already holds a run ({listed}); nothing was changed. Either continue it with "
            f"--resume, or start over with --overwrite (the previous run is moved to {run_dir}.old-<time>/, "
            f"nothing is deleted), or set output_dir to a new directory (--set output_dir=...).")


# --------------------------------------------------------------------------- the lock


def _lock_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def read_lock(path: Path) -> dict[str, Any]:
    """The holder recorded in a lock file ({} when unreadable or empty)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def is_stale(info: dict[str, Any]) -> bool:
    """A lock is stale when its holder ran on this host and no longer runs. On another host we cannot
    tell, so it is never stale (NOTE: a reused pid makes a dead holder look alive: delete the file)."""
    return info.get("host") == socket.gethostname() and not pid_alive(info.get("pid"))


def _held_message(run_dir: Path, path: Path, info: dict[str, Any]) -> str:
    who = (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
           + (f": {info['command']}" if info.get("command") else ""))
    return (f"output_dir {run_dir} is in use by another lorakit run ({who}). Wait for it to finish, or set "
            f"output_dir to another directory. If that run is gone, delete {path}.")


class RunLock:
    """An exclusive lock on a run directory, held from `acquire()` to `release()`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.use_flock = fcntl is not None

    def acquire(self) -> RunLock:
        for _ in range(3):  # the holder may release (unlink) between our open and our lock: try again
            if self._try_flock() if self.use_flock else self._try_exclusive():
                return self
        raise OutputError(_held_message(self.run_dir, self.path, read_lock(self.path)))

    def _try_flock(self) -> bool:
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(_held_message(self.run_dir, self.path, read_lock(self.path))) from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                self.use_flock = False  # a filesystem without flock: exclusive create from now on
                if not existed:
                    self.path.unlink(missing_ok=True)
                return False
            raise
        if not _still_named(fd, self.path):  # locked a file the previous holder had just unlinked
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_lock_info()).encode())
        self.fd = fd
        return True

    def _try_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = read_lock(self.path)
            if not is_stale(info):
                raise OutputError(_held_message(self.run_dir, self.path, info)) from None
            log.warning("removing a stale lock %s (pid %s is not running on this host)", self.path, info.get("pid"))
            self.path.unlink(missing_ok=True)
            return False
        os.write(fd, json.dumps(_lock_info()).encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if _still_named(self.fd, self.path):
                self.path.unlink()  # while still holding it: the next run creates a fresh file
        os.close(self.fd)
        self.fd = None


def _still_named(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except OSError:
        return False


# --------------------------------------------------------------------------- the claim


class RunDirClaim:
    """One training run's claim on its output directory: see the module docstring."""

    def __init__(self, run_dir: str | Path, mode: Mode, source: str | Path | None = None, main: bool = True):
        self.path, self.mode, self.source, self.main = Path(run_dir), mode, source, main
        self.lock = RunLock(self.path)
        self.created = False
        self.moved_to: Path | None = None

    def __enter__(self) -> RunDirClaim:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output_dir {self.path} is a file, not a directory; set output_dir to a directory "
                              f"(--set output_dir=...)")
        if self.main:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        if self.mode == "new":
            found = previous_run(self.path, self.source)
            if found:
                self.__exit__(None, None, None)
                raise OutputError(refusal(self.path, found))
        return self

    def commit(self) -> Path | None:
        """Config, data and model are valid: with --overwrite, move the previous run aside now."""
        if self.mode != "overwrite" or not self.main:
            return None
        found = previous_run(self.path, self.source)
        if found:
            self.moved_to = move_aside(self.path, found)
            print(f"--overwrite: moved the previous run ({', '.join(found)}) to {self.moved_to}", file=sys.stderr)
        return self.moved_to

    def __exit__(self, *exc: Any) -> None:
        if not self.main:
            return
        self.lock.release()
        if self.created:  # a run that stopped before writing anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                self.path.rmdir()
            self.created = False


def move_aside(run_dir: Path, names: list[str]) -> Path:
    """Rename `names` from run_dir into a new sibling `<run_dir>.old-<time>/`; returns that directory."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    target.mkdir()
    for name in names:
        os.replace(run_dir / name, target / name)  # same filesystem (a sibling): a rename, no copy
    return target


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path, mode: Mode, source: str | Path | None = None,
                  main: bool = True) -> Iterator[RunDirClaim]:
    """`with claim_run_dir(dir, mode) as claim: ...validate...; claim.commit(); ...train...`"""
    with RunDirClaim(run_dir, mode, source, main) as claim:
        yield claim


def precheck_run_dir(run_dir: str | Path, mode: Mode, source: str | Path | None = None) -> None:
    """What entering the claim would refuse (a previous run, a held lock), checked and released at once:
    for a launcher (`--nproc N`) to report it once instead of from N processes."""
    with claim_run_dir(run_dir, mode, source):
        pass
