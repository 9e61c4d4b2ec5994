"""The run being predicted: a RunConfig resolved, as lorakit.train would run it, into the numbers the
memory and time models read (device, compute and load dtypes, tokens per micro-batch, which linear
layers carry adapters, which loss implementation runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorakit.advise.shapes import Linear, ModelShape, meta_model
from lorakit.config import LoraConfig, QuantConfig, RunConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.lora import find_target_modules
from lorakit.loss import FUSED_MODEL_TYPES
from lorakit.models import load_dtype
from lorakit.runtime.devices import DTYPES, pick_device


@dataclass(frozen=True)
class Workload:
    """One run resolved to the numbers the models need (device, dtypes, tokens, adapters)."""

    method: Literal["lora", "qlora", "full"]
    device: str  # cpu | cuda
    compute_bytes: int  # b: the dtype activations and frozen weights compute in
    load_bytes: int  # dtype the base weights are loaded (and kept, unless quantized) in
    storage_bytes: int  # dtype of the checkpoint's tensors (config.json's dtype; else load_bytes)
    micro_batch: int
    seq_len: int
    grad_accum: int
    checkpointing: bool
    lora: LoraConfig
    quant: QuantConfig
    optimizer: str
    masked: bool  # padding or packing: transformers materializes a (B,1,T,T) mask
    task: str
    eval_enabled: bool
    lora_targets: tuple[Linear, ...]  # targets in one decoder layer
    extra_targets: tuple[Linear, ...]  # targets outside the layers (e.g. an explicitly named lm_head)
    # How lorakit trains; bench/advisor_calibration.py changes these to predict other frameworks' published runs.
    adapter_bytes: int = 4  # LoRA A and B are fp32 (nn.Linear's default dtype), whatever the base's dtype
    # linear_ce: lorakit.loss's head + cross-entropy in 32 MiB row chunks, no (B, T, V) logits (plain heads of
    # the architectures in lorakit.loss.FUSED_MODEL_TYPES); logits: HF logits + F.cross_entropy (in
    # loss_chunks chunks); compiled: logits, but the loss saves them, not an fp32 log-softmax (torch.compile)
    loss: Literal["linear_ce", "logits", "compiled"] = "logits"
    loss_chunks: int = 1

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def resolve_workload(config: RunConfig, shape: ModelShape, device: str | None = None, masked: bool = True,
                     seq_len: int | None = None) -> Workload:
    """Device, dtypes and LoRA targets of `config` as lorakit.train would run it. `seq_len`: the widest
    micro-batch of the run's data when it is known (DataStats.longest_row), else data.max_seq_len."""
    tc = config.train
    dev = (device or auto_device(tc.device)).split(":")[0]
    compute = _compute_dtype(tc.dtype, dev)
    load = load_dtype(config.method, compute, dev)  # lorakit.models' policy (full on a CPU: fp32 masters)
    if config.method == "full":
        compute = load  # the whole model is in the load dtype; it computes in it
    targets, extra = (), ()
    if config.method != "full":
        meta = shape.meta if shape.meta is not None else meta_model(shape.hf_config, config.task)
        names = set(_targets(meta, config.lora.target_modules))
        targets = tuple(lin for lin in shape.layer_linears if lin.name in names)
        extra = (shape.head,) if shape.head is not None and shape.head.name in names else ()
    stored = DTYPES.get(shape.checkpoint_dtype or "", load)
    return Workload(
        loss="linear_ce" if _fused_loss(config, shape, extra) else "logits",
        method=config.method, device=dev,
        compute_bytes=compute.itemsize, load_bytes=load.itemsize, storage_bytes=stored.itemsize,
        micro_batch=tc.micro_batch_size, seq_len=seq_len or config.data.max_seq_len, grad_accum=tc.grad_accum,
        checkpointing=tc.gradient_checkpointing, lora=config.lora, quant=config.quant, optimizer=tc.optimizer,
        masked=masked, task=config.task, eval_enabled=True, lora_targets=targets, extra_targets=extra,
    )


def _compute_dtype(name: str, dev: str) -> torch.dtype:
    """train.dtype, or for auto (lorakit.runtime.devices.pick_dtype): bf16 on CUDA (fp16 where bf16 is
    missing: the same 2 bytes), fp32 on a CPU."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if dev == "cuda" else torch.float32


def _targets(meta: Any, target_modules: Any) -> list[str]:
    """find_target_modules, its complaint (a ValueError naming the valid suffixes) raised as the user
    error it is: a ConfigError, which the pre-train check lets through before any weight loads."""
    try:
        return find_target_modules(meta, target_modules)
    except LorakitError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _fused_loss(config: RunConfig, shape: ModelShape, extra_targets: tuple[Linear, ...]) -> bool:
    """Whether lorakit.train computes the loss with lorakit.loss's chunked linear cross-entropy: a
    causal LM of a listed architecture whose head stays a plain nn.Linear (no adapter on it)."""
    return config.task == "causal_lm" and shape.model_type in FUSED_MODEL_TYPES and not extra_targets


def auto_device(name: str) -> str:
    if name != "auto":
        return name
    return pick_device("auto").type
