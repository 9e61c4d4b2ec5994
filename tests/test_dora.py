"""DoRA against PEFT (the oracle: same seeds, shapes and values) and against a float64 evaluation of the formula."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import batch, build_tiny, logits, randomize_lora
from lorakit import (
    LoraConfig,
    LoraLinear,
    QuantConfig,
    adapter_rows,
    inject_lora,
    load_lora_adapter,
    merge_lora_weights,
    quantize_model,
    save_lora_adapter,
    unmerge_lora_weights,
)
from lorakit.adapters import check_adapter, read_adapter_config
from lorakit.errors import AdapterError
from lorakit.quant import NF4Linear

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "qwen2": ["k_proj", "o_proj"]}
TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(kind: str, r: int = 4, alpha: float = 8, dropout: float = 0.0, base=None):
    """(ours, PEFT's) DoRA models on the same tiny base, with equal random non-zero A, B and m."""
    ours, ref = build_tiny(kind), build_tiny(kind)
    if base is not None:
        base(ours, ref)
    inject_lora(ours, LoraConfig(r=r, alpha=alpha, dropout=dropout, target_modules=TARGETS[kind], use_dora=True))
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True,
                                                   target_modules=TARGETS[kind], fan_in_fan_out=kind == "gpt2"))
    mine, theirs = _trainable(ours), _trainable(ref)
    assert sorted(mine) == sorted(theirs) and any("lora_magnitude_vector" in k for k in mine)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for key, param in mine.items():  # m near its start, A and B away from zero
            value = param + torch.randn(param.shape, generator=g) * (0.05 if "magnitude" in key else 0.3)
            param.copy_(value)
            theirs[key].copy_(value)
    return ours, ref


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k.removeprefix("base_model.model."): p for k, p in model.named_parameters() if p.requires_grad}


def _grads(ours: nn.Module, ref: nn.Module, ids: torch.Tensor) -> tuple[dict, dict]:
    for model in (ours, ref):
        model(input_ids=ids, labels=ids).loss.backward()
    return ({k: p.grad for k, p in _trainable(ours).items()}, {k: p.grad for k, p in _trainable(ref).items()})


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_forward_and_gradients_of_A_B_m_equal_peft(kind):
    ours, ref = _pair(kind)
    ids = batch()
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), **TOL)
    mine, theirs = _grads(ours, ref, ids)
    assert {k.rsplit(".", 3)[-3] for k in mine} == {"lora_A", "lora_B", "lora_magnitude_vector"}
    for key in mine:
        assert mine[key].abs().max() > 0, key
        torch.testing.assert_close(mine[key], theirs[key], **TOL)


def _layer_pair(kind: str, dropout: float):
    torch.manual_seed(0)
    base = Conv1D(nf=40, nx=24) if kind == "conv1d" else nn.Linear(24, 40)
    nn.init.normal_(base.bias, std=0.5)
    ours = LoraLinear(base)
    ours.add_adapter("default", LoraConfig(r=3, alpha=7.0, dropout=dropout, use_dora=True))
    config = peft.LoraConfig(r=3, lora_alpha=7.0, lora_dropout=dropout, use_dora=True, fan_in_fan_out=kind == "conv1d")
    ref = peft.tuners.lora.Linear(Conv1D(nf=40, nx=24) if kind == "conv1d" else nn.Linear(24, 40), "default", config,
                                  r=3, lora_alpha=7.0, fan_in_fan_out=kind == "conv1d")
    ref.base_layer.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key in ("lora_A", "lora_B", "lora_magnitude_vector"):
            value = torch.randn(getattr(ours, key)["default"].weight.shape, generator=g)
            getattr(ours, key)["default"].weight.copy_(value)
            getattr(ref, key)["default"].weight.copy_(value)
    return ours, ref


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_in_training_is_applied_as_peft(kind):
    """PEFT's training formula: base(x) + (m/n − 1) ⊙ x_d Wᵀ + m/n ⊙ s·x_d AᵀBᵀ, same mask (same RNG draw)."""
    ours, ref = _layer_pair(kind, dropout=0.3)
    ours.train(), ref.train()
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(4)
    y = ours(x)
    torch.manual_seed(4)
    y_ref = ref(x2)
    torch.testing.assert_close(y, y_ref, **TOL)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    for key in ("lora_A", "lora_B", "lora_magnitude_vector"):
        torch.testing.assert_close(getattr(ours, key)["default"].weight.grad, getattr(ref, key)["default"].weight.grad, **TOL)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_forward_equals_float64_formula_and_norm_is_constant_in_backward(kind):
    """y = m/‖W + s·BA‖_row ⊙ (x Wᵀ + s·x AᵀBᵀ) + b in float64, and ∂m = Σ g ⊙ z / n (n detached)."""
    ours, _ = _layer_pair("conv1d" if kind == "conv1d" else "linear", dropout=0.0)
    if kind == "nf4":
        ours.base_layer = NF4Linear.from_linear(ours.base_layer, compute_dtype=torch.float32)
    base = ours.base_layer
    W = base.dequantize(torch.float64) if kind == "nf4" else (base.weight.double().T if kind == "conv1d" else base.weight.double())
    A, B = ours.lora_A["default"].weight.double(), ours.lora_B["default"].weight.double()
    m = ours.lora_magnitude_vector["default"].weight
    V = W + (7.0 / 3) * B @ A  # (out, in)
    n = V.norm(dim=1)
    x = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(1))
    z = x.double() @ V.T
    expected = m.double() / n * z + base.bias.double()
    y = ours(x)
    torch.testing.assert_close(y.double(), expected, **TOL)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    (y * g).sum().backward()
    torch.testing.assert_close(m.grad.double(), (g.double() * z / n).sum((0, 1)), **TOL)


def _dequantized_base(ours: nn.Module, ref: nn.Module) -> None:
    """QDoRA: ours gets NF4 layers; PEFT's model gets full-precision layers holding the same dequantized Ŵ."""
    quantize_model(ours, QuantConfig(), compute_dtype=torch.float32, progress=False)
    for name, module in ours.named_modules():
        if isinstance(module, NF4Linear):
            with torch.no_grad():
                ref.get_submodule(name).weight.copy_(module.dequantize(torch.float32))


def test_qdora_equals_peft_dora_on_the_dequantized_weight():
    ours, ref = _pair("llama", base=_dequantized_base)
    assert isinstance(ours.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    ids = batch()
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), **TOL)
    mine, theirs = _grads(ours, ref, ids)
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unmerge_equal_peft(kind):
    ours, ref = _pair(kind)
    ids = batch()
    before = logits(ours, ids)
    originals = {k: v.clone() for k, v in ours.state_dict().items() if k.endswith("base_layer.weight")}
    merge_lora_weights(ours, remove_wrappers=False)
    ref.merge_adapter()
    theirs = {k.removeprefix("base_model.model."): v for k, v in ref.state_dict().items()}
    for key in originals:
        torch.testing.assert_close(ours.state_dict()[key], theirs[key], **TOL)
        assert not torch.allclose(ours.state_dict()[key], originals[key])
    torch.testing.assert_close(logits(ours, ids), before, **TOL)
    unmerge_lora_weights(ours)
    for key, value in originals.items():
        torch.testing.assert_close(ours.state_dict()[key], value, **TOL)
    torch.testing.assert_close(logits(ours, ids), before, **TOL)


def test_merge_of_an_nf4_base_gives_the_qdora_model():
    ours, _ = _pair("llama", base=_dequantized_base)
    ids = batch()
    before = logits(ours, ids)
    merged = merge_lora_weights(ours)
    assert not any(isinstance(m, (LoraLinear, NF4Linear)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), before, **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapter_files_load_both_ways_with_equal_logits(kind, tmp_path):
    ours, ref = _pair(kind)
    ids = batch()
    expected = logits(ours, ids)
    save_lora_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(build_tiny(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, ids), expected, **TOL)

    ref.save_pretrained(tmp_path / "peft")
    mine = build_tiny(kind)
    load_lora_adapter(mine, tmp_path / "peft")
    torch.testing.assert_close(logits(mine, ids), logits(ref, ids), **TOL)
    torch.testing.assert_close(logits(mine, ids), expected, **TOL)


def test_norm_is_reused_until_a_factor_changes():
    ours, _ = _layer_pair("linear", dropout=0.0)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(1))
    magnitude = ours.lora_magnitude_vector["default"]
    ours(x)
    cached = magnitude._cached[1]
    ours(x)
    assert magnitude._cached[1] is cached  # nothing changed: the same n
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.5)
    ours(x).square().sum().backward()
    optimizer.step()  # A and B change in place: n must follow
    y = ours(x)
    assert magnitude._cached[1] is not cached
    W, b = ours.base_layer.weight.double(), ours.base_layer.bias.double()
    V = W + (7.0 / 3) * ours.lora_B["default"].weight.double() @ ours.lora_A["default"].weight.double()
    m = magnitude.weight.double()
    torch.testing.assert_close(y.double(), m / V.norm(dim=1) * (x.double() @ V.T) + b, **TOL)


def test_adapter_rows_runs_a_uniform_dora_batch_and_refuses_a_mixed_one(tmp_path):
    ours, _ = _pair("llama")
    ids = batch()
    expected = logits(ours, ids)
    with adapter_rows(ours, ["default", "default"]):
        torch.testing.assert_close(logits(ours, ids), expected, **TOL)
    with pytest.raises(AdapterError, match=r"use DoRA, which rescales each layer's whole output row"):
        with adapter_rows(ours, ["default", None]):
            pass


def test_delta_only_consumers_and_vllm_refuse_dora_with_the_reason(tmp_path):
    ours, _ = _pair("llama")
    save_lora_adapter(ours, tmp_path / "a")
    with pytest.raises(AdapterError, match=r"a DoRA adapter \(use_dora: true\).*lorakit merge --adapter"):
        read_adapter_config(tmp_path / "a")
    assert read_adapter_config(tmp_path / "a", allow_dora=True)["use_dora"] is True
    problems = check_adapter(tmp_path / "a", "vllm")
    assert any(p.startswith("use_dora: vLLM does not load DoRA adapters") for p in problems)


@pytest.mark.parametrize("kind, head", [("llama_cls", "score"), ("bert_cls", "classifier")])
def test_dora_with_a_classifier_head_trained_in_full_round_trips_with_peft(kind, head, tmp_path):
    model = build_tiny(kind)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", modules_to_save=[head],
                                  use_dora=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith(f"{head}.") for n in trainable) and any("lora_magnitude_vector" in n for n in trainable)
    randomize_lora(model)
    ids = batch()
    save_lora_adapter(model, tmp_path / "ours")
    ref = peft.PeftModel.from_pretrained(build_tiny(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(ref, ids), logits(model, ids), **TOL)
    ref.save_pretrained(tmp_path / "peft")
    mine = build_tiny(kind)
    load_lora_adapter(mine, tmp_path / "peft")
    torch.testing.assert_close(logits(mine, ids), logits(model, ids), **TOL)


def test_streamed_merge_of_a_dora_adapter_equals_the_in_memory_merge(tmp_path):
    import transformers as tf

    from conftest import save_tiny_base
    from lorakit.export.merge_stream import merge_adapter_streaming

    base_dir = save_tiny_base(tmp_path / "base")
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "down_proj"], use_dora=True))
    randomize_lora(model)
    save_lora_adapter(model, tmp_path / "a")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])  # within the tiny tokenizer's vocabulary
    expected = logits(model, ids)
    merge_adapter_streaming(base_dir, tmp_path / "a", tmp_path / "merged")
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    in_memory = merge_lora_weights(model)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(streamed.state_dict()[name], tensor), name
    torch.testing.assert_close(logits(streamed, ids), expected, **TOL)


def test_merged_gguf_export_applies_dora_as_the_in_memory_merge(tmp_path):
    """export/source.py's Adapter.delta (what `lorakit export --format gguf` adds to each weight); the GGUF LoRA
    format, which has no magnitudes, refuses DoRA (tests/export/test_gguf.py)."""
    from lorakit.export.source import read_adapter

    ours, _ = _pair("llama")
    save_lora_adapter(ours, tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    assert sorted(adapter.magnitudes) == sorted(adapter.factors)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = ours.get_submodule(name)
        expected = layer.merge_delta("default")
        torch.testing.assert_close(adapter.delta(name, layer.base_layer.weight.float()), expected, rtol=0, atol=0)
