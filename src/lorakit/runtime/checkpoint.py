"""Atomic save/restore of everything a run needs to continue bit-for-bit.

    checkpoints/step-000100/
      trainable.safetensors   every parameter with requires_grad (LoRA factors, heads, or all for full)
      optimizer.pt            optimizer + scheduler state (tensors and numbers only: loads with weights_only=True)
      state.json              step, micro-batches consumed, epoch, best eval, early-stopping counter, the
                              checkpoint-selection history (every eval's metric and canary change),
                              RNG states (a list: one per rank), the resolved config and the data hash

Exact resume needs the same trainable weights, optimizer moments, schedule position, RNG states
(dropout masks) and position in the data order; the data order itself is a pure function of
(seed, epoch), so the position is just the count of (global) micro-batches consumed.

Under torch.distributed every rank calls save/load (sharded tensors are gathered and scattered
collectively), rank 0 alone writes and reads the files, and tensors are stored whole with parameter
names as keys, so the files are the same whatever the world size or DDP / FSDP2.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import TrainingError
from lorakit.runtime.atomic import atomic_directory, recover_directory
from lorakit.runtime.distributed import (
    barrier,
    broadcast,
    copy_full_,
    full_tensor,
    gather_objects,
    is_main,
    like,
    rank,
    world_size,
)

STEP_DIR = re.compile(r"^step-(\d+)$")
log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Counters of the loop that a checkpoint must carry."""

    step: int = 0
    micro_batches: int = 0
    tokens: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)  # train.select.Selection.state(): the eval history


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _py_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on CPU (gathered from the ranks under FSDP2: a collective)."""
    return {n: full_tensor(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved whole tensors into the parameters (each rank keeps its shard under FSDP2)."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise TrainingError(f"checkpoint {source} has parameters this model lacks ({missing[:3]}...): lora.target_modules "
                            f"or method changed since it was saved; restore them, or start over with --overwrite")
    shapes = [f"{n} {tuple(t.shape)} saved, {tuple(params[n].shape)} now" for n, t in tensors.items()
              if tuple(t.shape) != tuple(params[n].shape)]
    if shapes:
        raise TrainingError(f"checkpoint {source} holds tensors of other shapes ({'; '.join(shapes[:3])}): lora.r or "
                            f"the base model changed since it was saved; restore them, or start over with --overwrite")
    for name, tensor in tensors.items():
        copy_full_(params[name], tensor)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() keyed by parameter name with whole tensors: one file for any world size.

    torch numbers parameters by position (0, 1, ...) in param_groups; names survive DDP, FSDP2 and a
    change of world size. A collective under FSDP2 (the moments are sharded like their parameters)."""
    names = _param_names(model, optimizer)
    saved = optimizer.state_dict()
    state = {names[i]: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in saved["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`: names back to positions, whole moments back to this rank's shards."""
    names = _param_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for name, s in saved["state"].items():
        param = params[index[name]]
        state[index[name]] = {k: like(param, v) if torch.is_tensor(v) and v.dim() else v for k, v in s.items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: RunState, keep: int, record: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest `keep`.

    `record` (the resolved config and the data hash) goes into state.json, for `--resume` to compare.

    Every rank calls this (gathering is collective); rank 0 alone writes, with every rank's RNG state."""
    tensors = trainable_state(model)
    optim = {"optimizer": optimizer_state(model, optimizer), "scheduler": scheduler.state_dict()}
    rng = gather_objects(rng_state())
    root = run_dir / "checkpoints"
    target = root / f"step-{state.step:06d}"
    if is_main():
        with atomic_directory(target) as tmp:
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(optim, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"run": asdict(state), "rng": rng, **(record or {})}))
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temp dirs never match the name pattern)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    for path in root.iterdir():
        if path.name.startswith(".") and path.name.endswith(".old"):
            recover_directory(root / path.name[1:-4])
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The files of one checkpoint, read on rank 0 and broadcast to the others."""
    files = None
    if is_main():
        files = {
            "trainable": load_file(str(path / "trainable.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "state": json.loads((path / "state.json").read_text()),
        }
    return broadcast(files)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> RunState:
    """Restore weights, optimizer, schedule and this rank's RNG; returns the loop counters."""
    files = read_checkpoint(path)
    load_trainable_state(model, files["trainable"], path)
    load_optimizer_state(model, optimizer, files["optimizer"]["optimizer"])
    scheduler.load_state_dict(files["optimizer"]["scheduler"])
    restore_rank_rng(files["state"]["rng"], path)
    return RunState(**files["state"]["run"])


def restore_rank_rng(states: list[dict[str, Any]] | dict[str, Any], path: Path) -> None:
    """Each rank continues its own RNG stream (dropout masks); a different world size cannot, and says so."""
    states = [states] if isinstance(states, dict) else states  # one process wrote a dict before ranks existed
    if len(states) == world_size():
        set_rng_state(states[rank()])
        return
    if is_main():
        log.warning("%s was written by %d processes, this run has %d: RNG streams (dropout) continue from "
                    "train.seed + rank, so the run continues correctly but not bit-for-bit", path, len(states), world_size())
