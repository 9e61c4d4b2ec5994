"""Output directories of `merge`/`export --out`, and write failures as one clear line.

`--out DIR` is refused when DIR holds anything, unless `--force`; even then only the files the command
writes are replaced, each atomically (`os.replace`), and everything else in DIR stays:

    with replace_files(out) as tmp:      # a fresh temp directory beside `out`, same filesystem
        model.save_pretrained(tmp)       # build everything there first
    # new `out`: one rename of the whole directory; existing `out`: one rename per file written

A write that fails -- a full disk, a read-only or foreign-owned directory, a path through a file -- becomes
an `OutputError` naming the path and the free space or the mode (`output_errors`), not an errno traceback
or torch's "unexpected pos 563520 vs 563412".
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import LorakitError, OutputError

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
NOT_A_DIR = (errno.ENOTDIR, errno.EEXIST)
# How a full disk looks when it does not arrive as an OSError (torch.save's zip writer, safetensors' Rust io).
FULL_TEXTS = ("unexpected pos", "failed writing file", "No space left", "StorageFull", "code: 28", "quota exceeded")


# --------------------------------------------------------------------------- --out DIR


def check_output_dir(out: str | Path, force: bool, flag: str = "--out") -> Path:
    """Refuse a non-empty `out` unless `force`; call it before loading anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file, not a directory; choose a directory path")
    if out.is_dir() and not force:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        if held:
            shown = ", ".join(held[:8]) + (f", ... ({len(held)} entries)" if len(held) > 8 else "")
            raise OutputError(f"{flag} {out} is not empty ({shown}); nothing was changed. Choose a new or empty "
                              f"directory, or pass --force to write into it (only the files this command writes "
                              f"are replaced; everything else stays).")
    return out


@contextlib.contextmanager
def replace_files(out: str | Path) -> Iterator[Path]:
    """Yield a temp directory; on success its files replace their namesakes in `out` (see the docstring)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_files(tmp)
        if not out.exists():
            os.replace(tmp, out)  # nothing to keep: the whole directory appears at once
            return
        for src in sorted(p for p in tmp.rglob("*") if not p.is_dir()):
            dest = out / src.relative_to(tmp)
            if dest.is_dir():
                raise OutputError(f"{dest} is a directory where this command writes a file; move it away "
                                  f"or choose another --out")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_files(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


# --------------------------------------------------------------------------- write failures


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (what disk_usage and stat can look at)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_space(path: str | Path) -> str:
    where = _existing(Path(path))
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return f"free space on {where} unknown"
    return f"{_gib(usage.free)} free of {_gib(usage.total)} on {where}"


def _mode(path: Path) -> str:
    where = _existing(path)
    try:
        st = where.stat()
    except OSError:
        return str(where)
    return f"{where}: mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}; this process runs as uid {os.getuid()}"


def _file_in_the_way(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def describe_write_error(error: BaseException, path: str | Path, what: str = "output_dir") -> str | None:
    """One line for a failed write under `path`, or None when `error` is not a write failure."""
    path = Path(path)
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    target = Path(error.filename) if isinstance(error, OSError) and error.filename else path
    if code in FULL or (code is None and any(t in str(error) for t in FULL_TEXTS)):
        return (f"writing {target} failed: the disk is full ({free_space(target)}). Free some space, lower "
                f"train.keep_checkpoints, or set {what} to another disk; files written before are intact.")
    if code in DENIED:
        ro = ", a read-only file system" if code == errno.EROFS else ""
        if not _inside(target, path):  # not one of our outputs: an input we could not read
            return f"cannot access {target}: {error.strerror}{ro} ({_mode(target)}). Fix its permissions."
        return (f"cannot write {target}: {error.strerror}{ro} ({_mode(target)}). Choose a writable {what}, "
                f"or fix the directory's permissions.")
    if code == errno.EISDIR:
        return f"cannot write {target}: it is a directory where a file must go. Move it away or choose another {what}."
    if code in NOT_A_DIR:
        blocker = _file_in_the_way(target)
        if blocker is not None:
            return f"cannot write {target}: {blocker} is a file, not a directory. Set {what} to a directory path."
    return None


def _inside(target: Path, root: Path) -> bool:
    target, root = Path(os.path.abspath(target)), Path(os.path.abspath(root))
    return target == root or root in target.parents or target in root.parents


@contextlib.contextmanager
def output_errors(path: str | Path, what: str = "output_dir") -> Iterator[None]:
    """Turn a failed write under `path` into an OutputError; anything else passes through unchanged."""
    try:
        yield
    except LorakitError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        message = describe_write_error(e, path, what)
        if message is None:
            raise
        raise OutputError(message) from None
    except Exception as e:  # safetensors' SafetensorError (a plain Exception) on a full disk
        message = describe_write_error(e, path, what) if type(e).__name__ == "SafetensorError" else None
        if message is None:
            raise
        raise OutputError(message) from None
