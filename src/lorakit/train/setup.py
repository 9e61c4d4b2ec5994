"""Everything a run needs before its first step: the model as the method asks (LoRA, QLoRA, full), the
optimizer (LoRA+ groups), the learning-rate schedule, and the data order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorakit.config import WEIGHT_INITS, RunConfig, init_kind
from lorakit.errors import TrainingError
from lorakit.heads import saved_modules, set_label_names
from lorakit.lora import inject_lora
from lorakit.models import load_base, load_dtype
from lorakit.quant import NF4Linear, quantize_model
from lorakit.quant.linear import quant_targets


def prepare_model(config: RunConfig, device: torch.device, dtype: torch.dtype,
                  load_on: torch.device | None = None, label_names: list[str] | None = None) -> tuple[nn.Module, Any]:
    """Load the base (NF4 for QLoRA), add adapters (or unfreeze all for full).

    `load_on` (default: `device`) is where the weights are built: the CPU for FSDP2, which then moves
    only each rank's shard to the accelerator. `label_names` (seq_cls) become the head's id2label, which the
    adapter's lorakit.json and a merged checkpoint carry."""
    # NOTE: lora.init pissa | olora | loftq read the full-precision W, so a qlora run with one loads the base in
    # the compute dtype (peak: the whole model in 16 bits) and quantizes after the init, not while streaming.
    streamed = config.method == "qlora" and not weight_init(config)
    model, tokenizer = load_base(
        config.base_model, task=config.task, dtype=load_dtype(config.method, dtype, device), device=load_on or device,
        revision=config.revision, num_labels=config.num_labels,
        quant=config.quant if streamed else None, progress=True)
    if config.task == "seq_cls":
        set_label_names(model, label_names)
    return adapt_for_method(model, config), tokenizer


def adapt_for_method(model: nn.Module, config: RunConfig, progress: bool = True) -> nn.Module:
    """The method as config: NF4 base for qlora, adapters for lora/qlora, everything trainable for full;
    then gradient checkpointing (non-reentrant, so frozen inputs and 4-bit layers work)."""
    quantized = any(isinstance(m, NF4Linear) for m in model.modules())
    if config.method == "qlora" and not quantized and not weight_init(config):
        quantize_model(model, config.quant, progress=progress)
    if config.method == "full":
        model.requires_grad_(True)
    else:
        inject_lora(model, config.lora, quant=config.quant)
    if config.method == "qlora" and weight_init(config):
        _quantize_after_init(model, config, progress)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _quantize_after_init(model: nn.Module, config: RunConfig, progress: bool) -> None:
    """QLoRA after PiSSA/OLoRA (the residual W − s·B₀A₀ is what gets quantized) or LoftQ (its targets are NF4
    already): every other layer as quantize_model would, modules trained in full (heads.SavedModule) kept."""
    inside_saved = [m for n, _ in saved_modules(model) for m, _ in model.get_submodule(n).named_modules(prefix=n)]
    quant = dataclasses.replace(config.quant, skip_modules=[*config.quant.skip_modules, *inside_saved])
    if quant_targets(model, quant.skip_modules)[0]:
        quantize_model(model, quant, progress=progress)


def weight_init(config: RunConfig) -> bool:
    """lora.init reads the full-precision base weight (pissa | pissa_niter_N | olora | loftq)."""
    return config.method != "full" and init_kind(config.lora.init) in WEIGHT_INITS


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; LoRA+ gives B its own, larger learning rate."""
    tc = config.train
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = tc.lora_plus_ratio
    groups = [{"params": [p for n, p in params if not (ratio and ".lora_B." in n)], "lr": tc.lr}]
    if ratio:
        groups.append({"params": [p for n, p in params if ".lora_B." in n], "lr": tc.lr * ratio})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["weight_decay"] = tc.weight_decay
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    return _bnb_optimizer(groups, config)


def _bnb_optimizer(groups: list[dict], config: RunConfig) -> torch.optim.Optimizer:
    if not torch.cuda.is_available():
        raise TrainingError(f"train.optimizer: {config.train.optimizer} needs a CUDA device; use adamw on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainingError(f"train.optimizer: {config.train.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    cls = bnb.optim.PagedAdamW8bit if config.train.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=config.train.lr, weight_decay=config.train.weight_decay)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig, total_steps: int) -> Any:
    tc = config.train
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(tc.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, tc.scheduler))


class BatchPlan:
    """Training rows cut into micro-batches in an order fixed by (seed, epoch)."""

    def __init__(self, rows: list[Any], micro_batch_size: int, seed: int):
        if not rows:
            raise TrainingError("no training examples left after data preparation; check data.train")
        self.rows, self.size, self.seed = rows, micro_batch_size, seed
        self.per_epoch = math.ceil(len(rows) / micro_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def stream(self, start: int) -> Iterator[tuple[float, list[Any]]]:
        """(fractional epoch after this micro-batch, rows) from micro-batch index `start` on."""
        index, order_epoch, order = start, None, []
        while True:
            epoch, within = divmod(index, self.per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self.epoch_order(epoch)
            picked = order[within * self.size:(within + 1) * self.size]
            index += 1
            yield epoch + (within + 1) / self.per_epoch, [self.rows[i] for i in picked]


def total_steps(config: RunConfig, plan: BatchPlan, world: int = 1) -> int:
    """Optimizer steps of the run; a step consumes grad_accum × world micro-batches of the data order."""
    tc = config.train
    if tc.max_steps:
        return tc.max_steps
    return max(1, math.ceil(tc.epochs * plan.per_epoch / (tc.grad_accum * world)))
