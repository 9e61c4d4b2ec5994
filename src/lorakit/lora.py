"""LoRA: a low-rank update beside any frozen linear layer.

    y = base(x) + s · dropout(x) Aᵀ Bᵀ          A: (r, in)  B: (out, r)  s = alpha/r  (alpha/√r with rsLoRA)

B starts at zero, so an adapted model starts exactly at the base model. The wrapper holds the base
layer (nn.Linear, GPT-2's Conv1D, or lorakit's NF4Linear) as `base_layer` and the factors in
`lora_A[name]` / `lora_B[name]` ModuleDicts, the same module paths PEFT uses, so our state-dict keys
map one-to-one onto PEFT's adapter files (`...q_proj.lora_A.weight`).

Several named adapters can live on one model: `set_adapter` picks the active one, `adapters_disabled`
gives the base output, and `adapter_rows` lets each row of a batch use its own adapter (or none) in one
forward -- the server batches requests for different adapters this way.

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
import functools
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import TARGET_PRESETS, LoraConfig
from lorakit.errors import ConfigError

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
    """Layer types LoRA can wrap; imported lazily so lorakit.lora has no hard dep on quant."""
    from transformers.pytorch_utils import Conv1D

    from lorakit.quant.linear import NF4Linear

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


def _frozen_base(layer: nn.Module, dtype: torch.dtype) -> tuple[Callable[[], torch.Tensor], torch.Tensor | None] | None:
    """(function giving the (out, in) weight, bias) of a frozen base computing in `dtype`, or None.

    Only exact nn.Linear / Conv1D / NF4Linear without hooks: a subclass (bitsandbytes' Linear4bit) or
    a hooked module (accelerate's offloading) must run its own forward."""
    from transformers.pytorch_utils import Conv1D

    from lorakit.quant.linear import NF4Linear, dequantize_scratch

    if layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook"):
        return None
    bias = layer.bias
    if bias is not None and (bias.requires_grad or bias.dtype != dtype):
        return None
    if type(layer) is NF4Linear:
        if layer.compute_dtype != dtype:
            return None
        return functools.partial(dequantize_scratch, layer.state(), dtype), bias  # dequantized again in backward
    if type(layer) not in (nn.Linear, Conv1D) or layer.weight.requires_grad or layer.weight.dtype != dtype:
        return None
    weight = layer.weight if type(layer) is nn.Linear else layer.weight.t()  # Conv1D stores (in, out)
    return (lambda: weight), bias


def _lora_matmul(x, x_lora, A, B, bias, weight_fn, scaling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (..., out), x_d (M, in), h = x_d Aᵀ (M, r)): the fused forward, shared by training and inference."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    xd = x2 if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])  # (M, in)
    weight = weight_fn()  # (out, in); a 4-bit base's is a scratch buffer, used here and dropped
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())  # (M, out)
    h = torch.mm(xd, A.t())  # (M, r)
    y.addmm_(h, B.t(), alpha=scaling)  # y += s · h Bᵀ, no (M, out) temporary
    return y.view(*x.shape[:-1], y.shape[-1]), xd, h


class _LoraMatmul(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ for a frozen W; the maths is in the module docstring."""

    @staticmethod
    def forward(ctx, x, x_lora, A, B, bias, weight_fn, scaling):
        y, xd, h = _lora_matmul(x, x_lora, A, B, bias, weight_fn, scaling)
        ctx.save_for_backward(xd, h, A, B)
        ctx.weight_fn, ctx.scaling, ctx.same_input = weight_fn, scaling, x_lora is None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xd, h, A, B = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (M, out)
        g_h = torch.mm(g, B).mul_(ctx.scaling)  # (M, r)
        grad_x = grad_x_lora = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, ctx.weight_fn())  # (M, out) @ (out, in) -> (M, in)
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


class LoraLinear(nn.Module):
    """A frozen base layer plus named low-rank adapters; see the module docstring for the maths."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: Sequence[str | None] | None = None
        self.row_index: dict[tuple[str, torch.device], torch.Tensor] = {}  # shared by all layers in adapter_rows

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        device = next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()])).device
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, device=device)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / config.r)
        else:  # PEFT's default: kaiming-uniform A, as nn.Linear initializes its own weight
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.active_adapters = [name]

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · dropout(x) Aᵀ Bᵀ, computed in the adapter's dtype. x: (..., in) -> (..., out)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        h = self.lora_dropout[name](x.to(A.dtype))
        return F.linear(F.linear(h, A), B) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused_forward(x)
        if fused is not None:
            return fused
        y = self.base_layer(x)
        if self.disabled:
            if self.merged_adapters:
                raise RuntimeError("adapters are merged into the base weights; unmerge before disabling them")
            return y
        if self.row_adapters is not None:
            return self._forward_rows(x, y)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                y = y + self.delta(x, name).to(y.dtype)
        return y

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """base(x) + delta(x) through `_LoraMatmul` when exactly one unmerged adapter applies to every row
        and the base is frozen and in x's dtype; None when the plain path must run."""
        if self.disabled or self.row_adapters is not None or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        base = _frozen_base(self.base_layer, x.dtype)
        if name in self.merged_adapters or base is None or not x.dtype == A.dtype == B.dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        weight_fn, bias = base
        dropout = self.lora_dropout[name]
        x_lora = None if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x)
        if not torch.is_grad_enabled():  # inference (decode, serving): no autograd node per layer and token
            return _lora_matmul(x, x_lora, A, B, bias, weight_fn, self.scaling[name])[0]
        return _LoraMatmul.apply(x, x_lora, A, B, bias, weight_fn, self.scaling[name])

    def _forward_rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Row i of the batch gets adapter row_adapters[i] (None = base only). x: (B, ..., in)."""
        names = self.row_adapters
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_rows has {len(names)} names for a batch of {x.shape[0]} rows")
        for name in dict.fromkeys(n for n in names if n is not None):
            # one host->device copy per adapter per `adapter_rows` block, not one per layer per forward
            rows = self.row_index.get((name, x.device))
            if rows is None:
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)  # (rows of name,)
                self.row_index[(name, x.device)] = rows
            y = y.index_add(0, rows, self.delta(x.index_select(0, rows), name).to(y.dtype))  # (B, ..., out)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A as a (out, in) float32 matrix (Conv1D callers transpose it)."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (B @ A) * self.scaling[name]

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].out_features for n in self.lora_A}
        return f"in={self.in_features}, out={self.out_features}, adapters(rank)={ranks}, active={self.active_adapters}"


# --------------------------------------------------------------------------- target discovery


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every layer LoRA could wrap (the base layers of existing wrappers included)."""
    types = linear_types()
    names = []
    for name, module in model.named_modules():
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


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Wrap the target layers of `model` in place, freeze everything but the adapters (and
    `config.modules_to_save`), make `adapter_name` the active adapter, and return the adapted module names.

    Heads (lm_head, score, classifier) are adapted only when named in a list or matched by a regex;
    `modules_to_save` trains a module (a classifier head) in full instead, like PEFT's option.
    """
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; adapters here: {list(adapter_configs(model))}")
    targets = find_target_modules(model, config.target_modules)
    save_names = _find_modules_to_save(model, config.modules_to_save)
    _check_save_owners(model, save_names, adapter_name)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _replace_module(model, name, module)
        module.add_adapter(adapter_name, config)
    # a copy: the caller's lists may be changed later (PEFT's LoraConfig appends to modules_to_save in place)
    model.lorakit_adapters = {**adapter_configs(model), adapter_name: copy.deepcopy(config)}
    freeze_base(model, [m for a in adapter_configs(model) for m in modules_to_save(model, a)])
    set_adapter(model, adapter_name)
    return targets


def modules_to_save(model: nn.Module, adapter_name: str) -> list[str]:
    """Full names of the modules `adapter_name` trains in full."""
    return _find_modules_to_save(model, adapter_configs(model)[adapter_name].modules_to_save)


def _check_save_owners(model: nn.Module, save_names: list[str], adapter_name: str) -> None:
    # NOTE: a module trained in full exists once (PEFT keeps a copy per adapter); two adapters that
    # both train it would overwrite each other's weights, so that is refused instead.
    for other in adapter_configs(model):
        shared = sorted(set(save_names) & set(modules_to_save(model, other)))
        if shared:
            raise ValueError(
                f"adapter {adapter_name!r} trains {shared} in full, but adapter {other!r} already does; lorakit keeps "
                "one copy of a fully trained module, so load the second adapter into its own model instance"
            )


def _find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    found = []
    module_names = [n for n, _ in model.named_modules()]
    for wanted in names:
        hits = [n for n in module_names if _suffix_match(n, wanted)]
        if not hits:
            heads = [n for n in module_names if n.rsplit(".", 1)[-1] in OUTPUT_HEADS]
            raise ConfigError(f"lora.modules_to_save entry {wanted!r} matched no module; heads here: {heads}")
        found += hits
    return found


def freeze_base(model: nn.Module, trainable_modules: Sequence[str] = ()) -> None:
    """requires_grad only on LoRA factors and on modules trained in full (e.g. a classifier head)."""
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_A." in name or ".lora_B." in name
    for name in trainable_modules:
        for param in model.get_submodule(name).parameters():
            param.requires_grad = True
    model.lorakit_modules_to_save = list(trainable_modules)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    return dict(getattr(model, "lorakit_adapters", {}))


# --------------------------------------------------------------------------- several adapters


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter every wrapped layer applies, and (as in PEFT) the one whose factors
    are trainable; the other adapters' factors get requires_grad=False.

    NOTE: a module trained in full (modules_to_save) is not per adapter: it applies whichever adapter
    is active, and `adapters_disabled` does not restore the base head (PEFT keeps a copy; we do not).
    """
    if name not in adapter_configs(model):
        raise ValueError(f"no adapter named {name!r}; adapters here: {list(adapter_configs(model))}")
    for _, layer in lora_layers(model):
        layer.active_adapters = [name] if name in layer.lora_A else []
        for store in (layer.lora_A, layer.lora_B):
            for adapter, factor in store.items():
                factor.requires_grad_(adapter == name)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside this block the model computes the base output (adapters skipped, not removed)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Row i of every batch inside this block uses adapter names[i] (None = base model)."""
    unknown = sorted({n for n in names if n is not None} - set(adapter_configs(model)))
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; adapters here: {list(adapter_configs(model))}")
    layers = [layer for _, layer in lora_layers(model)]
    merged = sorted({a for layer in layers for a in layer.merged_adapters})
    if merged:
        raise RuntimeError(f"adapter(s) {merged} are merged into the base weights; unmerge them before adapter_rows")
    index: dict[tuple[str, torch.device], torch.Tensor] = {}
    for layer in layers:
        layer.row_adapters = [n if n in layer.lora_A else None for n in names]
        layer.row_index = index
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters, layer.row_index = None, {}


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (the wrappers stay, for the other adapters)."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; adapters here: {list(configs)}")
    if any(name in layer.merged_adapters for _, layer in lora_layers(model)):
        raise RuntimeError(f"adapter {name!r} is merged into the base weights; unmerge_lora_weights before deleting it")
    for _, layer in lora_layers(model):
        for store in (layer.lora_A, layer.lora_B, layer.lora_dropout):
            if name in store:  # ModuleDict.pop has no default argument
                del store[name]
        layer.scaling.pop(name, None)
        layer.active_adapters = [n for n in layer.active_adapters if n != name]
    del configs[name]
    model.lorakit_adapters = configs


# --------------------------------------------------------------------------- parameters


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit layer counts its logical in×out weights."""
    from lorakit.quant.linear import NF4Linear

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
    from lorakit.quant.linear import NF4Linear

    quantized = 0
    for name, layer in list(lora_layers(model)):
        if isinstance(layer.base_layer, NF4Linear):
            if not remove_wrappers:
                raise ValueError(f"{name}: a 4-bit base can only be merged with remove_wrappers=True")
            deltas = [layer.delta_weight(a) for a in layer.active_adapters]
            merged = layer.base_layer.dequantized_layer(sum(deltas) if deltas else None, _model_dtype(model))
            _replace_module(model, name, merged)
            quantized += 1
            continue
        for adapter in layer.active_adapters:
            if adapter not in layer.merged_adapters:
                _add_to_base(layer, layer.delta_weight(adapter))
                layer.merged_adapters.append(adapter)
        if remove_wrappers:
            _replace_module(model, name, layer.base_layer)
    if remove_wrappers:
        plain = _dequantize_remaining(model)
        if quantized or plain:
            log.warning(
                "merged %d 4-bit layers into dequantized full-precision weights (not re-quantized), dtype %s; "
                "%d 4-bit layers without an adapter were dequantized too", quantized, _model_dtype(model), plain,
            )
        model.lorakit_adapters = {}
        model.lorakit_modules_to_save = []
        for param in model.parameters():
            param.requires_grad = False
    return model


def _dequantize_remaining(model: nn.Module) -> int:
    from lorakit.quant.linear import NF4Linear

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
            _add_to_base(layer, -layer.delta_weight(adapter))
        layer.merged_adapters = []
    return model


def _add_to_base(layer: LoraLinear, delta: torch.Tensor) -> None:
    weight = layer.base_layer.weight
    delta = delta.T if is_conv1d(layer.base_layer) else delta  # Conv1D weight is (in, out)
    with torch.no_grad():
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

