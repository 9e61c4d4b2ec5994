"""Examples -> padded tensors, and packing several examples into one row without cross-talk.

A packed row holds documents d_1..d_k back to back. Three things make it equal to running them apart:

    position_ids  restart at 0 in every document (rotary/learned positions see what they would alone)
    attention     block-diagonal and causal: token t of d_j attends to tokens <= t of d_j only
                  mask[b, 0, q, k] = same_doc(q, k) and k <= q          (B, 1, T, T) bool
    labels        the first token of every document is -100: the loss shifts labels by one, and
                  predicting d_j's first token from d_(j-1)'s last would be a cross-document loss

so the token-weighted loss of a packed batch equals that of the same examples unpacked. Padding at
the end of a row is its own 'document' attending only to itself (no fully masked row, so no NaN).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.templates import IGNORE, Example


@dataclass
class PackedRow:
    """Several examples concatenated; `lengths` says where each one ends."""

    input_ids: list[int]
    labels: list[int]
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def supervised(self) -> int:
        return sum(y != IGNORE for y in self.labels)


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[PackedRow]:
    """Best-fit-decreasing bin packing into rows of at most max_seq_len tokens (deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in order:
        n = min(len(examples[i]), max_seq_len)
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - n, b))
    return [_concat([examples[i] for i in members], max_seq_len) for members in bins]


def _concat(examples: list[Example], max_seq_len: int) -> PackedRow:
    ids, labels, lengths = [], [], []
    for ex in examples:
        part_ids, part_labels = ex.input_ids[:max_seq_len], list(ex.labels[:max_seq_len])
        part_labels[0] = IGNORE  # never learned from the previous document (see module docstring)
        ids += part_ids
        labels += part_labels
        lengths.append(len(part_ids))
    return PackedRow(ids, labels, lengths)


def collate(rows: Sequence[Example | PackedRow], pad_id: int, packing: bool = False, max_seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch. Examples -> input_ids, attention_mask (B, T), labels (B, T) or (B,) for
    classification; PackedRows -> plus position_ids (B, T) and a block-diagonal mask (B, 1, T, T)."""
    del packing  # the row type says it: PackedRows get the block-diagonal mask
    width = max(len(r) for r in rows)
    if max_seq_len is not None:
        width = min(width, max_seq_len)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        n = min(len(r), width)
        input_ids[b, :n] = torch.tensor(r.input_ids[:n])
    if isinstance(rows[0], Example) and isinstance(rows[0].labels, int):  # sequence classification
        lengths = torch.tensor([min(len(r), width) for r in rows])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([r.labels for r in rows])}
        if rows[0].token_type_ids is not None:  # (B, T): segment of each token, 0 for padding
            types = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                types[b, : lengths[b]] = torch.tensor(r.token_type_ids[: lengths[b]])
            out["token_type_ids"] = types
        return out
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        n = min(len(r), width)
        labels[b, :n] = torch.tensor(r.labels[:n])
    if isinstance(rows[0], PackedRow):
        positions, mask = packed_positions_and_mask([r.lengths for r in rows], width)
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
    lengths = torch.tensor([min(len(r), width) for r in rows])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, T)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def packed_positions_and_mask(doc_lengths: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) restarting per document, and the (B, 1, T, T) block-diagonal causal mask."""
    positions = torch.zeros(len(doc_lengths), width, dtype=torch.long)
    doc = torch.full((len(doc_lengths), width), -1, dtype=torch.long)  # document index per token, -1 = pad
    for b, lengths in enumerate(doc_lengths):
        start = 0
        for j, n in enumerate(lengths):
            n = min(n, width - start)
            positions[b, start:start + n] = torch.arange(n)
            doc[b, start:start + n] = j
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    is_pad = doc == -1
    pad_self = is_pad[:, :, None] & torch.eye(width, dtype=torch.bool)[None]  # pads see only themselves
    mask = (same & causal[None] & ~is_pad[:, :, None]) | pad_self
    return positions, mask[:, None]  # (B, 1, T, T)


def padding_waste(rows: Sequence[Example | PackedRow], batch_size: int) -> float:
    """Share of padded positions when `rows` are batched in order, batch_size per batch."""
    real = padded = 0
    for i in range(0, len(rows), batch_size):
        lengths = [len(r) for r in rows[i:i + batch_size]]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / max(1, padded)


def model_inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every key but labels, on the model's device. A packed (B, 1, T, T) bool mask becomes an additive
    float mask (0 = attend, dtype min = blocked) in the model's dtype: eager attention *adds* the mask,
    SDPA accepts either, so the float form is right for both."""
    weight = model.get_input_embeddings().weight
    out = {k: v.to(weight.device, non_blocking=True) for k, v in batch.items() if k != "labels"}
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        additive = torch.zeros(mask.shape, dtype=dtype, device=weight.device)
        out["attention_mask"] = additive.masked_fill_(~mask, torch.finfo(dtype).min)
    return out
