"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), as PEFT computes it.

The adapted weight is split into a magnitude per output row and a direction:

    W' = m ⊙ (W + s·BA) / n,     n = ‖W + s·BA‖_row  (out,)      A: (r, in)  B: (out, r)  m: (out,)
    y  = x W'ᵀ + b = m/n ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b

m is trainable and starts at n with B = 0, i.e. at ‖W‖_row, so an adapted model starts at the base model.
W is the base weight in (out, in) layout: nn.Linear's own, GPT-2 Conv1D's transposed, NF4Linear's
dequantized Ŵ (QDoRA). n is treated as a constant in backward (paper §4.3, PEFT's `weight_norm.detach()`):

    z   = x Wᵀ + s · x Aᵀ Bᵀ             (M, out)
    ∂m  = Σ_rows g ⊙ z / n                 ∂z = g ⊙ m/n    then A and B get plain LoRA's gradients of z

With dropout in training PEFT applies the base path to x and the adapter path to x_d = dropout(x):

    y = x Wᵀ + b + (m/n − 1) ⊙ x_d Wᵀ + m/n ⊙ s · x_d Aᵀ Bᵀ          (= the line above when x_d = x)

Merging writes W' = m/n ⊙ (W + s·BA) into the base and keeps n, so that unmerging can invert it exactly
as PEFT does: W = W' ⊙ n/m − s·BA.

n costs one pass over W (dequantized for NF4) per forward: a full (out, in) read plus an (out, r)x(r, in)
product, in row chunks so that no fp32 copy of W + s·BA exists at once. It depends only on W, A, B, so
`Magnitude` keeps the last one and reuses it while none of them changed (their version counters): every
decoded token and every micro-batch of one optimizer step reuse it; an optimizer step recomputes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant.linear import NF4Linear, _NF4Matmul, dequantize_scratch

NORM_CHUNK_BYTES = 64 * 2**20  # fp32 rows of W + s·BA materialized at once while computing n


def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base weight W as (out, in) in `dtype`: NF4 dequantized, Conv1D's (in, out) transposed."""
    return base.dequantize(dtype) if isinstance(base, NF4Linear) else _dense_weight(base).to(dtype)


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """nn.Linear's / Conv1D's weight as an (out, in) view in its own dtype (no copy)."""
    from transformers.pytorch_utils import Conv1D

    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def base_matmul(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x Wᵀ without the bias: x (..., in) -> (..., out) in x's dtype (PEFT's `F.linear(x, W)`)."""
    if isinstance(base, NF4Linear):  # decoded tile by tile, nothing saved for backward (quant/linear.py)
        dtype = base.compute_dtype
        return _NF4Matmul.apply(x.to(dtype), base.state(), None, dtype).to(x.dtype)
    return F.linear(x, _dense_weight(base).to(x.dtype))


@torch.no_grad()
def weight_norm(base: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """n = ‖W + s·BA‖ per output row, (out,) float32, never part of the autograd graph.

    Plain PyTorch: torch.linalg.norm(W.float() + scaling * (B.float() @ A.float()), dim=1); here the rows
    are taken in chunks of ~NORM_CHUNK_BYTES so that the fp32 sum never exists for the whole W at once
    (an NF4 base is decoded whole, in fp32, once)."""
    # (out, in); an NF4 Ŵ is decoded into the per-thread scratch buffer (CPU), used only inside this loop
    W = dequantize_scratch(base.state(), torch.float32) if isinstance(base, NF4Linear) else _dense_weight(base)
    A32, B32 = A.detach().float(), B.detach().float()
    out_f, in_f = W.shape
    rows = max(1, NORM_CHUNK_BYTES // (4 * in_f))
    norms = torch.empty(out_f, dtype=torch.float32, device=W.device)
    for o in range(0, out_f, rows):
        chunk = torch.addmm(W[o:o + rows].float(), B32[o:o + rows].to(W.device), A32.to(W.device), alpha=scaling)
        norms[o:o + rows] = torch.linalg.vector_norm(chunk, dim=1)  # (R,)
    return norms


class Magnitude(nn.Module):
    """DoRA's trainable magnitude m, (out,), as PEFT's `lora_magnitude_vector[name].weight`, so that the
    state-dict path `<layer>.lora_magnitude_vector.<adapter>.weight` is PEFT's.

    Not in the state dict: the last n with the versions of (W, A, B) it was computed from, and the n a
    merge used (needed to unmerge)."""

    def __init__(self, norm: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(norm.detach().to(dtype).clone())  # (out,): m starts at ‖W + s·BA‖_row
        self._cached: tuple[tuple, torch.Tensor] | None = None
        self.merged_norm: torch.Tensor | None = None

    def norm(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        """n for the current W, A, B: reused while none of them was changed in place (optimizer step,
        load, merge), recomputed otherwise."""
        key = _version_key([*base.parameters(), *base.buffers(), A, B], scaling)
        if key is not None and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        n = weight_norm(base, A, B, scaling)
        self._cached = None if key is None else (key, n)
        return n

    def extra_repr(self) -> str:
        return f"out={self.weight.shape[0]}"


def _version_key(tensors: list[torch.Tensor], scaling: float) -> tuple | None:
    """(storage, version) of every tensor n depends on; None where versions are not tracked (inference tensors)."""
    try:
        return (scaling, *((t.data_ptr(), t._version, t.device) for t in tensors))
    except RuntimeError:
        return None


def dora_forward(
    x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, magnitude: Magnitude,
    dropout: nn.Module, scaling: float,
) -> torch.Tensor:
    """y = m/n ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b (dropout on the adapter path as PEFT; see the module docstring).

    x: (..., in) -> (..., out) in x's dtype. The adapter path runs in the adapter's dtype, as LoRA's does."""
    n = magnitude.norm(base, A, B, scaling)  # (out,) fp32, constant in backward
    scale = (magnitude.weight / n).to(x.dtype)  # (out,) m/n; ∂m flows through here
    bias = getattr(base, "bias", None)
    if isinstance(dropout, nn.Identity) or not dropout.training:
        lora = F.linear(F.linear(x.to(A.dtype), A), B) * scaling  # (..., out)  s · x Aᵀ Bᵀ
        y = scale * (base_matmul(base, x) + lora.to(x.dtype))  # m/n ⊙ z
        return y if bias is None else y + bias.to(x.dtype)
    x_d = dropout(x)
    lora = F.linear(F.linear(x_d.to(A.dtype), A), B) * scaling  # (..., out)  s · x_d Aᵀ Bᵀ
    # PEFT: base(x) + (m/n − 1) ⊙ x_d Wᵀ + m/n ⊙ s · x_d Aᵀ Bᵀ
    return base(x).to(x.dtype) + (scale - 1) * base_matmul(base, x_d) + scale * lora.to(x.dtype)


def merge_update(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' − W, n) for the merge W' = m/n ⊙ (W + s·BA): W (out, in) float32 -> (out, in), (out,) float32.

    Plain PyTorch: V = W + s * B @ A;  n = V.norm(dim=1);  (m / n)[:, None] * V - W. Shared by the in-memory
    merge and the streamed one (lorakit.export.merge_stream), which then add it to W in fp32 alike."""
    V = torch.addmm(W, B.detach().float(), A.detach().float(), alpha=scaling)  # (out, in)  W + s·BA
    n = torch.linalg.vector_norm(V, dim=1)  # (out,)
    return V.mul_((m.detach().float() / n)[:, None]).sub_(W), n


@torch.no_grad()
def merge_delta(base: nn.Module, A: torch.Tensor, B: torch.Tensor, magnitude: Magnitude, scaling: float) -> torch.Tensor:
    """W' − W for merging into `base` (`merge_update` on its W, float32), keeping n for the unmerge."""
    delta, magnitude.merged_norm = merge_update(base_weight(base, torch.float32), A, B, magnitude.weight, scaling)
    return delta


@torch.no_grad()
def unmerge_delta(base: nn.Module, A: torch.Tensor, B: torch.Tensor, magnitude: Magnitude, scaling: float) -> torch.Tensor:
    """W − W' for the inverse of `merge_delta`: W = W' ⊙ n/m − s·BA with the n the merge used. (out, in) fp32."""
    if magnitude.merged_norm is None:
        raise RuntimeError("this DoRA adapter was not merged by this process, so its norm is unknown; cannot unmerge")
    W_merged = base_weight(base, torch.float32)  # (out, in)
    factor = (magnitude.merged_norm / magnitude.weight.detach().float())[:, None]  # (out, 1) n/m
    magnitude.merged_norm = None
    W = torch.addmm(W_merged * factor, B.detach().float(), A.detach().float(), alpha=-scaling)
    return W.sub_(W_merged)
