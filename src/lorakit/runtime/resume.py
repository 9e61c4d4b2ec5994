"""May this run continue that checkpoint? Compare the config and data it recorded with the current ones.

A checkpoint's state.json records the resolved config and the data hash of the run that wrote it. On
`--resume` every key is compared; a difference is allowed only where it cannot change the maths done so
far or the meaning of the saved optimizer state:

    may change      how long (train.max_steps, train.epochs), how often (eval/save/log cadence,
                    keep_checkpoints, early stopping), where (train.device, train.parallel,
                    output_dir, the data *paths* -- their contents are the data hash), the memory
                    trade-off train.gradient_checkpointing, and everything under eval.
    refused         everything else: base_model, task, method, lora.*, quant.*, lr and schedule,
                    optimizer, batch plan (micro_batch_size, grad_accum), seeds, dtype, data
                    preparation (data.max_seq_len, packing, ...) and the data hash itself

A refusal lists every differing key with both values and leaves the run directory untouched;
`--resume-anyway` continues regardless. NOTE: under --resume-anyway the optimizer and schedule state come
from the checkpoint, so a changed train.lr does not take effect; tensors of another shape (lora.r,
target_modules) cannot be loaded at all and stop the run with that message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import RunConfig, to_dict
from lorakit.errors import OutputError, TrainingError
from lorakit.runtime.checkpoint import list_checkpoints
from lorakit.runtime.rundir import previous_run

log = logging.getLogger(__name__)

MAY_CHANGE = (
    "train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.log_every",
    "train.keep_checkpoints", "train.early_stopping_patience", "train.device", "train.parallel",
    "train.gradient_checkpointing", "output_dir", "data.train", "data.eval", "eval.",
)
# What a finished run leaves; with no checkpoint beside it there is nothing to resume, only to overwrite.
FINISHED = ("adapter", "model", "summary.json", "best", "eval")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not key.endswith("schema"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, current value) for every refused key that differs."""
    a, b = flatten(saved), flatten(current)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new and not may_change(key) and not (_number(old) and _number(new) and float(old) == float(new)):
            out.append((key, None if old is missing else old, None if new is missing else new))
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def recorded(checkpoint: Path, run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(config, data hash) the checkpoint recorded. Checkpoints written before they recorded a config
    fall back to the run directory's config.yaml (written by the run that made them) and no data hash."""
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{checkpoint / 'state.json'} is unreadable ({e}); delete {checkpoint} to resume from "
                            f"the checkpoint before it") from None
    if isinstance(state.get("config"), dict):
        return state["config"], state.get("data_hash")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        config = None
    log.warning("%s records no config (written by an older lorakit); comparing with %s, data unchecked",
                checkpoint, run_dir / "config.yaml")
    return (config if isinstance(config, dict) else None), None


def check_resume(config: RunConfig, run_dir: str | Path, data_hash: str | None, anyway: bool = False) -> Path | None:
    """The checkpoint `--resume` will continue (None: none yet, the run starts from step 0).

    Raises TrainingError listing the differing keys (see the module docstring), or OutputError when the
    directory holds a finished run but no checkpoint to continue."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        finished = [n for n in previous_run(run_dir) if n in FINISHED]
        if finished:
            raise OutputError(f"--resume: {run_dir} holds a finished run ({', '.join(finished)}) but no checkpoint "
                              f"to continue (train.save_every was null?); nothing was changed. Start over with "
                              f"--overwrite (the previous run is moved aside), or set output_dir to a new directory.")
        return None
    checkpoint = found[-1]
    saved, saved_hash = recorded(checkpoint, run_dir)
    if saved is None:
        return checkpoint
    problems = [f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in differences(saved, to_dict(config))]
    if saved_hash is not None and data_hash is not None and saved_hash != data_hash:
        problems.append(f"the data: hash {saved_hash} in the checkpoint, {data_hash} now (the rows of data.train "
                        f"or data.eval changed)")
    if not problems:
        return checkpoint
    listed = "\n  - ".join(problems)
    if anyway:
        log.warning("--resume-anyway: continuing %s although these changed:\n  - %s", checkpoint, listed)
        return checkpoint
    raise TrainingError(
        f"--resume: this config differs from the one {checkpoint} was trained with, in what changes the "
        f"training itself; nothing was changed:\n  - {listed}\nPut those values back to continue, pass "
        f"--resume-anyway to continue with the new ones, or start over with --overwrite (the previous run is "
        f"moved aside)."
    )
