"""Adapter inits computed from the base weight: PiSSA, OLoRA, LoftQ -- PEFT's maths, one function each.

All three start the adapted layer where the base was, or closer to it than 4 bits alone, but with the
update in the *principal* directions of W instead of B = 0. W is (out, in) in float32 (Conv1D's
transposed), s = alpha/r, A: (r, in), B: (out, r).

    PiSSA   W = U diag(σ) Vᵀ (top r):    A = diag(√(σ/s)) Vᵀ_r     B = U_r diag(√(σ/s))      W ← W − s·BA
            pissa_niter_N: the top r from torch.svd_lowrank(W, r, niter=N) (randomized, seeded by torch's RNG)
    OLoRA   W = Q R (reduced QR):          A = R[:r]                 B = Q[:, :r]               W ← W − s·BA
    LoftQ   res = W; repeat N times:       Q̂ = deq(NF4(res));  U Σ Vᵀ = svd(W − Q̂)  (top r)
                                           B = U_r √Σ_r / s,  A = √Σ_r Vᵀ_r;  res = W − s·BA
            the base becomes NF4(res) of the last round (Q̂), so that Q̂ + s·BA ≈ W.

PiSSA and OLoRA leave W − s·BA + s·BA = W up to rounding (the model starts unchanged); LoftQ's base is the
4-bit Q̂ and the error ‖W − Q̂ − s·BA‖ is smaller than ‖W − NF4(W)‖, which `loftq_init` reports.

Because PiSSA and OLoRA change the base, their trained factors (A, B) only apply to the reduced base
W − s·B₀A₀. `converted_factors` turns them into plain LoRA on the original W, as PEFT's
`path_initial_model_for_weight_conversion`: s·(BA − B₀A₀) = s·[B | −B₀][A ; A₀], rank 2r, same s
(alpha doubled, or ×√2 with rsLoRA, since the rank doubled).

NOTE: PEFT's LoftQ (0.21) sets B = U_r √Σ_r without the 1/s (huggingface/peft#1982), so its start is
Q̂ + s·(W − Q̂)_r: the two agree exactly when alpha = r (s = 1); with s ≠ 1 ours is the one whose Q̂ + s·BA
approximates W. PEFT's OLoRA ignores fan_in_fan_out (GPT-2 Conv1D gets factors of the transposed weight);
ours factors the (out, in) weight for every layer type.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import LoraConfig, QuantConfig, init_kind
from lorakit.quant.linear import NF4Linear
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4
from lorakit.runtime.devices import pick_matmul_dtype

log = logging.getLogger(__name__)


@dataclass
class WeightInit:
    """The factors (A (r, in), B (out, r), float32) and what the base becomes: `weight` (out, in) float32 for
    PiSSA/OLoRA, or an NF4Linear for LoftQ; `error` = (‖W − NF4(W)‖, ‖W − Q̂ − s·BA‖) for LoftQ (Frobenius)."""

    A: torch.Tensor
    B: torch.Tensor
    weight: torch.Tensor | None = None
    nf4: NF4Linear | None = None
    error: tuple[float, float] | None = None


def dense_weight(base: nn.Module) -> torch.Tensor:
    """W (out, in) as float32 from an nn.Linear / Conv1D; refuses an NF4 base (its W is gone)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, NF4Linear) or not isinstance(getattr(base, "weight", None), torch.Tensor):
        raise ValueError(
            f"this init reads the full-precision base weight, but the layer is {type(base).__name__}; "
            "initialize the adapter before quantizing (inject_lora, then quantize_model; training with "
            "method: qlora does this for lora.init: pissa | olora | loftq)"
        )
    weight = base.weight.detach()
    return (weight.t() if isinstance(base, Conv1D) else weight).float().contiguous()  # (out, in)


def pissa(W: torch.Tensor, r: int, scaling: float, init: str) -> WeightInit:
    """PiSSA (Meng et al. 2024): the top-r singular triplets of W, split evenly between A and B."""
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (out, k) (k,) (k, in)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        niter = int(init.removeprefix("pissa_niter_"))
        Ur, Sr, V = torch.svd_lowrank(W, r, niter=niter)  # (out, r) (r,) (in, r)
        Sr, Vhr = Sr / scaling, V.t()
    A = torch.diag(torch.sqrt(Sr)) @ Vhr  # (r, in)
    B = Ur @ torch.diag(torch.sqrt(Sr))  # (out, r)
    return WeightInit(A, B, weight=W - scaling * B @ A)


def olora(W: torch.Tensor, r: int, scaling: float) -> WeightInit:
    """OLoRA (Büyükakyüz 2024): an orthonormal B from the QR of W, A = the matching rows of R."""
    Q, R = torch.linalg.qr(W)  # (out, k) (k, in)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return WeightInit(A, B, weight=W - scaling * B @ A)


def loftq(W: torch.Tensor, r: int, scaling: float, iters: int, quant: QuantConfig) -> tuple[WeightInit, torch.Tensor]:
    """LoftQ (Li et al. 2023): alternate NF4 quantization and a rank-r SVD of what it missed.

    Returns the init and the NF4 codes' dequantized Q̂ (out, in) float32; the quantizer is lorakit's NF4
    with `quant`'s blocksize and double quant, i.e. exactly the 4-bit base the model then trains on."""
    res, first_error = W, None
    for i in range(iters):
        state = quantize_nf4(res, quant.blocksize, quant.double_quant)
        Q = dequantize_nf4(state, torch.float32)  # (out, in)
        if first_error is None:
            first_error = torch.linalg.matrix_norm(W - Q).item()  # ‖W − NF4(W)‖: round 1 quantizes W itself
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)  # PEFT's _low_rank_decomposition
        B = U[:, :r] @ torch.diag(torch.sqrt(S[:r])) / scaling  # (out, r)
        A = torch.diag(torch.sqrt(S[:r])) @ Vh[:r]  # (r, in)
        if i + 1 < iters:
            res = W - scaling * B @ A
    error = torch.linalg.matrix_norm(W - Q - scaling * B @ A).item()
    return WeightInit(A, B, error=(first_error, error)), state


def weight_init(base: nn.Module, config: LoraConfig, quant: QuantConfig | None) -> WeightInit:
    """The PiSSA / OLoRA / LoftQ init of one layer (see the module docstring); the caller installs it."""
    W = dense_weight(base)
    kind, r, s = init_kind(config.init), config.r, config.scaling
    if r > min(W.shape):
        raise ValueError(f"lora.r={r} is larger than this layer's smallest side {tuple(W.shape)}; "
                         f"lora.init: {config.init} takes r singular vectors, so use r <= {min(W.shape)}")
    if kind == "pissa":
        return pissa(W, r, s, config.init)
    if kind == "olora":
        return olora(W, r, s)
    quant = quant or QuantConfig()
    init, state = loftq(W, r, s, config.loftq_iter, quant)
    bias = getattr(base, "bias", None)
    conv1d = not isinstance(base, nn.Linear)
    matmul = pick_matmul_dtype(quant.compute_dtype, base.weight.device, base.weight.dtype)
    init.nf4 = NF4Linear(state, bias, matmul, conv1d=conv1d)
    return init


def converted_factors(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-LoRA factors of rank 2r on the original base: [A ; A₀] (2r, in) and [B | −B₀] (out, 2r).

    s·[B | −B₀][A ; A₀] = s·(BA − B₀A₀), the trained update relative to the original W (PEFT's
    subtract_mutated_init)."""
    return torch.cat([A, A0.to(A)], dim=0), torch.cat([B, -B0.to(B)], dim=1)


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """alpha for rank 2r with the same scaling: 2·alpha (alpha/r), √2·alpha (alpha/√r, rsLoRA)."""
    return alpha * (math.sqrt(2) if use_rslora else 2)
