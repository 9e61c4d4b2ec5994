"""Chunked linear + cross-entropy against F.cross_entropy in float64, and loss_sum on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import CAUSAL_KINDS, VOCAB, batch, build_tiny, randomize_lora
from lorakit.config import LoraConfig
from lorakit.lora import inject_lora
from lorakit.loss import FUSED_MODEL_TYPES, causal_lm_loss_sum, linear_cross_entropy_sum


def _randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _labels(rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < 0.3] = -100  # unsupervised positions, scattered
    return labels


def _reference(h, w, b, labels):
    """The plain loss in float64: full logits, F.cross_entropy(reduction='sum'), autograd gradients."""
    h, w = h.double().requires_grad_(True), w.double().requires_grad_(True)
    b = None if b is None else b.double().requires_grad_(True)
    logits = F.linear(h, w, b).reshape(-1, w.shape[0])  # (M, V)
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_gradients_equal_float64_cross_entropy(chunk, bias):
    h = _randn(3, 11, 16, seed=1) * 2
    w = _randn(40, 16, seed=2)
    b = _randn(40, seed=3) if bias else None
    labels = _labels(3, 11, 40, seed=4)
    want, want_h, want_w, want_b = _reference(h, w, b, labels)
    h.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    got = linear_cross_entropy_sum(h, w, labels, b, chunk=chunk)
    (got * 0.37).backward()  # a scale, as train.py divides by the token count
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), 0.37 * want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 0.37 * want_w, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(b.grad.double(), 0.37 * want_b, rtol=1e-5, atol=1e-6)


def test_float64_inputs_are_computed_in_float64():
    h, w = _randn(2, 7, 8, seed=5, dtype=torch.float64), _randn(30, 8, seed=6, dtype=torch.float64)
    labels = _labels(2, 7, 30, seed=7)
    want, want_h, _, _ = _reference(h, w, None, labels)
    h.requires_grad_(True)
    got = linear_cross_entropy_sum(h, w, labels, chunk=3)
    got.backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, want_h, rtol=1e-12, atol=1e-12)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_makes_none():
    h, w = _randn(4, 16, seed=8).requires_grad_(True), _randn(50, 16, seed=9)
    labels = _labels(1, 4, 50, seed=10)[0]
    linear_cross_entropy_sum(h, w, labels).backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        loss = linear_cross_entropy_sum(h, w, labels)
    assert not loss.requires_grad


def test_no_supervised_position_gives_zero():
    h = _randn(2, 3, 8, seed=11).requires_grad_(True)
    loss = linear_cross_entropy_sum(h, _randn(20, 8, seed=12), torch.full((2, 3), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


def test_never_holds_more_than_a_chunk_of_logits():
    h = _randn(64, 16, seed=13).requires_grad_(True)
    w = _randn(1000, 16, seed=14)
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        loss = linear_cross_entropy_sum(h, w, torch.randint(0, 1000, (64,)), chunk=8)
    loss.backward()
    assert max(sizes) <= 64 * 16  # what is kept for backward is ∂L/∂h, never (rows, V) logits


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_loss_equals_plain_logits_cross_entropy(kind, method):
    model = build_tiny(kind)
    assert model.config.model_type in FUSED_MODEL_TYPES
    if method == "lora":
        inject_lora(model, LoraConfig(r=4, dropout=0.0))
        randomize_lora(model)
    else:
        model.requires_grad_(True)
    ids = batch(rows=3, length=10)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that carries no loss
    trainable = [p for p in model.parameters() if p.requires_grad]

    plain = model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    want = F.cross_entropy(plain.double(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    want_grads = torch.autograd.grad(want, trainable)
    got = causal_lm_loss_sum(model, {"input_ids": ids}, labels)
    got_grads = torch.autograd.grad(got, trainable)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)


def test_unlisted_or_wrapped_head_takes_the_plain_path():
    model = build_tiny("llama")
    inject_lora(model, LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "lm_head"]))
    randomize_lora(model)
    ids = batch()
    logits = model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    want = F.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(causal_lm_loss_sum(model, {"input_ids": ids}, ids), want)


def test_forward_goes_through_a_wrapper_and_the_head_is_restored():
    """DDP must see the forward: the loss is taken inside `model(...)`, with `inner` naming the model."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    inner = build_tiny("qwen2")
    wrapper, ids = Wrapper(inner), batch()
    want = F.cross_entropy(inner(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    got = causal_lm_loss_sum(wrapper, {"input_ids": ids}, ids, inner=inner)
    torch.testing.assert_close(got, want)
    assert wrapper.calls == 1 and not inner.get_output_embeddings()._forward_pre_hooks
    assert inner(input_ids=ids).logits.shape == (*ids.shape, VOCAB)  # the hook is gone
