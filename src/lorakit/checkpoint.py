"""Atomic save/restore of everything a run needs to continue bit-for-bit.

    checkpoints/step-000100/
      trainable.safetensors   every parameter with requires_grad (LoRA factors, heads, or all for full)
      optimizer.pt            optimizer + scheduler state (tensors and numbers only: loads with weights_only=True)
      state.json              step, micro-batches consumed, epoch, best eval, early-stopping counter, RNG states

Exact resume needs the same trainable weights, optimizer moments, schedule position, RNG states
(dropout masks) and position in the data order; the data order itself is a pure function of
(seed, epoch), so the position is just the count of micro-batches consumed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.atomic import atomic_directory, recover_directory

STEP_DIR = re.compile(r"^step-(\d+)$")


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
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: RunState, keep: int) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest `keep`."""
    root = run_dir / "checkpoints"
    target = root / f"step-{state.step:06d}"
    with atomic_directory(target) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"run": asdict(state), "rng": rng_state()}))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
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


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> RunState:
    """Restore weights, optimizer, schedule and RNG; returns the loop counters."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"checkpoint {path} has parameters this model lacks ({missing[:3]}...); was the config changed?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    saved = json.loads((path / "state.json").read_text())
    set_rng_state(saved["rng"])
    return RunState(**saved["run"])
