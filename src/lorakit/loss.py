"""Causal-LM cross-entropy without the (B·T, V) logits: the LM head and the loss in row chunks.

For the supervised positions (label != -100, labels shifted by one as in transformers), with hidden
states h (M, d) after the final norm, head weight W (V, d) and targets y (M,):

    z_i  = h_i Wᵀ + b                     (V,)   logits of one row
    L    = Σ_i  logsumexp(z_i) - z_i[y_i]         the *sum* over supervised tokens (train.py divides)
    ∂L/∂z_i = softmax(z_i) - onehot(y_i)  (V,)
    ∂L/∂h   = (∂L/∂z) W     (M, d)        ∂L/∂W = (∂L/∂z)ᵀ h  (V, d)   ∂L/∂b = Σ_i ∂L/∂z_i

`_LinearCrossEntropy` computes all of this in forward, `chunk` rows at a time: each chunk's logits
(chunk, V) become its gradient in place and are dropped, so the largest loss tensor is (chunk, V)
instead of the several (M, V) fp32 tensors of `F.cross_entropy(logits)` (logits, log-softmax, its
gradient, the gradient of the logits). It saves only ∂L/∂h (M, d) -- the size of one hidden state --
and ∂L/∂W when the head trains; backward scales them by the incoming gradient (L is a scalar, so
∂(c·L) = c·∂L). No logit is computed twice: no recompute, unlike a checkpointed chunk loop.
Positions without a label are never sent through the head at all.

The plain path (full logits, `F.cross_entropy`) remains for models whose logits are more than
`head(final hidden state)` (soft-capping, logit scales) or whose head is not a plain nn.Linear; see
`FUSED_MODEL_TYPES`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data import model_inputs
from lorakit.quant.linear import CastLinear
from lorakit.runtime.distributed import unwrap

# Architectures whose causal-LM logits are exactly output_embeddings(final hidden states), nothing after.
# NOTE: an allowlist on purpose: e.g. Gemma 2 soft-caps, Cohere and Granite scale the logits after the
# head, and a model not listed here silently computing a different loss would be worse than a slow one.
FUSED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "phi", "gpt2",
    "gpt_neox", "gemma", "olmo", "olmo2", "starcoder2", "stablelm", "smollm3",
})  # fmt: skip
ROW_CHUNK_BYTES = 32 * 2**20  # fp32 logits per chunk: 32 MiB (256 rows of a 32k vocabulary)


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many positions carry a loss: (B,) class labels count one per row; (B, T) token labels count
    labels[:, 1:] != -100 (position t predicts token t+1)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != -100).sum())


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], inner: nn.Module | None = None) -> torch.Tensor:
    """Σ of the loss over supervised positions of one collated batch: the one cross-entropy that training,
    eval and classifiers share (divide by `supervised_tokens(batch)` for the mean).

    Token labels (B, T): `causal_lm_loss_sum`, so the (B, T, V) logits are never made. Class labels (B,):
    the model's own loss (cross-entropy, or MSE for a 1-label regression head) times B. `inner` is the model
    inside a DDP wrapper `model` (default: unwrapped from it); the forward goes through `model`.
    """
    inner = unwrap(model) if inner is None else inner
    inputs = model_inputs(batch, inner)
    labels = batch["labels"].to(inner.get_input_embeddings().weight.device)
    if labels.dim() == 1:
        return model(**inputs, labels=labels).loss * labels.numel()
    return causal_lm_loss_sum(model, inputs, labels, inner=inner)


def causal_lm_loss_sum(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, inner: nn.Module | None = None,
) -> torch.Tensor:
    """Σ of per-token cross-entropy over supervised positions (labels[:, 1:] != -100), a 0-dim fp32 tensor.

    inputs: the model's keyword inputs (input_ids, attention_mask, ...); labels: (B, T) with -100 where
    no loss is taken; `inner`: the model inside a DDP wrapper `model` (default: `model` itself). Equals
    `F.cross_entropy(logits[:, :-1], labels[:, 1:], reduction="sum")`.

    The forward still goes through `model` (so DDP and FSDP2 see it): a pre-hook on the LM head takes
    the final hidden states (B, T, d), computes the loss from them, and hands the head zero positions,
    so the (B, T, V) logits are never made.
    """
    inner = model if inner is None else inner
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not _fusable(inner, head):
        logits = model(**inputs).logits  # (B, T, V)
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B·(T-1), V)
        return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): position t predicts token t+1, as in HF
    losses: list[torch.Tensor] = []

    def head_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        (hidden,) = args  # (B, T, d) after the final norm
        losses.append(linear_cross_entropy_sum(hidden, module.weight, targets, module.bias))
        return (hidden[..., :0, :],)  # (B, 0, d): the head makes empty logits

    handle = head.register_forward_pre_hook(head_input)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    if len(losses) != 1:
        raise RuntimeError(f"{type(inner).__name__}: the LM head ran {len(losses)} times in one forward, expected once")
    return losses[0]


def _fusable(model: nn.Module, head: Any) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return (
        model_type in FUSED_MODEL_TYPES
        and type(head) in (nn.Linear, CastLinear)  # not a LoRA-wrapped or quantized head
        and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
    )


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Σ_i CE(hidden_i Wᵀ + b, labels_i) over labels != -100, never holding more than `chunk` rows of logits.

    hidden: (..., d); weight: (V, d); labels: (...) int; bias: (V,) or None. Logits and the sum are in
    fp32 (float64 for float64 inputs). chunk None: as many rows as fit ROW_CHUNK_BYTES.
    """
    d, vocab = hidden.shape[-1], weight.shape[0]
    keep = (labels != -100).reshape(-1)  # (M,)
    rows = keep.nonzero().squeeze(1)  # (S,) supervised rows
    h = hidden.reshape(-1, d).index_select(0, rows)  # (S, d): only rows that carry a loss enter the head
    targets = labels.reshape(-1).index_select(0, rows)  # (S,)
    chunk = chunk or max(1, ROW_CHUNK_BYTES // (4 * vocab))
    # needs_input_grad is also True under no_grad: the grad mode decides whether gradients are made
    return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ CE over row chunks, its gradients made in the same pass; see the module docstring. h: (S, d) -> ()."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, grad_enabled):
        compute = torch.promote_types(h.dtype, torch.float32)
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None  # (S, d)
        grad_w = torch.zeros_like(weight) if need_w else None  # (V, d)
        grad_b = torch.zeros_like(bias) if need_b else None  # (V,)
        loss = torch.zeros((), dtype=compute, device=h.device)
        # a head stored narrower than h (a bf16 CastLinear head, fp32 compute) is cast once per step, not per chunk
        w, b = weight.to(h.dtype), None if bias is None else bias.to(h.dtype)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], targets[start:start + chunk]  # (c, d), (c,)
            z = F.linear(hc, w, b).to(compute)  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            loss += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            dz = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dz[torch.arange(dz.shape[0], device=dz.device), yc] -= 1.0  # - onehot(y): ∂CE/∂z, (c, V)
            dz = dz.to(h.dtype)
            if need_h:
                torch.mm(dz, w, out=grad_h[start:start + chunk])  # (c, V) @ (V, d)
            if need_w:
                grad_w.addmm_(dz.t().to(weight.dtype), hc.to(weight.dtype))  # (V, c) @ (c, d)
            if need_b:
                grad_b += dz.sum(0).to(bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # NOTE: first-order only (the gradients were computed in forward); L is a scalar, so ∂(c·L) = c·∂L.
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None
