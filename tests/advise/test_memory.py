"""lorakit.advise.memory: every byte count against real tensors on tiny models (NF4 buffers, LoRA
parameters, what autograd saves), and the terms and phases as a whole."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from advise_tiny import TINY, B, T, fixed_rates_fixture, predicted, real_model, run_config, tiny_dir_fixture  # noqa: F401
from torch import nn

from lorakit.advise import (
    CPU_BASELINE_BYTES,
    activation_bytes,
    layer_activation_bytes,
    lora_parameter_count,
    memory_model,
    nf4_bytes,
    optimizer_state_bytes,
    weight_bytes,
)
from lorakit.loss import causal_lm_loss_sum
from lorakit.quant import NF4Linear


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(("out_f", "in_f"), [(7, 9), (64, 64), (96, 200), (1000, 1000)])
def test_nf4_bytes_match_a_quantized_layers_buffers(out_f, in_f, double_quant):
    layer = NF4Linear.from_linear(nn.Linear(in_f, out_f, bias=False), blocksize=64, double_quant=double_quant)
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert nf4_bytes(out_f * in_f, 64, double_quant) == stored


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_match_the_real_model(tmp_path, tied):
    path = tmp_path / "m"
    tf.LlamaConfig(**TINY, tie_word_embeddings=tied).save_pretrained(path)
    for method in ("lora", "qlora"):
        config = run_config(str(path), method)
        model = real_model(config, tied)
        w, shape = predicted(config, masked=False)
        frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        nf4 = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
                  for b in m.buffers())
        assert weight_bytes(w, shape)[0] == frozen + nf4
        if method == "lora":
            assert shape.n_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("targets", ["all-linear", "attention", "minimal", ["q_proj", "down_proj"]])
def test_lora_parameter_count_matches_inject_lora(tiny_dir, targets):
    config = run_config(tiny_dir, targets=targets)
    model = real_model(config)
    w, shape = predicted(config, masked=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameter_count(w, shape) == trainable
    assert optimizer_state_bytes(w, shape) == (4 * trainable, 8 * trainable)


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs (parameters and `exclude` left out)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def batch(masked: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if masked:
        mask[-1, -4:] = 0  # a padded row: transformers materializes the (B, 1, T, T) mask
    return {"input_ids": ids, "attention_mask": mask}


def layer_call(model: nn.Module, inputs: dict[str, torch.Tensor]):
    """Capture layer 1's arguments from a forward, then return a call of that layer alone."""
    layer, captured = model.model.layers[1], {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    hook.remove()
    x = captured["args"][0].detach().requires_grad_(True)  # (B, T, d), as the previous layer's output
    kwargs = {k: v for k, v in captured["kwargs"].items() if k != "hidden_states"}
    shared = [v for v in kwargs.values() if torch.is_tensor(v)] + list(kwargs["position_embeddings"])
    return (lambda: layer(x, **kwargs)), shared


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("method", "dropout"), [("lora", 0.0), ("lora", 0.05), ("qlora", 0.05), ("full", 0.0)])
def test_layer_activation_bytes_match_saved_tensors(tiny_dir, method, dropout, masked):
    """Tensor by tensor: what one decoder layer saves for backward = layer_activation_bytes × tokens
    (rotary cos/sin and the attention mask are shared by all layers, counted once elsewhere)."""
    config = run_config(tiny_dir, method, dropout=dropout)
    model = real_model(config)
    call, shared = layer_call(model, batch(masked))
    measured = saved_bytes(call, [*model.parameters(), *model.buffers(), *shared])
    w, shape = predicted(config, masked)
    assert layer_activation_bytes(w, shape) * B * T == measured


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_activation_bytes_match_saved_tensors(tiny_dir, method, gc):
    """The whole forward + loss as lorakit trains (lorakit.loss: no logits): the layers, the first layer's
    frozen input, the final norm (+ for full its x̂, the head's input and the embedding's ids), and what
    the loss saves: ∂L/∂h (B·(T-1), d), its row index and, when the head trains, ∂L/∂W (V, d). Under checkpointing autograd saves only
    each layer's input; rotary cos/sin and the bool mask are then held by the checkpoints, not saved."""
    config = run_config(tiny_dir, method, gc=gc)
    model = real_model(config)
    inputs = batch(masked=True)
    measured = saved_bytes(lambda: causal_lm_loss_sum(model, inputs, inputs["input_ids"]),
                           [*model.parameters(), *model.buffers()])
    w, shape = predicted(config, masked=True)
    assert w.loss == "linear_ce"
    loss_saved = (4 * shape.hidden + 8) * B * (T - 1) + (4 * shape.vocab * shape.hidden if method == "full" else 0)
    not_saved = B * T * T + (2 * 4 * shape.head_dim * T if gc else 0)
    assert activation_bytes(w, shape) + loss_saved == measured + not_saved


def test_memory_terms_add_up_and_respond_to_settings(tiny_dir):
    base = memory_model(*predicted(run_config(tiny_dir), masked=True))
    assert base.peak_bytes == max(base.phases.values()) and base.peak_bytes > CPU_BASELINE_BYTES
    longer = run_config(tiny_dir)
    longer.data.max_seq_len = 4 * T
    assert memory_model(*predicted(longer, True)).term("activations") > 4 * base.term("activations")
    gc = memory_model(*predicted(run_config(tiny_dir, gc=True), True))
    assert gc.term("activations") < base.term("activations") and gc.term("recompute") > 0
