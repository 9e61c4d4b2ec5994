"""Grouped per-row adapters: every row of a batch gets its own adapter's low-rank update (or none) with a fixed
number of ops per layer for any mix -- Punica/S-LoRA's batched gather matmul, in plain torch. `LoraLinear`
(lorakit.lora) runs it inside `adapter_rows`; `LoraLinear._forward_rows_reference` (gather, two matmuls and a
scatter per adapter) is the plain version it is tested against (tests/test_lora_rows.py).

    pieces  each adapter's rank cut into slices of one rank c (the last zero-padded; `piece_rank` picks c
            so that padding and the number of pieces stay small): p pieces in all
    slots   w per piece (w = most rows of one adapter); slot (k, j) holds the j-th row using piece k's
            adapter, unused slots row 0 with a zero mask
    A_st    (p, in, c)   Aᵀ of each piece        B_st  (p, c, out)  s_a · Bᵀ of each piece (scaling folded in)
    x_g = x[slots]  (p, w·T, in)      h = x_g A_st · mask  (p, w·T, c)      y[slots] += h B_st  (index_add)

    since x Aᵀ Bᵀ = Σ_k x A_kᵀ B_kᵀ over the rank slices k of A (rows) and B (columns).

Zero-padded ranks and masked slots add exact zeros, so each row gets s_a · x Aᵀ Bᵀ of its own adapter
and base rows (or rows whose adapter does not target the layer) get nothing. The stacks are cached per
layer and set of adapters (decode steps reuse them) and rebuilt when a factor changes (its version
counter), an adapter is added or deleted, or the layer moves device or dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

STACKS_PER_LAYER = 4  # adapter sets whose stacks a layer keeps (continuous batching revisits a few)
PIECE_COST = 8  # a piece's fixed cost (its gathered rows, one more small matmul), in units of rank


def piece_rank(ranks: Sequence[int]) -> int:
    """The rank c each adapter is cut into (and zero-padded to): the one of `ranks` that minimizes
    Σ_a ⌈r_a / c⌉ · (c + PIECE_COST), padded work plus a cost per piece. Ranks 8/16/32/64 give c = 16:
    8 pieces and 128 rank units per row slot, where padding all to 64 would do 256."""
    return min(sorted(set(ranks)), key=lambda c: sum(-(-r // c) for r in ranks) * (c + PIECE_COST))


class RowPlan:
    """Which rows use which adapter, for every layer that sees the same per-row `names` (layers that hold
    the same adapters): adapters in sorted order, `width` slots each; index tensors made once per device.
    Kept across `adapter_rows` blocks (decode steps repeat the same rows), see `_RowLayers`."""

    def __init__(self, names: tuple[str | None, ...], grouped: bool = True):
        self.names, self.grouped = names, grouped
        self.index: dict[tuple[str, torch.device], torch.Tensor] = {}  # the reference path's row indices
        self.adapters = tuple(sorted({n for n in names if n is not None}))
        first = names[0] if len(names) else None
        one = grouped and len(self.adapters) == 1 and all(n == first for n in names)
        self.uniform = first if one else None  # every row on one adapter: the fused path
        self.rows = [[i for i, n in enumerate(names) if n == a] for a in self.adapters]
        self.width = max(map(len, self.rows), default=0)
        self._tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def tensors(self, pieces: tuple[int, ...], device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For a stack whose piece k belongs to adapter pieces[k]: (slots (p·w,) long: the row in each slot,
        unused slots row 0; mask (p, w, 1, 1), 0 on unused slots, or None when every slot is used)."""
        key = (pieces, device, dtype)
        if key not in self._tensors:
            rows = [self.rows[a] for a in pieces]
            slots = [i for r in rows for i in r + [0] * (self.width - len(r))]
            live = None if all(len(r) == self.width for r in rows) else \
                torch.tensor([[1.0] * len(r) + [0.0] * (self.width - len(r)) for r in rows], dtype=dtype,
                             device=device)[:, :, None, None]
            self._tensors[key] = torch.tensor(slots, dtype=torch.long, device=device), live
        return self._tensors[key]


@dataclass
class AdapterStack:
    """One layer's factors of a set of adapters, cut into pieces of equal rank and stacked for
    `GroupedRows` (see the module docstring)."""

    A: torch.Tensor  # (p, in, c)   Aᵀ of each piece (a rank slice of one adapter, zero-padded to c)
    B: torch.Tensor  # (p, c, out)  s · Bᵀ of the same slice
    pieces: tuple[int, ...]  # (p,) the adapter (index into the sorted set) each piece belongs to
    factors: tuple[torch.Tensor, ...]  # the parameters stacked, whose version counters say when to rebuild
    versions: tuple[int, ...]
    dropout: bool  # some adapter has dropout: training-mode forwards take the reference path

    @staticmethod
    def build(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], scalings: Sequence[float],
              dropout: bool) -> AdapterStack | None:
        """Stacks of adapters whose factors are As[i] (r_i, in) and Bs[i] (out, r_i) with scaling s_i; None if
        the factors differ in dtype or device (the reference path handles that)."""
        if len({(t.dtype, t.device) for t in [*As, *Bs]}) != 1:
            return None
        c = piece_rank([a.shape[0] for a in As])
        cuts = [(i, lo) for i, a in enumerate(As) for lo in range(0, a.shape[0], c)]  # (adapter, first rank)
        with torch.no_grad():
            A = As[0].new_zeros(len(cuts), As[0].shape[1], c)  # (p, in, c)
            B = As[0].new_zeros(len(cuts), c, Bs[0].shape[0])  # (p, c, out)
            for k, (i, lo) in enumerate(cuts):  # once per set of adapters, not per forward
                hi = min(lo + c, As[i].shape[0])
                A[k, :, : hi - lo] = As[i][lo:hi].t()
                B[k, : hi - lo] = Bs[i][:, lo:hi].t() * scalings[i]
        factors = (*As, *Bs)
        return AdapterStack(A, B, tuple(i for i, _ in cuts), factors, tuple(p._version for p in factors), dropout)


class GroupedRows:
    """y (B, ..., out) += each row's own s · x Aᵀ Bᵀ with two batched matmuls, x: (B, ..., in), for one plan
    and stack, its index tensors and sizes looked up once: a decode step calls it in every adapted layer
    (`lorakit.lora._RowKernel` keeps one per layer and plan)."""

    __slots__ = ("stack", "slots", "live", "p", "width")

    def __init__(self, plan: RowPlan, stack: AdapterStack, device: torch.device):
        self.stack, self.p, self.width = stack, len(stack.pieces), plan.width
        self.slots, self.live = plan.tensors(stack.pieces, device, stack.A.dtype)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        stack, p, slots = self.stack, self.p, self.slots
        xg = x.reshape(x.shape[0], -1).index_select(0, slots)  # (p·w, T·in)
        if xg.dtype != stack.A.dtype:
            xg = xg.to(stack.A.dtype)
        h = torch.bmm(xg.view(p, -1, x.shape[-1]), stack.A)  # (p, w·T, c)
        if self.live is not None:
            h.view(p, self.width, -1, h.shape[-1]).mul_(self.live)  # unused slots (copies of row 0) add nothing
        delta = torch.bmm(h, stack.B).view(p * self.width, -1)  # (p·w, T·out)
        if not y.is_contiguous():
            y = y.contiguous()
        y.view(y.shape[0], -1).index_add_(0, slots, delta if delta.dtype == y.dtype else delta.to(y.dtype))  # (B, T·out)
        return y
