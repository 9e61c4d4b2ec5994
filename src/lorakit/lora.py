"""LoRA: a low-rank update beside any frozen linear layer.

    y = base(x) + s · dropout(x) Aᵀ Bᵀ          A: (r, in)  B: (out, r)  s = alpha/r  (alpha/√r with rsLoRA)

B starts at zero, so an adapted model starts exactly at the base model. The wrapper holds the base
layer (nn.Linear, GPT-2's Conv1D, or lorakit's NF4Linear) as `base_layer` and the factors in
`lora_A[name]` / `lora_B[name]` ModuleDicts, the same module paths PEFT uses, so our state-dict keys
map one-to-one onto PEFT's adapter files (`...q_proj.lora_A.weight`).

Several named adapters can live on one model: `set_adapter` picks the active one, `adapters_disabled`
gives the base output, and `adapter_rows` lets each row of a batch use its own adapter (or none) in one
forward -- the server batches requests for different adapters this way. Per-row adapters run grouped
(lorakit.lora_rows: Punica/S-LoRA's batched gather matmul, in plain torch, a fixed number of ops per layer
for any mix; the stacks of factors it needs are cached per layer and set of adapters). When every row uses
the same adapter the fused single-adapter path below runs instead. `_forward_rows_reference` (gather, two
matmuls and a scatter per adapter) is the plain version, kept as the oracle and for training (autograd on,
or live dropout).

Modules an adapter trains in full (`modules_to_save`: a classifier head) get one copy per adapter beside the base's own (heads.py), so the
same three switches apply to them.

Two variants hook in here and keep their maths in modules of their own: a DoRA adapter (`use_dora`,
lorakit.dora) adds a magnitude m per output row and takes its own forward, m/‖W + s·BA‖_row ⊙ (x Wᵀ +
s·x AᵀBᵀ) + b (a batch that mixes it with other adapters is refused by `adapter_rows`); `init: pissa |
olora | loftq` (lorakit.inits) sets A, B from the base weight and changes the base (reduced by s·BA, or
LoftQ's 4-bit Q̂), keeping (A₀, B₀) so that the adapter can be saved as plain LoRA on the original base.

The common case -- one active adapter over a frozen nn.Linear, Conv1D or NF4Linear, all in one dtype --
runs as one autograd Function, `_LoraMatmul`, with the derivatives written out:

    forward    h = x_d Aᵀ  (M, r)        y = x Wᵀ + b,  then  y += s · h Bᵀ   in place
    backward   g_h = s · g B  (M, r)
               ∂x = g W + g_h A           (g_h A added in place when x_d = x, i.e. no dropout)
               ∂A = g_hᵀ x_d  (r, in)     ∂B = s · gᵀ h  (out, r)

It saves x_d and h, as autograd would for the unfused expression, but makes no (M, out) temporaries
for `delta · s` and `y + delta` in forward, nor for `g · s` and the sum of the two ∂x in backward, and
fetches W again in backward instead of saving it (a 4-bit base is dequantized again; see quant/linear.py).
Everything else (several adapters, per-row adapters, autocast, a trainable base) takes the plain path.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import dora, inits
from lorakit.config import TARGET_PRESETS, WEIGHT_INITS, LoraConfig, QuantConfig, init_kind
from lorakit.errors import AdapterError, ConfigError
from lorakit.heads import (
    SavedModule,
    base_name,
    carries_head,
    classifier_head,
    is_sequence_classifier,
    saved_modules,
)
from lorakit.lora_rows import STACKS_PER_LAYER, AdapterStack, GroupedRows, RowPlan
from lorakit.quant.linear import FrozenNF4, NF4Linear

log = logging.getLogger(__name__)

OUTPUT_HEADS = ("lm_head", "score", "classifier")

# Presets name the attention projections; architectures spell them differently, so each preset tries
# these spellings in order and uses the first one whose every entry exists in the model.
PRESET_SPELLINGS: dict[str, list[tuple[str, ...]]] = {
    "minimal": [("q_proj", "v_proj"), ("qkv_proj",), ("c_attn",), ("query", "value"), ("query_key_value",)],
    "attention": [
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("qkv_proj", "o_proj"),
        ("c_attn", "attn.c_proj"),
        ("query", "key", "value", "attention.output.dense"),
        ("query_key_value", "attention.dense"),
    ],
}
assert set(PRESET_SPELLINGS) | {"all-linear"} == set(TARGET_PRESETS)


def linear_types() -> tuple[type, ...]:
    """Layer types LoRA can wrap (Conv1D imported here: transformers is heavy to import)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, NF4Linear)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a wrappable layer; Conv1D stores its weight as (in, out)."""
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features
    return layer.weight.shape[0], layer.weight.shape[1]


def is_conv1d(layer: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


def fan_in_fan_out(layer: nn.Module) -> bool:
    """True for a layer that is, or was quantized from, a Conv1D (PEFT's `fan_in_fan_out`)."""
    return is_conv1d(layer) or bool(getattr(layer, "conv1d", False))


class _FrozenDense:
    """A frozen full-precision (out, in) weight with the two products the fused matmul needs."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, in) -> x Wᵀ + b (M, out)."""
        return torch.mm(x, self.weight.t()) if bias is None else torch.addmm(bias, x, self.weight.t())

    def grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """g (M, out) -> g W (M, in)."""
        return torch.mm(g, self.weight)


def _frozen_base(layer: nn.Module, dtype: torch.dtype) -> tuple[Any, torch.Tensor | None] | None:
    """(frozen base with `.linear(x, b)` and `.grad_input(g)`, bias) of a layer computing in `dtype`, or None.

    Only exact nn.Linear / Conv1D / NF4Linear without hooks: a subclass (bitsandbytes' Linear4bit) or
    a hooked module (accelerate's offloading) must run its own forward."""
    from transformers.pytorch_utils import Conv1D

    if layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook"):
        return None
    bias = layer.bias
    if bias is not None and (bias.requires_grad or bias.dtype != dtype):
        return None
    if type(layer) is NF4Linear:  # decoded again in backward, tile by tile for few rows; in its own matmul dtype
        return FrozenNF4(layer.state(), layer.compute_dtype), bias
    if type(layer) not in (nn.Linear, Conv1D) or layer.weight.requires_grad or layer.weight.dtype != dtype:
        return None
    weight = layer.weight if type(layer) is nn.Linear else layer.weight.t()  # Conv1D stores (in, out)
    return _FrozenDense(weight), bias


def _lora_matmul(x, x_lora, A, B, bias, base, scaling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (..., out), x_d (M, in), h = x_d Aᵀ (M, r)): the fused forward, shared by training and inference."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    xd = x2 if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])  # (M, in)
    y = base.linear(x2, bias)  # (M, out)
    h = torch.mm(xd, A.t())  # (M, r)
    y.addmm_(h, B.t(), alpha=scaling)  # y += s · h Bᵀ, no (M, out) temporary
    return y.view(*x.shape[:-1], y.shape[-1]), xd, h


class _LoraMatmul(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ for a frozen W; the maths is in the module docstring."""

    @staticmethod
    def forward(ctx, x, x_lora, A, B, bias, base, scaling):
        y, xd, h = _lora_matmul(x, x_lora, A, B, bias, base, scaling)
        ctx.save_for_backward(xd, h, A, B)
        ctx.base, ctx.scaling, ctx.same_input = base, scaling, x_lora is None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xd, h, A, B = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (M, out)
        g_h = torch.mm(g, B).mul_(ctx.scaling)  # (M, r)
        grad_x = grad_x_lora = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.base.grad_input(g)  # (M, out) @ (out, in) -> (M, in)
            if ctx.same_input:
                grad_x.addmm_(g_h, A)  # + the LoRA path's share, in place
            grad_x = grad_x.view(*grad_y.shape[:-1], -1)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_x_lora = torch.mm(g_h, A).view(*grad_y.shape[:-1], -1)  # (M, in)
        if ctx.needs_input_grad[2]:
            grad_A = torch.mm(g_h.t(), xd)  # (r, in)
        if ctx.needs_input_grad[3]:
            grad_B = torch.mm(g.t(), h).mul_(ctx.scaling)  # (out, r)
        return grad_x, grad_x_lora, grad_A, grad_B, None, None, None


class _RowKernel:
    """A LoraLinear's no-grad forward under one RowPlan, decided once (`decide`) and reused while it `fits`:
    decode steps repeat the same rows, so the checks of `forward` (DoRA, the fused path's conditions, the
    stack lookup) and the views of the factors are made once per plan, not per layer and token.

        base     no row's adapter targets the layer:      y = x Wᵀ + b
        uniform  every row on one adapter a:              y = x Wᵀ + b;  y += s·(x Aₐᵀ) Bₐᵀ   (`_lora_matmul`)
        grouped  a mix:                                   y = x Wᵀ + b;  lorakit.lora_rows.GroupedRows
        run=None anything else (DoRA, autocast, merged adapters, factors of another dtype, live dropout):
                 `forward`'s general path, the fused single-adapter matmul or the reference loop.

    Kept per plan in `row_kernels`; valid for x's dtype and device, the train/eval mode, the base layer
    (`quantize_model` swaps it inside the wrapper) and the factors' version counters (an in-place update of A
    or B, e.g. a training step between two generations, rebuilds it)."""

    __slots__ = ("plan", "dtype", "device", "training", "base", "factors", "versions", "run")
    KEPT = 16  # plans whose kernels a layer keeps (rows joining and leaving make new plans; cases alternate)

    def __init__(self, layer: LoraLinear, x: torch.Tensor, factors: tuple[torch.Tensor, ...], run):
        self.plan, self.dtype, self.device, self.training = layer.row_plan, x.dtype, x.device, layer.training
        self.base, self.factors, self.versions, self.run = layer.base_layer, factors, tuple(f._version for f in factors), run

    def fits(self, layer: LoraLinear, x: torch.Tensor) -> bool:
        return (self.plan is layer.row_plan and self.dtype is x.dtype and self.training is layer.training
                and self.device == x.device and self.base is layer.base_layer
                and self.versions == tuple(f._version for f in self.factors) and not torch.is_autocast_enabled(x.device.type))

    @classmethod
    def remember(cls, layer: LoraLinear, x: torch.Tensor) -> _RowKernel:
        """`decide`, kept in the layer's `row_kernels` (the oldest dropped beyond KEPT)."""
        kernels = layer.row_kernels
        kernels.pop(layer.row_plan, None)
        while len(kernels) >= cls.KEPT:
            del kernels[next(iter(kernels))]
        kernel = kernels[layer.row_plan] = cls.decide(layer, x)
        return kernel

    @classmethod
    def decide(cls, layer: LoraLinear, x: torch.Tensor) -> _RowKernel:
        plan = layer.row_plan
        if len(plan.names) != x.shape[0]:
            raise ValueError(f"adapter_rows has {len(plan.names)} names for a batch of {x.shape[0]} rows")
        general = cls(layer, x, (), None)
        if torch.is_autocast_enabled(x.device.type) or any(a in layer.lora_magnitude_vector for a in plan.adapters):
            return general
        frozen = _frozen_base(layer.base_layer, x.dtype)
        if frozen is None:  # a base that runs its own forward (bitsandbytes' Linear4bit, a hooked module)
            base_only = layer.base_layer
        else:
            base, bias = frozen

            def base_only(x: torch.Tensor) -> torch.Tensor:
                return base.linear(x.reshape(-1, x.shape[-1]), bias).view(*x.shape[:-1], -1)

        if not plan.adapters:
            return cls(layer, x, (), base_only)
        if not plan.grouped or any(a in layer.merged_adapters for a in plan.adapters):
            return general
        name = plan.uniform
        if name is not None and frozen is not None:
            A, B, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
            live_dropout = layer.training and not isinstance(layer.lora_dropout[name], nn.Identity)
            if not live_dropout and x.dtype == A.dtype == B.dtype:
                return cls(layer, x, (A, B), lambda x: _lora_matmul(x, None, A, B, bias, base, s)[0])
        stack = layer._stack(plan.adapters)
        if stack is None or (stack.dropout and layer.training):
            return general
        grouped = GroupedRows(plan, stack, x.device)
        return cls(layer, x, stack.factors, lambda x: grouped(x, base_only(x)))


class LoraLinear(nn.Module):
    """A frozen base layer plus named low-rank adapters; see the module docstring for the maths."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: name -> dora.Magnitude (m, (out,))
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_plan: RowPlan | None = None  # inside adapter_rows: each row's adapter, shared by layers alike
        self.stacks: OrderedDict[tuple[str, ...], AdapterStack] = OrderedDict()  # grouped path, per adapter set
        self.row_kernels: dict[RowPlan, _RowKernel] = {}  # the no-grad row forwards decided for recent plans
        # PiSSA / OLoRA adapters: (A₀, B₀) on the CPU, to save the trained adapter converted (lorakit.inits)
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def row_adapters(self) -> tuple[str | None, ...] | None:
        """Inside `adapter_rows`: row i's adapter in this layer (None = base only, or not targeted here)."""
        return None if self.row_plan is None else self.row_plan.names

    def add_adapter(self, name: str, config: LoraConfig, quant: QuantConfig | None = None) -> inits.WeightInit | None:
        """Add adapter `name`; returns the weight init (PiSSA/OLoRA/LoftQ, lorakit.inits) when one ran.
        `quant` is LoftQ's NF4 format (default QuantConfig())."""
        device = next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()])).device
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, device=device)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        weight_init = None
        if init_kind(config.init) in WEIGHT_INITS:  # A, B from W, and W changed (pissa/olora) or quantized (loftq)
            weight_init = self._install_weight_init(name, inits.weight_init(self.base_layer, config, quant),
                                                    config.init != "loftq")
        elif config.init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / config.r)
        else:  # PEFT's default: kaiming-uniform A, as nn.Linear initializes its own weight
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        if weight_init is None:
            nn.init.zeros_(self.lora_B[name].weight)
        if config.use_dora:  # m starts at ‖W + s·BA‖_row (after any init that changed W, A or B), as in PEFT
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            self.lora_magnitude_vector[name] = dora.Magnitude(dora.weight_norm(self.base_layer, A, B, config.scaling), A.dtype)
        self.active_adapters = [name]
        self.forget_stacks()
        return weight_init

    def forget_stacks(self) -> None:
        """Drop what the row paths cached (stacks, row kernel): the adapters or the base layer changed."""
        self.stacks.clear()
        self.row_kernels.clear()

    def _apply(self, fn, recurse=True):
        self.forget_stacks()  # .to(device/dtype) may give the factors new storage (version counters stay)
        return super()._apply(fn, recurse)

    def _install_weight_init(self, name: str, init: inits.WeightInit, keep_initial: bool) -> inits.WeightInit:
        """Copy the init's A, B into the adapter and its base into the layer: the reduced W (PiSSA/OLoRA), or
        the LoftQ NF4Linear in place of the full-precision layer."""
        with torch.no_grad():
            for factor, value in ((self.lora_A[name].weight, init.A), (self.lora_B[name].weight, init.B)):
                factor.copy_(value)
            if init.nf4 is not None:
                self.base_layer = init.nf4.to(init.A.device)
            else:
                weight = self.base_layer.weight
                weight.copy_(init.weight.t() if is_conv1d(self.base_layer) else init.weight)  # Conv1D: (in, out)
        if keep_initial:
            self.initial_factors[name] = (init.A.detach().cpu().clone(), init.B.detach().cpu().clone())
        return init

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · dropout(x) Aᵀ Bᵀ, computed in the adapter's dtype. x: (..., in) -> (..., out)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        h = self.lora_dropout[name](x.to(A.dtype))
        return F.linear(F.linear(h, A), B) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_plan is not None and not self.disabled and not torch.is_grad_enabled():
            kernel = self.row_kernels.get(self.row_plan)  # decode steps: the checks below made once per plan
            if kernel is None or not kernel.fits(self, x):
                kernel = _RowKernel.remember(self, x)
            if kernel.run is not None:
                return kernel.run(x)
        name = self._dora_adapter(x)
        if name is not None:  # DoRA rescales the whole output row-wise: its own forward (lorakit.dora)
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            return dora.dora_forward(x, self.base_layer, A, B, self.lora_magnitude_vector[name],
                                     self.lora_dropout[name], self.scaling[name])
        if self.row_plan is not None and not self.disabled:
            return self._forward_rows(x)
        fused = self._fused_forward(x)
        if fused is not None:
            return fused
        y = self.base_layer(x)
        if self.disabled:
            if self.merged_adapters:
                raise RuntimeError("adapters are merged into the base weights; unmerge before disabling them")
            return y
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                y = y + self.delta(x, name).to(y.dtype)
        return y

    def _dora_adapter(self, x: torch.Tensor) -> str | None:
        """The DoRA adapter when one applies to every row (the active one, or the one all rows of `adapter_rows`
        use; batches that mix a DoRA adapter with others are refused there), else None."""
        if self.disabled or not len(self.lora_magnitude_vector):
            return None
        if self.row_plan is not None:
            names = set(self.row_plan.names)
            name = names.pop() if len(names) == 1 and len(self.row_plan.names) == x.shape[0] else None
        else:
            name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        return name if name in self.lora_magnitude_vector and name not in self.merged_adapters else None

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """base(x) + delta(x) through `_LoraMatmul` when exactly one unmerged adapter applies to every row
        (the active one, or the one all rows of `adapter_rows` use) and the base is frozen and in x's
        dtype; None when the plain path must run."""
        if self.disabled:
            return None
        if self.row_plan is not None:
            name = self.row_plan.uniform
            if name is None or len(self.row_plan.names) != x.shape[0]:
                return None
        elif len(self.active_adapters) == 1:
            name = self.active_adapters[0]
        else:
            return None
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        base = _frozen_base(self.base_layer, x.dtype)
        if name in self.merged_adapters or base is None or not x.dtype == A.dtype == B.dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        base, bias = base
        dropout = self.lora_dropout[name]
        x_lora = None if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x)
        if not torch.is_grad_enabled():  # inference (decode, serving): no autograd node per layer and token
            return _lora_matmul(x, x_lora, A, B, bias, base, self.scaling[name])[0]
        return _LoraMatmul.apply(x, x_lora, A, B, bias, base, self.scaling[name])

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Row i of the batch gets adapter row_adapters[i] (None = base only). x: (B, ..., in)."""
        plan = self.row_plan
        if len(plan.names) != x.shape[0]:
            raise ValueError(f"adapter_rows has {len(plan.names)} names for a batch of {x.shape[0]} rows")
        if plan.uniform is not None:  # every row on one adapter: base + its update in one fused matmul
            fused = self._fused_forward(x)
            if fused is not None:
                return fused
        y = self.base_layer(x)
        if not plan.adapters:
            return y  # no row's adapter targets this layer
        return self._forward_rows_reference(x, y)  # without autograd, the grouped path ran instead (_RowKernel)

    def _stack(self, adapters: tuple[str, ...]) -> AdapterStack | None:
        """The cached stacks of `adapters` (built or rebuilt as needed); None if their factors differ in
        dtype or device (the reference path handles that)."""
        stack = self.stacks.get(adapters)
        if stack is not None and stack.versions == tuple(p._version for p in stack.factors):
            self.stacks.move_to_end(adapters)
            return stack
        stack = AdapterStack.build([self.lora_A[a].weight for a in adapters], [self.lora_B[a].weight for a in adapters],
                                   [self.scaling[a] for a in adapters],
                                   any(not isinstance(self.lora_dropout[a], nn.Identity) for a in adapters))
        if stack is not None:
            self.stacks[adapters] = stack
            while len(self.stacks) > STACKS_PER_LAYER:
                self.stacks.popitem(last=False)  # least recently used
                self.row_kernels.clear()  # they may hold it: a layer holds at most STACKS_PER_LAYER stacks
        return stack

    def _forward_rows_reference(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The plain per-row path: for each adapter, gather its rows, two matmuls, scatter them back."""
        names, index = self.row_plan.names, self.row_plan.index
        for name in dict.fromkeys(n for n in names if n is not None):
            # one host->device copy per adapter and plan, not one per layer per forward
            rows = index.get((name, x.device))
            if rows is None:
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)  # (rows of name,)
                index[(name, x.device)] = rows
            y = y.index_add(0, rows, self.delta(x.index_select(0, rows), name).to(y.dtype))  # (B, ..., out)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A as a (out, in) float32 matrix (Conv1D callers transpose it)."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (B @ A) * self.scaling[name]

    def merge_delta(self, name: str) -> torch.Tensor:
        """W' − W that merging adapter `name` adds to the (out, in) base: s·BA, or for DoRA
        m/n ⊙ (W + s·BA) − W (lorakit.dora.merge_delta, which keeps n for the unmerge). float32."""
        if name in self.lora_magnitude_vector:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            return dora.merge_delta(self.base_layer, A, B, self.lora_magnitude_vector[name], self.scaling[name])
        return self.delta_weight(name)

    def unmerge_delta(self, name: str) -> torch.Tensor:
        """W − W' that undoes `merge_delta` on the merged base: −s·BA, or DoRA's W' ⊙ n/m − s·BA − W'."""
        if name in self.lora_magnitude_vector:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            return dora.unmerge_delta(self.base_layer, A, B, self.lora_magnitude_vector[name], self.scaling[name])
        return -self.delta_weight(name)

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].out_features for n in self.lora_A}
        dora_names = f", dora={list(self.lora_magnitude_vector)}" if len(self.lora_magnitude_vector) else ""
        return f"in={self.in_features}, out={self.out_features}, adapters(rank)={ranks}, active={self.active_adapters}{dora_names}"


# --------------------------------------------------------------------------- target discovery


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every layer LoRA could wrap (the base layers of existing wrappers included); layers
    inside a module trained in full are not among them (PEFT never adapts those either)."""
    types = linear_types()
    inside_saved = tuple(f"{name}." for name, _ in saved_modules(model))
    names = []
    for name, module in model.named_modules():
        if name.startswith(inside_saved):
            continue
        if isinstance(module, LoraLinear):
            names.append(name)
        elif isinstance(module, types) and not name.endswith("base_layer") and ".lora_" not in name:
            names.append(name)
    return names


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _is_head(name: str, model: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    module = model.get_submodule(name)
    inner = module.base_layer if isinstance(module, LoraLinear) else module
    return (out is not None and inner is out) or any(_suffix_match(name, h) for h in OUTPUT_HEADS)


def _suffix_hint(names: list[str]) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(suffixes) if suffixes else "(none: the model has no nn.Linear/Conv1D layers)"


def find_target_modules(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Resolve a preset, a list of suffixes or a regex into full module names (heads excluded
    unless named explicitly in a list). Raises ConfigError (a ValueError) naming what matched nothing."""
    names = linear_module_names(model)
    if targets == "all-linear":
        found = [n for n in names if not _is_head(n, model)]
    elif isinstance(targets, str) and targets in PRESET_SPELLINGS:
        found = _resolve_preset(targets, names)
    elif isinstance(targets, str):
        found = [n for n in names if re.fullmatch(targets, n)]
    else:
        missing = [t for t in targets if not any(_suffix_match(n, t) for n in names)]
        if missing and len(missing) < len(targets):
            raise ConfigError(
                f"lora.target_modules entries {missing} matched no layer (the others did); "
                f"linear layers here end with: {_suffix_hint(names)}"
            )
        found = [n for n in names if any(_suffix_match(n, t) for t in targets)]
    if not found:
        raise ConfigError(
            f"lora.target_modules {targets!r} matched no module; linear layers here end with: "
            f"{_suffix_hint(names)}. Use one of those, a preset ({', '.join(TARGET_PRESETS)}), or a regex."
        )
    return found


def _resolve_preset(preset: str, names: list[str]) -> list[str]:
    for spelling in PRESET_SPELLINGS[preset]:
        if all(any(_suffix_match(n, s) for n in names) for s in spelling):
            return [n for n in names if any(_suffix_match(n, s) for s in spelling)]
    return []


# --------------------------------------------------------------------------- injection


def inject_lora(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", quant: QuantConfig | None = None
) -> list[str]:
    """Wrap the target layers of `model` in place, freeze everything but the adapters (and the adapter's
    copies of `config.modules_to_save`), make `adapter_name` the active adapter, and return the adapted names.

    Heads (lm_head, score, classifier) are adapted only when named in a list or matched by a regex.
    `modules_to_save` trains modules in full instead, like PEFT's option: None (the default) means the
    classification head of a sequence classifier (heads.classifier_head, what PEFT's task_type=SEQ_CLS
    trains, plus a pooler) and nothing for other models; a list names exactly the modules, [] none.
    Layers inside a module trained in full get no LoRA (as in PEFT).
    `config.init` pissa | olora | loftq reads (and changes) the full-precision target weights, so it runs
    before quantize_model; loftq quantizes its targets itself, in `quant`'s NF4 format.
    """
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; adapters here: {list(adapter_configs(model))}")
    _check_weight_init(model, config)
    save_names = resolve_modules_to_save(model, config.modules_to_save)
    targets = _targets_outside(find_target_modules(model, config.target_modules), save_names, config)
    for name in save_names:
        module = model.get_submodule(name)
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            _replace_module(model, name, module)
        module.add_adapter(adapter_name)
    loftq_errors = []
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _replace_module(model, name, module)
        init = module.add_adapter(adapter_name, config, quant)
        if init is not None and init.error is not None:
            loftq_errors.append(init.error)
    if loftq_errors:
        _log_loftq(loftq_errors, config)
    # a copy, with the modules resolved: the caller's lists may change later (PEFT's LoraConfig appends in place)
    resolved = dataclasses.replace(copy.deepcopy(config), modules_to_save=list(save_names))
    model.lorakit_adapters = {**adapter_configs(model), adapter_name: resolved}
    freeze_base(model)
    set_adapter(model, adapter_name)
    return targets


def _check_weight_init(model: nn.Module, config: LoraConfig) -> None:
    if init_kind(config.init) in WEIGHT_INITS and adapter_configs(model):
        raise ValueError(
            f"lora.init: {config.init} changes the base weights, which the adapter(s) {list(adapter_configs(model))} "
            "already on this model apply to; add it to a fresh model, or use init: kaiming"
        )


def _log_loftq(errors: list[tuple[float, float]], config: LoraConfig) -> None:
    """‖W − NF4(W)‖ against ‖W − Q̂ − s·BA‖ over all LoftQ layers (Frobenius, summed in squares)."""
    before = math.sqrt(sum(b * b for b, _ in errors))
    after = math.sqrt(sum(a * a for _, a in errors))
    log.warning(
        "LoftQ (loftq_iter=%d, r=%d) on %d layers: reconstruction error ‖W − NF4(W)‖ = %.4g -> ‖W − Q̂ − s·BA‖ = "
        "%.4g (%.1f%% lower)", config.loftq_iter, config.r, len(errors), before, after, 100 * (1 - after / max(before, 1e-30)),
    )
    if config.loftq_iter > 1:  # NOTE: round 1 quantizes W itself, so only loftq_iter 1 keeps the standard 4-bit base
        log.warning("LoftQ with loftq_iter=%d: the 4-bit base is NF4(W − s·BA) of round %d, not NF4(W); the saved adapter "
                    "reproduces this model only on that base, and a fresh QLoRA load (lorakit eval, generate) re-quantizes "
                    "W: a small gap. loftq_iter: 1 has none.", config.loftq_iter, config.loftq_iter - 1)


def modules_to_save(model: nn.Module, adapter_name: str) -> list[str]:
    """Full names of the modules `adapter_name` trains in full (its copies live in `<name>.modules_to_save`)."""
    return [name for name, module in saved_modules(model) if adapter_name in module.modules_to_save]


def resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Full module names for `lora.modules_to_save` (None: the classifier head of a sequence classifier);
    warns when a sequence classifier would train, and so save, no head."""
    found = classifier_head(model) if names is None else _find_modules_to_save(model, names)
    found = [n for n in found if not any(n.startswith(f"{outer}.") for outer in found)]  # outermost only
    for name in found:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear) or any(isinstance(m, LoraLinear) for m in module.modules()):
            raise ValueError(f"lora.modules_to_save entry {name!r} carries LoRA layers of another adapter; a module "
                             "trained in full cannot also be LoRA-adapted -- load this adapter into its own model")
    if is_sequence_classifier(model) and not carries_head(model, found):
        heads = classifier_head(model)
        fix = (f"Leave lora.modules_to_save unset (null) to train and save {heads}, as PEFT's task_type=SEQ_CLS does."
               if heads else "Name the module that computes the logits in lora.modules_to_save.")
        log.warning("lora.modules_to_save=%s trains no classification head of this %s: the adapter will not carry one, "
                    "so its predictions depend on the base's head -- random whenever the base was not trained for this "
                    "task. %s", names, type(model).__name__, fix)
    return found


def _targets_outside(targets: list[str], save_names: list[str], config: LoraConfig) -> list[str]:
    """The LoRA targets not inside a module trained in full (PEFT skips those too)."""
    inside = tuple(f"{n}." for n in save_names)
    kept = [t for t in targets if t not in save_names and not t.startswith(inside)]
    if not kept:
        raise ValueError(f"lora.target_modules {config.target_modules!r} matched only layers inside the modules trained "
                         f"in full ({save_names}); target layers outside them, or change lora.modules_to_save")
    return kept


def _find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    found = []
    module_names = [n for n, _ in model.named_modules() if base_name(n) == n]
    for wanted in names:
        hits = [n for n in module_names if _suffix_match(n, wanted)]
        if not hits:
            heads = [n for n in module_names if n.rsplit(".", 1)[-1] in OUTPUT_HEADS]
            raise ConfigError(f"lora.modules_to_save entry {wanted!r} matched no module; heads here: {heads}")
        found += [n for n in hits if n not in found]
    return found


def freeze_base(model: nn.Module) -> None:
    """requires_grad only on LoRA factors and on copies of modules trained in full (`set_adapter` then
    leaves only the active adapter's trainable)."""
    for name, param in model.named_parameters():
        param.requires_grad = (".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name
                               or ".modules_to_save." in name)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    return dict(getattr(model, "lorakit_adapters", {}))


# --------------------------------------------------------------------------- several adapters


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter every wrapped layer applies, and (as in PEFT) the one whose factors and
    module copies are trainable; the other adapters' get requires_grad=False. A module `name` does not
    train in full computes with the base's own weights."""
    if name not in adapter_configs(model):
        raise ValueError(f"no adapter named {name!r}; adapters here: {list(adapter_configs(model))}")
    for _, layer in lora_layers(model):
        layer.active_adapters = [name] if name in layer.lora_A else []
        for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            for adapter, factor in store.items():
                factor.requires_grad_(adapter == name)
    for _, saved in saved_modules(model):
        saved.set_adapter(name)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside this block the model computes the base output (adapters skipped, not removed; modules trained
    in full compute with the base's own weights, as PEFT's ModulesToSaveWrapper does)."""
    layers = [layer for _, layer in lora_layers(model)] + [saved for _, saved in saved_modules(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None], grouped: bool = True) -> Iterator[None]:
    """Row i of every batch inside this block uses adapter names[i] (None = base model).

    `grouped=False` runs the reference per-adapter loop (`LoraLinear._forward_rows_reference`) instead of
    the grouped matmuls; the results agree to rounding.
    """
    found = _RowLayers.of(model)
    plans = found.plans(tuple(names), grouped)
    merged = sorted({a for layer in found.layers for a in layer.merged_adapters})
    if merged:
        raise RuntimeError(f"adapter(s) {merged} are merged into the base weights; unmerge them before adapter_rows")
    found.assign(plans, list(names))
    try:
        yield
    finally:
        found.assign(None, None)


class _RowLayers:
    """The LoRA layers of a model grouped by the adapters they hold, its modules trained in full, and the
    RowPlans of recent row names (checked once, when first seen): what `adapter_rows` would otherwise
    recompute (two walks over every module) on each decode step. Cached on the model and valid while
    `model.lorakit_adapters` is the same dict: inject_lora, delete_adapter and merging replace it.
    NOTE: wrapping or unwrapping layers by hand, outside lorakit.lora, is not seen; call
    `_RowLayers.forget(model)` after such surgery."""

    MAX_PLANS = 64

    def __init__(self, model: nn.Module):
        self.configs = getattr(model, "lorakit_adapters", None)
        self.layers = [layer for _, layer in lora_layers(model)]
        self.saved = [module for _, module in saved_modules(model)]
        groups: dict[frozenset[str], list[LoraLinear]] = {}
        for layer in self.layers:
            groups.setdefault(frozenset(layer.lora_A.keys()), []).append(layer)
        self.groups = list(groups.items())
        self._plans: dict[tuple[tuple[str | None, ...], bool], list[RowPlan]] = {}

    @classmethod
    def of(cls, model: nn.Module) -> _RowLayers:
        found = model.__dict__.get("_lorakit_row_layers")
        if found is None or found.configs is not getattr(model, "lorakit_adapters", None):
            found = cls(model)
            model.__dict__["_lorakit_row_layers"] = found  # a plain attribute, not a submodule
        return found

    @staticmethod
    def forget(model: nn.Module) -> None:
        model.__dict__.pop("_lorakit_row_layers", None)

    def plans(self, names: tuple[str | None, ...], grouped: bool) -> list[RowPlan]:
        """One RowPlan per group of layers (rows whose adapter a group does not hold see None there)."""
        plans = self._plans.get((names, grouped))
        if plans is None:
            configs = self.configs or {}
            unknown = sorted({n for n in names if n is not None} - set(configs))
            if unknown:
                raise ValueError(f"unknown adapter(s) {unknown}; adapters here: {list(configs)}")
            _refuse_dora_rows(configs, names)
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.clear()
            masked = [tuple(n if n in held else None for n in names) for held, _ in self.groups]
            made = {m: RowPlan(m, grouped) for m in dict.fromkeys(masked)}  # groups seeing the same names share one
            plans = self._plans[(names, grouped)] = [made[m] for m in masked]
        return plans

    def assign(self, plans: list[RowPlan] | None, names: list[str | None] | None) -> None:
        """Give every layer its group's plan (None: leave row mode). `row_plan` and `row_adapters` are plain
        attributes: object.__setattr__ skips nn.Module's parameter/buffer/submodule bookkeeping, which
        would cost more than the rest of this call on each decode step."""
        for i, (_, group) in enumerate(self.groups):
            plan = None if plans is None else plans[i]
            for layer in group:
                object.__setattr__(layer, "row_plan", plan)
        for module in self.saved:
            object.__setattr__(module, "row_adapters", names)


def _refuse_dora_rows(configs: dict[str, LoraConfig], names: Sequence[str | None]) -> None:
    # NOTE: mixed rows add each row's s·x AᵀBᵀ to a shared base output (grouped matmuls); a DoRA row instead
    # rescales its whole output row by m/‖W + s·BA‖, so it cannot ride that path. A batch whose rows all use
    # one DoRA adapter runs DoRA's own forward; a mixed one is refused rather than computed wrongly.
    dora_names = sorted({n for n in names if n is not None and getattr(configs.get(n), "use_dora", False)})
    if dora_names and len(set(names)) > 1:
        raise AdapterError(
            f"adapter(s) {dora_names} use DoRA, which rescales each layer's whole output row by m/‖W + s·BA‖ "
            f"instead of adding a low-rank delta, so they cannot share a batch with other rows ({sorted(set(names), key=str)}); "
            "give DoRA rows a batch of their own, or merge the DoRA adapter into its base (lorakit merge) and "
            "serve the merged model"
        )


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (the wrappers stay, for the other adapters)."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; adapters here: {list(configs)}")
    if any(name in layer.merged_adapters for _, layer in lora_layers(model)):
        raise RuntimeError(f"adapter {name!r} is merged into the base weights; unmerge_lora_weights before deleting it")
    for _, layer in lora_layers(model):
        for store in (layer.lora_A, layer.lora_B, layer.lora_dropout, layer.lora_magnitude_vector):
            if name in store:  # ModuleDict.pop has no default argument
                del store[name]
        layer.scaling.pop(name, None)
        layer.active_adapters = [n for n in layer.active_adapters if n != name]
        layer.forget_stacks()
    for module_name, saved in list(saved_modules(model)):
        if name in saved.modules_to_save:
            saved.remove_adapter(name)
        if not len(saved.modules_to_save):  # no adapter trains it any more: the base's own module again
            _replace_module(model, module_name, saved.original_module)
    del configs[name]
    model.lorakit_adapters = configs


# --------------------------------------------------------------------------- parameters


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit layer counts its logical in×out weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    """PEFT's one-line report: `trainable params: … || all params: … || trainable%: …`."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"


# --------------------------------------------------------------------------- merge


def merge_lora_weights(model: nn.Module, remove_wrappers: bool = True) -> nn.Module:
    """Fold each layer's active adapter into its base weight: W' = W + s·BA.

    With `remove_wrappers` the LoRA wrappers are replaced by plain layers (a standard model that
    saves with `save_pretrained`). A 4-bit base is merged into its *dequantized* weight, giving a
    full-precision nn.Linear (Conv1D for GPT-2) in the model's dtype -- it is never silently
    re-quantized, which would lose the update -- and the 4-bit layers without an adapter are
    dequantized too, so the result holds no NF4 buffers that transformers could not load.
    Without `remove_wrappers` the wrappers stay so that `unmerge_lora_weights` can undo the merge.
    """
    quantized = 0
    for name, layer in list(lora_layers(model)):
        if isinstance(layer.base_layer, NF4Linear):
            if not remove_wrappers:
                raise ValueError(f"{name}: a 4-bit base can only be merged with remove_wrappers=True")
            deltas = [layer.merge_delta(a) for a in layer.active_adapters]
            merged = layer.base_layer.dequantized_layer(sum(deltas) if deltas else None, _model_dtype(model))
            _replace_module(model, name, merged)
            quantized += 1
            continue
        for adapter in layer.active_adapters:
            if adapter not in layer.merged_adapters:
                _add_to_base(layer, layer.merge_delta(adapter))
                layer.merged_adapters.append(adapter)
        if remove_wrappers:
            _replace_module(model, name, layer.base_layer)
    if remove_wrappers:
        for name, saved in list(saved_modules(model)):  # the active adapter's trained copy replaces the original
            _replace_module(model, name, saved.active_module())
        plain = _dequantize_remaining(model)
        if quantized or plain:
            log.warning(
                "merged %d 4-bit layers into dequantized full-precision weights (not re-quantized), dtype %s; "
                "%d 4-bit layers without an adapter were dequantized too", quantized, _model_dtype(model), plain,
            )
        model.lorakit_adapters = {}
        for param in model.parameters():
            param.requires_grad = False
    return model


def _dequantize_remaining(model: nn.Module) -> int:
    names = [name for name, module in model.named_modules() if isinstance(module, NF4Linear)]
    for name in names:
        _replace_module(model, name, model.get_submodule(name).dequantized_layer(dtype=_model_dtype(model)))
    return len(names)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the rest of the model computes in (its input embedding's), fp32 if it has none."""
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        weight = None
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def unmerge_lora_weights(model: nn.Module) -> nn.Module:
    """Subtract merged adapters again (full-precision bases merged with remove_wrappers=False)."""
    for _, layer in lora_layers(model):
        for adapter in reversed(layer.merged_adapters):
            _add_to_base(layer, layer.unmerge_delta(adapter))
        layer.merged_adapters = []
    return model


def _add_to_base(layer: LoraLinear, delta: torch.Tensor) -> None:
    weight = layer.base_layer.weight
    delta = delta.T if is_conv1d(layer.base_layer) else delta  # Conv1D weight is (in, out)
    with torch.no_grad():
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

