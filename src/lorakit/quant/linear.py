"""NF4Linear: a frozen 4-bit weight, dequantized on the fly for every matmul.

    y     = x Ŵᵀ + b        Ŵ = dequantize_nf4(state) in the compute dtype, (out, in)
    ∂L/∂x = ∂L/∂y · Ŵ       Ŵ dequantized *again* in backward
    ∂L/∂b = Σ ∂L/∂y          only if someone unfroze the bias; there is never a ∂L/∂W

The weight is frozen (QLoRA trains adapters beside it), so backward needs Ŵ and nothing else: the
autograd Function saves no tensor at all. Saving the dequantized Ŵ instead would keep a full-precision
copy of every layer alive between forward and backward -- the memory 4 bits were meant to save. The
price is a second dequantize per layer in backward (cheap next to the matmul).

The matmuls dequantize with `dequantize_scratch` into a per-thread buffer that the next matmul reuses (a
fresh weight-sized tensor per matmul costs page faults on a CPU, where large allocations go back to the OS
when freed). On a CPU the decode is one pass of a small C kernel (lorakit.quant.native: read 0.5 B, write
the weight once, ~0.17 ns per weight on one core); where it cannot be built, eager ops (each packed byte
gathers its two NF4 values as one 8-byte word from a 256-entry table, then one in-place multiply by the
block scales, then the cast: four memory passes, ~1-2 ns per weight). Both bit-exact with `dequantize_nf4`
(same table values, same fp32 multiply, one rounding).

Few rows (batch-1 training and decoding): the matmul is bound by the weight, not by the rows, and
writing the whole fp32 Ŵ out to memory and reading it back costs more than the multiply. `nf4_linear` /
`nf4_grad_input` then go tile by tile over output rows: R rows of Ŵ (R·in·4 bytes ≈ TILE_BYTES, so the
tile stays in the last-level cache) are decoded and multiplied at once,

    y[:, o:o+R]  = x Ŵ[o:o+R]ᵀ            forward, (M, in) x (R, in)ᵀ, written as yᵀ rows (R, M)
    ∂x          += g[:, o:o+R] Ŵ[o:o+R]    backward, (M, R) x (R, in), accumulated over tiles

so the full fp32 Ŵ never exists. Each tile is bit for bit the same rows of `dequantize_nf4`; only the
summation order of ∂x changes (tested against the plain path to 1e-5). Above `TILED_MAX_ROWS` rows
the multiply dominates and one big matmul on the whole Ŵ is faster: the plain path, kept as the reference.

`quantize_model` swaps every nn.Linear / GPT-2 Conv1D of a model (heads excepted) for an NF4Linear;
`NF4Linear.dequantized_layer` turns one back into a full-precision layer of the original type (merge, export).

Device handling: every buffer (and the lookup tables of nf4.py, cached per device) lives on the device of
the weight it was quantized from; `.to(device)` moves the buffers, and a dtype cast (`.to(torch.bfloat16)`)
leaves the fp32 scales alone (see `_apply`). The compute dtype is fixed at construction.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import QuantConfig
from lorakit.quant import native
from lorakit.quant.nf4 import NF4_CODE, NF4State, _tables, dequantize_nf4, quantize_nf4
from lorakit.runtime.devices import pick_matmul_dtype

_FP32_SCALES = ("absmax", "absmax2", "offset")
_STORAGE = ("packed", "absmax", "qabsmax", "absmax2", "offset")  # NF4State tensor fields


TILE_BYTES = 16 * 2**20  # one decoded fp32 tile: half of a 32 MiB L3 cache
# NOTE: not smaller: on a CPU shared with other jobs every matmul call can wait a time slice for its second
# thread, and 512 KiB tiles (88 calls per 2048x5632 layer) measured up to 25x slower than one call.
TILED_MAX_ROWS = 128  # above this, one matmul on the whole Ŵ wins (measured: bench/bench_big.py, bench/RESULTS.md)
_scratch = threading.local()  # per thread: {(role, dtype): 1-D buffer}, grown to the largest layer seen
log = logging.getLogger(__name__)


@functools.cache
def _nf4_table(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device, torch.float32).contiguous()  # (16,)


@functools.cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256,) int64: each packed byte -> its two NF4 fp32 values (high nibble first), as one 8-byte word."""
    return _tables(device)["byte"].contiguous().view(torch.int64).view(-1)


def _buffer(role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (numel,) tensor that the next call with the same role and dtype on this thread overwrites.

    CPU only: CUDA's caching allocator already reuses freed blocks, so elsewhere this allocates."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get((role, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(role, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _float_absmax(state: NF4State) -> torch.Tensor:
    """`state.float_absmax()` (D[qa] · s + c, the same fp32 ops) with a gather instead of advanced indexing."""
    nb, bs2 = state.qabsmax.numel() if state.double_quant else 0, state.blocksize2
    if not state.double_quant or nb % bs2:
        return state.float_absmax()
    codes = _buffer("absmax codes", nb, torch.int64, state.qabsmax.device).copy_(state.qabsmax)  # (nblocks,)
    scaled = torch.gather(_tables(state.qabsmax.device)["dyn"], 0, codes)  # (nblocks,) D[qa]
    return scaled.view(-1, bs2).mul_(state.absmax2[:, None]).view(-1).add_(state.offset)


def dequantize_scratch(state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ (out, in) in `dtype`, equal bit for bit to `dequantize_nf4(state, dtype)`, in a reused buffer.

    The result is valid only until the next call on this thread: use it in one matmul, never keep it.
    """
    n, bs, packed = math.prod(state.shape), state.blocksize, state.packed
    if n % bs or n % 2 or packed.numel() * 2 != n:
        return dequantize_nf4(state, dtype)  # partial last block or odd length: the general path
    if packed.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):  # the C kernel, one pass
        out = _buffer("cast" if dtype != torch.float32 else "nf4", n, dtype, packed.device)
        if native.decode(packed, _float_absmax(state).contiguous(), _nf4_table(packed.device), bs, out):
            return out.view(state.shape)
    idx = _buffer("codes", n // 2, torch.int64, packed.device).copy_(packed)  # (n/2,) byte values 0..255
    values = _buffer("nf4", n, torch.float32, packed.device)
    # gather of 8-byte words: ~3x faster on CPU than index_select of (256, 2) rows
    torch.gather(_byte_table(packed.device), 0, idx, out=values.view(torch.int64))  # (n/2,) value pairs
    values.view(-1, bs).mul_(_float_absmax(state)[:, None])  # (nblocks, B) · absmax_b
    if dtype != torch.float32:
        values = _buffer("cast", n, dtype, packed.device).copy_(values)  # one rounding, as dequantize_nf4
    return values.view(state.shape)


def _tiled(state: NF4State, rows: int, device: torch.device) -> bool:
    """The tile-by-tile path applies: few rows, CPU, blocks that never straddle two rows of Ŵ."""
    out_f, in_f = state.shape
    return (
        device.type == "cpu" and rows <= TILED_MAX_ROWS and in_f % state.blocksize == 0
        and state.packed.numel() * 2 == out_f * in_f and not torch.is_autocast_enabled("cpu")
    )


def _tiles(state: NF4State, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row o, Ŵ[o:o+R] in `dtype`) for every tile, bit-exact with `dequantize_nf4` on those rows (same
    table values, same fp32 multiply, one rounding): the native kernel (lorakit.quant.native) where it runs,
    else eager ops, in reused per-thread buffers."""
    out_f, in_f = state.shape
    rows = max(1, min(out_f, TILE_BYTES // (4 * in_f)))
    per_row = in_f // state.blocksize  # scale blocks per row of Ŵ
    absmax, table = _float_absmax(state).contiguous(), _nf4_table(state.packed.device)
    for o in range(0, out_f, rows):
        r = min(rows, out_f - o)
        packed = state.packed[o * in_f // 2:(o + r) * in_f // 2]  # (r·in/2,)
        scales = absmax[o * per_row:(o + r) * per_row]  # (r·in/B,)
        tile = _buffer("tile out", r * in_f, dtype, packed.device)
        if not native.decode(packed, scales, table, state.blocksize, tile):
            tile = _eager_tile(packed, scales, state.blocksize, dtype)
        yield o, tile.view(r, in_f)


def _eager_tile(packed: torch.Tensor, scales: torch.Tensor, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The tile's decode in eager ops (no C compiler, or a dtype the kernel does not write), in per-thread
    buffers that the next tile overwrites: (n,) in `dtype`."""
    n, device = packed.numel() * 2, packed.device
    idx = _buffer("tile codes", n // 2, torch.int64, device).copy_(packed)  # (n/2,) byte values 0..255
    tile = _buffer("tile", n, torch.float32, device)
    torch.gather(_byte_table(device), 0, idx, out=tile.view(torch.int64))  # (n/2,) pairs of NF4 values
    tile.view(-1, blocksize).mul_(scales[:, None])  # fp32 product, in place
    if dtype == torch.float32:
        return tile
    # NOTE: not torch.mul(..., out=<bf16>): a mixed-dtype out= takes a scalar path, 8x slower (measured)
    return _buffer("tile cast", n, dtype, device).copy_(tile)  # rounded once, as dequantize_nf4 does


def nf4_linear(x: torch.Tensor, state: NF4State, dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Ŵᵀ + b: x (M, in) in `dtype` -> (M, out), tile by tile for few rows on a CPU, else whole Ŵ."""
    if not _tiled(state, x.shape[0], x.device):
        weight = dequantize_scratch(state, dtype)  # (out, in)
        return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    y_t = torch.empty(state.shape[0], x.shape[0], dtype=dtype, device=x.device)  # (out, M)
    x_t = x.t()  # (in, M)
    for o, tile in _tiles(state, dtype):
        torch.mm(tile, x_t, out=y_t[o:o + tile.shape[0]])  # (R, in) @ (in, M) -> (R, M)
    y = y_t.t().contiguous()  # (M, out)
    return y if bias is None else y.add_(bias)


def nf4_grad_input(g: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """g Ŵ: g (M, out) in `dtype` -> (M, in), tile by tile for few rows on a CPU, else whole Ŵ."""
    if not _tiled(state, g.shape[0], g.device):
        return torch.mm(g, dequantize_scratch(state, dtype))  # (M, out) @ (out, in)
    grad = torch.zeros(g.shape[0], state.shape[1], dtype=dtype, device=g.device)  # (M, in)
    for o, tile in _tiles(state, dtype):
        grad.addmm_(g[:, o:o + tile.shape[0]], tile)  # (M, R) @ (R, in)
    return grad


class FrozenNF4:
    """A frozen NF4 base as LoRA's fused matmul uses it (lorakit.lora): `linear(x, b)` = x Ŵᵀ + b and
    `grad_input(g)` = g Ŵ, on 2-D tensors in the model's dtype. Holds no decoded weight.

    The matmuls run in `dtype` (the layer's compute dtype); inputs in another dtype (fp32 activations
    beside a bf16-matmul base) are cast to it and the results back, the bias added after that cast."""

    def __init__(self, state: NF4State, dtype: torch.dtype):
        self.state, self.dtype = state, dtype

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype == self.dtype:
            return nf4_linear(x, self.state, self.dtype, bias)
        y = nf4_linear(x.to(self.dtype), self.state, self.dtype).to(x.dtype)  # (M, out)
        return y if bias is None else y.add_(bias)

    def grad_input(self, g: torch.Tensor) -> torch.Tensor:
        return nf4_grad_input(g.to(self.dtype), self.state, self.dtype).to(g.dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x Ŵᵀ + b with a backward that re-dequantizes Ŵ; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: NF4State, bias: torch.Tensor | None, dtype: torch.dtype):
        # NOTE: the state is kept as a plain attribute, not save_for_backward: the buffers are frozen,
        # and saved-tensor hooks (CPU offload) would otherwise copy the packed weight every step.
        ctx.state, ctx.dtype = state, dtype
        y = nf4_linear(x.reshape(-1, x.shape[-1]), state, dtype, bias)  # (M, in) -> (M, out)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_b = None
        # Under autocast the forward matmul ran in the autocast dtype, so grad_y may be bf16 while Ŵ is
        # in the compute dtype (and backward usually runs outside the autocast block): match them.
        g = grad_y.to(ctx.dtype).reshape(-1, grad_y.shape[-1])  # (M, out)
        if ctx.needs_input_grad[0]:
            grad_x = nf4_grad_input(g, ctx.state, ctx.dtype).view(*grad_y.shape[:-1], -1)  # (..., in)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)  # (out,)
        return grad_x, None, grad_b, None


class NF4Linear(nn.Module):
    """A linear layer whose frozen (out, in) weight is stored as NF4 buffers (~0.516 bytes/weight).

    Buffers (so `state_dict`, `.to(device)` and `.cuda()` carry them): `packed` plus `absmax`, or
    with double quant `qabsmax`, `absmax2`, `offset`. Build one with `NF4Linear.from_linear`.
    `conv1d` records that the weight came from a GPT-2 Conv1D, so that `dequantized_layer` gives one back.
    """

    fsdp_shardable_buffers = ("packed", "qabsmax")  # uint8, 1-D: the bulk of a 4-bit weight; FSDP2 shards them

    def __init__(
        self, state: NF4State, bias: torch.Tensor | None, compute_dtype: torch.dtype, conv1d: bool = False
    ):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.blocksize, self.blocksize2, self.compute_dtype = state.blocksize, state.blocksize2, compute_dtype
        self.conv1d = conv1d
        for name, tensor in state.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        layer: nn.Module,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize an nn.Linear or transformers' Conv1D (weight stored (in, out)); compute_dtype
        None keeps the layer's own weight dtype."""
        from transformers.pytorch_utils import Conv1D

        if isinstance(layer, Conv1D):
            weight = layer.weight.detach().T  # (in, out) -> (out, in)
        elif isinstance(layer, nn.Linear):
            weight = layer.weight.detach()  # (out, in)
        else:
            raise TypeError(f"NF4Linear.from_linear takes nn.Linear or Conv1D, got {type(layer).__name__}")
        state = quantize_nf4(weight, blocksize, double_quant)
        return cls(state, layer.bias, compute_dtype or weight.dtype, conv1d=isinstance(layer, Conv1D))

    def state(self) -> NF4State:
        # By name, not named_buffers(): under FSDP2 the uint8 codes are frozen parameters (so that they
        # are sharded; see lorakit.runtime.distributed.shardable_nf4_storage).
        tensors = {name: getattr(self, name) for name in _STORAGE if getattr(self, name, None) is not None}
        shape = torch.Size((self.out_features, self.in_features))
        return NF4State(shape=shape, blocksize=self.blocksize, blocksize2=self.blocksize2, **tensors)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight Ŵ, (out, in), in `dtype` (default: the compute dtype)."""
        return dequantize_nf4(self.state(), dtype or self.compute_dtype)

    def dequantized_layer(self, delta: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A frozen full-precision nn.Linear (Conv1D if quantized from one) holding Ŵ + delta in `dtype`.

        delta: (out, in) or None, added in fp32 before the one rounding to `dtype` (a LoRA merge)."""
        from transformers.pytorch_utils import Conv1D

        weight = self.dequantize(torch.float32)  # (out, in)
        if delta is not None:
            weight = weight + delta.to(device=weight.device, dtype=torch.float32)
        with torch.device(weight.device):  # allocate on the weight's device, not on the CPU first
            if self.conv1d:
                layer = Conv1D(nf=self.out_features, nx=self.in_features).to(dtype)
                weight = weight.T  # Conv1D stores (in, out)
            else:
                layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
            elif self.conv1d:
                layer.bias.zero_()  # NOTE: Conv1D always has a bias; one quantized without bias gets zeros
        return layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) any float dtype -> (..., out) in x's dtype; the matmul runs in compute_dtype."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _NF4Matmul.apply(x.to(self.compute_dtype), self.state(), bias, self.compute_dtype)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` would round the fp32 scales too and break the
        # bit-exact dequantization; let device moves through but keep their dtype.
        before = {name: getattr(self, name) for name in _FP32_SCALES if getattr(self, name, None) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def extra_repr(self) -> str:
        dq = f", double_quant(blocksize2={self.blocksize2})" if hasattr(self, "qabsmax") else ""
        conv = ", from Conv1D" if self.conv1d else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4(blocksize={self.blocksize}){dq}, compute_dtype={self.compute_dtype}{conv}"
        )


class CastLinear(nn.Linear):
    """An nn.Linear whose weight is stored in another dtype than it computes in (a bf16 LM head of an
    fp32-compute model): y = x · W.to(x.dtype)ᵀ + b. x: (..., in) -> (..., out) in x's dtype.

    The chunked loss (lorakit.loss) treats it as a plain head and casts its weight once per step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def quantize_model(
    model: nn.Module, config: QuantConfig, compute_dtype: torch.dtype | None = None, progress: bool = True
) -> list[str]:
    """Replace every nn.Linear / Conv1D (not in `config.skip_modules`) by an NF4Linear, in place.

    A layer already inside a LoRA wrapper (`<name>.base_layer`) is quantized inside the wrapper and
    matched against the skip list by the wrapper's name. The model's output embedding (the LM head,
    whatever its name) is always kept, as transformers' bitsandbytes integration does. compute_dtype
    None resolves `config.compute_dtype` on each layer's device (`pick_matmul_dtype`; auto falls back to the
    layer's own dtype). Returns the replaced module names.
    """
    from tqdm.auto import tqdm

    targets, linear_names = quant_targets(model, config.skip_modules)
    if not targets:
        raise _nothing_to_quantize(model, config, linear_names)
    for name in tqdm(targets, desc="quantizing to nf4", unit="layer", disable=not progress, leave=False):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        dtype = compute_dtype or pick_matmul_dtype(config.compute_dtype, layer.weight.device, layer.weight.dtype)
        setattr(parent, child, NF4Linear.from_linear(layer, config.blocksize, config.double_quant, dtype))
        # NOTE: the fp weight is freed when the last reference goes; a weight tied to an embedding stays.
        del layer
    _release_checkpoint_mapping(model)
    return targets


def _release_checkpoint_mapping(model: nn.Module) -> None:
    """Give the CPU tensors left in full precision (embeddings, norms, head) memory of their own.

    transformers memory-maps a safetensors checkpoint, and every CPU parameter it loads is a view into
    that one mapping. Quantizing read each replaced fp weight, so its pages are resident, and they stay
    mapped -- counted in the process's RSS, ~3.5 bytes per quantized weight on top of the 4-bit codes --
    for as long as any other parameter still views the mapping. Copying the remaining tensors drops the
    last views and with them the mapping. Cost: one copy of the unquantized parameters (shared ones,
    e.g. a tied head, copied once and still shared).
    """
    copied: set[int] = set()
    buffers: dict[int, torch.Tensor] = {}  # id(old buffer) -> its copy, so that shared buffers stay shared
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NF4Linear):
                continue
            for param in module.parameters(recurse=False):
                if param.device.type == "cpu" and id(param) not in copied:
                    param.data = param.data.clone()
                    copied.add(id(param))
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.device.type == "cpu":
                    setattr(module, name, buffers.setdefault(id(buf), buf.clone()))


def quant_targets(model: nn.Module, skip: list[str]) -> tuple[list[str], list[str]]:
    """(names to quantize, names of all linear layers), both as full module names."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [head, getattr(head, "base_layer", None)]  # the head itself, or inside a LoRA wrapper
    targets, linear_names = [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or ".lora_" in f".{name}":
            continue  # LoRA's own factors (lora_A/lora_B) stay in full precision
        match_name = name.removesuffix(".base_layer")
        linear_names.append(match_name)
        skipped = any(match_name == s or match_name.endswith("." + s) for s in skip)
        if not skipped and not any(module is h for h in heads):
            targets.append(name)
    return targets, linear_names


def _nothing_to_quantize(model: nn.Module, config: QuantConfig, linear_names: list[str]) -> ValueError:
    done = sum(isinstance(m, NF4Linear) for m in model.modules())
    if done:
        return ValueError(f"the model already has {done} NF4Linear layers and nothing left to quantize")
    if not linear_names:
        return ValueError(f"quantize_model found no nn.Linear or Conv1D layer in {type(model).__name__}")
    suffixes = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear_names}))
    return ValueError(
        f"quantize_model found no layer to quantize: the model's nn.Linear/Conv1D layers end with: {suffixes}, "
        f"and quant.skip_modules={config.skip_modules!r} (plus the output head) excludes all of them. "
        f"Remove entries from quant.skip_modules, or use method: lora without quantization."
    )
