"""NF4: 4-bit NormalFloat blockwise quantization with double quantization, bit-exact with bitsandbytes.

The maths (QLoRA, Dettmers et al. 2023). w is flattened to n values in blocks of B (64); the last
block may be partial:

    absmax_b = max_i |w_bi|                                    (nblocks,)  nblocks = ceil(n/B)
    q_bi     = nearest k of NF4[k] to w_bi / absmax_b          4 bits, two codes per byte
    ŵ_bi     = NF4[q_bi] · absmax_b

Double quantization stores the fp32 absmax in 8 bits, blocks of 256 (B2):

    c    = mean_b absmax_b                                     scalar offset
    s_j  = max_{b in block j} |absmax_b - c|                   (ceil(nblocks/256),) fp32
    qa_b = 8-bit code of (absmax_b - c) / s_j in D             D: signed dynamic map, 256 values
    absmax_b ≈ D[qa_b] · s_j + c

Bits per weight: 4 + 8/64 + 32/(64·256) ≈ 4.127 (0.516 bytes), against 4.5 without double quant.

Rounding follows bitsandbytes' CPU path exactly (tested bit for bit):
- NF4 codes: x = w · (1/absmax) in fp32 (the partial last block divides, w / absmax), clamped to
  [-1, 1], bucketed on the fp32 midpoints of NF4; a value exactly on a midpoint takes the lower code.
- 8-bit codes are *not* the nearest code. bnb's C kernel snaps x = a · (1/s) onto a 65536-point grid,
  g = trunc(((x + 1) · 0.5) · 65535 + 0.5), and reads LUT[g] = the code nearest to the grid value
  -1 + 2g/65535. The grid step 3e-5 is coarser than D near 0, so 7 codes (|D| <= 7.75e-6, 0
  included) are never chosen, and ~0.2% of absmax values get another code than the nearest one.

NOTE: bnb's CUDA kernel picks the 8-bit code by a binary search for the nearest one instead, so bnb
on a GPU differs from bnb on a CPU in those ~0.2% of scales (by one code). lorakit uses the CPU
rounding on every device, so a base quantized on a GPU and on a CPU is the same up to the last bit
of the mean offset (a reduction whose order differs between devices).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip
"""The 16 NormalFloat values (fp32), as bitsandbytes' `get_4bit_type('nf4')` holds them.

Quantiles of N(0, 1) with equal probability mass per bin, scaled to [-1, 1]: 8 positive values
ppf(linspace(0.9677083, 0.5, 9)[:-1]), 7 negative ones -ppf(linspace(0.9677083, 0.5, 8)[:-1]), and 0.
The asymmetry (8 vs 7) buys an exact zero, so zero weights and padding stay exactly zero.
"""
DOUBLE_QUANT_BLOCKSIZE = 256
_GRID = 65536  # points of bnb's 8-bit quantization grid over [-1, 1]


def dynamic_map_signed() -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), sorted, (256,) fp32.

    Dynamic exponent + linear fraction: exponent e = 0..6 gives 2^e evenly spaced means in
    [0.1, 1] scaled by 10^(e-6), each with both signs; plus 0 and 1. Computed with the same fp32
    ops as bnb so the values agree bit for bit.
    """
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += [10.0 ** (e - 6) * means, -(10.0 ** (e - 6)) * means]
    return torch.cat(values).sort().values


@functools.cache
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Lookup tables on `device`, built once: code midpoints, the 65536-point LUT, byte -> (hi, lo)."""
    nf4, dyn = NF4_CODE, dynamic_map_signed()
    grid = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32)) / (_GRID - 1)  # (65536,)
    tables = {
        "nf4_mid": (nf4[:-1] + nf4[1:]) / 2,  # (15,)
        "dyn": dyn,  # (256,)
        "dyn_lut": torch.searchsorted((dyn[:-1] + dyn[1:]) * 0.5, grid),  # (65536,) code nearest each point
        "byte": torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], 1),  # (256, 2): byte -> (hi, lo)
    }
    return {k: v.to(device) for k, v in tables.items()}


@dataclass
class NF4State:
    """A packed 4-bit weight and its scales; `absmax` is set without double quant, the rest with it."""

    packed: torch.Tensor  # uint8 (ceil(n/2),), element 2i in the high nibble of byte i (bnb order)
    shape: torch.Size
    blocksize: int
    absmax: torch.Tensor | None = None  # fp32 (nblocks,)
    qabsmax: torch.Tensor | None = None  # uint8 (nblocks,): 8-bit codes of absmax - offset
    absmax2: torch.Tensor | None = None  # fp32 (ceil(nblocks/256),)
    offset: torch.Tensor | None = None  # fp32 scalar: mean of absmax
    blocksize2: int = DOUBLE_QUANT_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    def float_absmax(self) -> torch.Tensor:
        """The per-block scales as fp32 (nblocks,); with double quant D[qa] · s + c, rounded like bnb."""
        if not self.double_quant:
            return self.absmax
        dyn = _tables(self.qabsmax.device)["dyn"]
        nb, nb2 = self.qabsmax.numel(), self.absmax2.numel()
        scaled = F.pad(dyn[self.qabsmax.int()], (0, nb2 * self.blocksize2 - nb)).view(nb2, self.blocksize2)
        return (scaled * self.absmax2[:, None]).view(-1)[:nb] + self.offset  # (nblocks,)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "qabsmax", "absmax2", "offset") if self.double_quant else ("packed", "absmax")
        return {name: getattr(self, name) for name in names}


QUANT_CHUNK = 2**21  # weights quantized at once: temporaries of a few MB, not ~20 bytes per weight of the tensor


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """Quantize any-shape float `w` (bnb computes in fp32, so do we) into an NF4State.

    Blocks are independent, so `w` is taken QUANT_CHUNK weights at a time (a whole number of blocks):
    the fp32 copy and the temporaries exist for one chunk only (a streamed load's peak is the final
    model plus these, not plus ~20 bytes per weight of its largest tensor). Bit for bit the same."""
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even integer >= 2, got {blocksize!r} (64 is standard)")
    if not w.is_floating_point() or w.numel() == 0:
        raise ValueError(
            f"quantize_nf4 needs a non-empty float tensor, got {w.dtype} of shape {tuple(w.shape)}"
        )
    x = w.detach().reshape(-1)  # (n,)
    n, step = x.numel(), max(1, QUANT_CHUNK // blocksize) * blocksize  # step: whole blocks, even
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmaxes = []
    for start in range(0, n, step):
        absmax, scaled = _absmax_and_scaled(x[start:start + step].float(), blocksize)
        codes = torch.bucketize(scaled, _tables(w.device)["nf4_mid"], out_int32=True).to(torch.uint8)  # (chunk,)
        codes = F.pad(codes, (0, codes.numel() % 2), value=7)  # odd n: pad with the code of 0.0, like bnb
        torch.bitwise_or(codes[0::2] << 4, codes[1::2], out=packed[start // 2:start // 2 + codes.numel() // 2])
        absmaxes.append(absmax)
    absmax = torch.cat(absmaxes)  # (nblocks,)
    if not torch.isfinite(absmax).all():
        bad = (~torch.isfinite(absmax)).sum().item()
        raise ValueError(f"weight of shape {tuple(w.shape)} has inf/nan in {bad} of {absmax.numel()} blocks")
    state = NF4State(packed=packed, shape=w.shape, blocksize=blocksize)
    if not double_quant:
        state.absmax = absmax
        return state
    state.offset = absmax.mean()
    state.qabsmax, state.absmax2 = _quantize_8bit(absmax - state.offset, DOUBLE_QUANT_BLOCKSIZE)
    return state


def _absmax_and_scaled(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) fp32 -> absmax (nblocks,), x / absmax clamped to [-1, 1] (n,), with bnb's exact fp32 ops."""
    full = x.numel() - x.numel() % blocksize
    blocks = x[:full].view(-1, blocksize)  # (n // B, B)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < x.numel():  # partial last block: bnb divides here instead of multiplying by 1/absmax
        last = x[full:].abs().amax().clamp(min=1e-38)
        absmax, scaled = torch.cat([absmax, last[None]]), torch.cat([scaled, x[full:] / last])
    return absmax, scaled.clamp(-1, 1)


def _quantize_8bit(a: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a (m,) fp32 -> 8-bit codes (m,) uint8 and scales (ceil(m/B),) fp32, as bnb's CPU C kernel."""
    nb = math.ceil(a.numel() / blocksize)
    blocks = F.pad(a, (0, nb * blocksize - a.numel())).view(nb, blocksize)  # zero padding keeps the max
    s = blocks.abs().amax(1)  # (nb,)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # s == 0: bnb writes code 0
    x = (blocks * inv[:, None]).clamp(-1, 1)
    grid = (((x + 1.0) * 0.5) * (_GRID - 1) + 0.5).int()  # trunc == floor: the argument is >= 0.5
    codes = torch.where(s[:, None] > 0, _tables(a.device)["dyn_lut"][grid], 0)
    return codes.view(-1)[: a.numel()].to(torch.uint8), s


def dequantize_nf4(state: NF4State, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = NF4[q] · absmax as `state.shape`; computed in fp32 and rounded once to `dtype`, like bnb."""
    n, bs = math.prod(state.shape), state.blocksize
    nb = math.ceil(n / bs)
    values = _tables(state.packed.device)["byte"].index_select(0, state.packed.int()).view(-1)  # (2·bytes,)
    values = values[:n] if n % bs == 0 else F.pad(values[:n], (0, nb * bs - n))
    values = values.view(nb, bs).mul_(state.float_absmax()[:, None])  # (nblocks, B)
    return values.view(-1)[:n].view(state.shape).to(dtype)
