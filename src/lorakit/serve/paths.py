"""Path confinement for adapters loaded at runtime: inside `--adapter-root`, after `..` and symlinks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.adapters import CONFIG_FILE, META_FILE, TEMPLATE_FILE, WEIGHTS_FILE
from lorakit.serve.openai import ServeError, bad_request


def confine_path(raw: Any, roots: Sequence[Path]) -> Path:
    """The adapter directory `raw` names, resolved, if it lies inside one of `roots`; else ServeError.
    A relative path is looked up under each root in turn. `..` is refused outright (it has no use here
    but escaping); symlinks are followed and the *target* must still be inside a root -- for the
    directory and for every file the loader reads from it.
    NOTE: a file swapped for a symlink between this check and the load is not caught; the roots should
    be writable only by whoever may choose what the server loads.
    """
    if not roots:
        raise bad_request("loading adapters at runtime is off: start the server with --adapter-root DIR "
                          "and put adapters inside DIR", "lora_path")
    if not isinstance(raw, str) or not raw:
        raise bad_request(f"lora_path must be a non-empty string, got {raw!r}", "lora_path")
    path = Path(raw)
    if ".." in path.parts:
        raise bad_request(f"lora_path {raw!r} contains '..'; give a path inside the adapter roots "
                          f"{[str(r) for r in roots]}", "lora_path")
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        root = next((r for r in roots if resolved.is_relative_to(r)), None)
        if root is None:
            raise bad_request(f"lora_path {raw!r} resolves to {resolved}, outside the adapter roots "
                              f"{[str(r) for r in roots]} (symlinks are followed); copy the adapter into a root",
                              "lora_path")
        if resolved.is_dir():
            _check_files_inside(resolved, root, raw)
            return resolved
    raise ServeError(404, f"lora_path {raw!r}: no such adapter directory under the adapter roots "
                          f"{[str(r) for r in roots]}", param="lora_path", code="adapter_not_found")


def _check_files_inside(directory: Path, root: Path, raw: str) -> None:
    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE, TEMPLATE_FILE):
        target = (directory / name).resolve()
        if (directory / name).exists() and not target.is_relative_to(root):
            raise bad_request(f"lora_path {raw!r}: {name} is a symlink to {target}, outside the adapter root {root}; "
                              "copy the file instead of linking it", "lora_path")

