"""LoRA layers and injection against a float64 evaluation of the formula and against PEFT."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_KINDS, CAUSAL_KINDS, batch, build_tiny, logits, randomize_lora
from torch import nn

from lorakit import (
    LoraConfig,
    LoraLinear,
    adapter_rows,
    adapters_disabled,
    count_parameters,
    inject_lora,
    merge_lora_weights,
    parameter_report,
    set_adapter,
    unmerge_lora_weights,
)
from lorakit.lora import find_target_modules


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_zero_B_is_identical_to_base(kind):
    model = build_tiny(kind)
    ids = batch()
    before = logits(model, ids)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_equals_float64_formula(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = LoraLinear(base)
    config = LoraConfig(r=6, alpha=5.0, dropout=0.0, use_rslora=use_rslora)
    layer.add_adapter("default", config)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 24)
    scale = 5.0 / (6**0.5 if use_rslora else 6)
    W, b = base.weight.double(), base.bias.double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = x.double() @ W.T + b + scale * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_on_lora_path_and_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 16))
    layer.add_adapter("default", LoraConfig(r=4, dropout=0.5))
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    with adapters_disabled(nn.Sequential(layer)):
        torch.testing.assert_close(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_matches_peft_forward(kind):
    peft = pytest.importorskip("peft")
    ours, ref = build_tiny(kind), build_tiny(kind)
    is_cls = kind.endswith("_cls")
    save = ["classifier"] if kind == "bert_cls" else ["score"] if is_cls else []
    targets = inject_lora(ours, LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=save))
    randomize_lora(ours)
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    ref = peft.get_peft_model(ref, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=suffixes, modules_to_save=save or None,
        fan_in_fan_out=kind == "gpt2", task_type="SEQ_CLS" if is_cls else "CAUSAL_LM"))
    _copy_lora_into_peft(ours, ref)
    ref.eval()
    ids = batch()
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), rtol=0, atol=1e-5)
    ours_trainable, _ = count_parameters(ours)
    assert ours_trainable == sum(p.numel() for p in ref.parameters() if p.requires_grad)


def _copy_lora_into_peft(ours, ref):
    from lorakit.adapters import lora_state_dict

    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for key, tensor in lora_state_dict(ours).items():
            name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            if "lora_" not in name:
                module, param = name.rsplit(".", 1)
                name = f"{module}.modules_to_save.default.{param}"
            ref_params[name].copy_(tensor)


def test_only_adapters_trainable_and_report_format():
    model = build_tiny("llama")
    targets = inject_lora(model, LoraConfig(r=4, target_modules="attention"))
    assert len(targets) == 8  # q,k,v,o x 2 layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    t, total = count_parameters(model)
    assert t == 2 * (2 * 4 * (32 + 32) + 2 * 4 * (32 + 16))  # q,o: 32->32; k,v: 32->16 (2 kv heads of 8)
    assert parameter_report(model) == f"trainable params: {t:,d} || all params: {total:,d} || trainable%: {100 * t / total:.4f}"


def test_all_linear_skips_heads_and_presets_per_family():
    llama = build_tiny("llama")
    names = find_target_modules(llama, "all-linear")
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert all(n.endswith(("q_proj", "v_proj")) for n in find_target_modules(llama, "minimal"))
    gpt2 = build_tiny("gpt2")
    assert find_target_modules(gpt2, "minimal") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    bert = build_tiny("bert_cls")
    assert not any(n.endswith("classifier") for n in find_target_modules(bert, "all-linear"))
    assert len(find_target_modules(build_tiny("phi3"), "attention")) == 4  # fused qkv_proj + o_proj


def test_regex_targets():
    model = build_tiny("llama")
    names = find_target_modules(model, r".*layers\.1\.mlp\.(up|down)_proj")
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_error_when_targets_match_nothing():
    with pytest.raises(ValueError) as e:
        inject_lora(build_tiny("llama"), LoraConfig(target_modules=["qproj"]))
    msg = str(e.value)
    assert "['qproj'] matched no module" in msg and "q_proj" in msg and "down_proj" in msg


def test_error_when_some_targets_match_nothing():
    with pytest.raises(ValueError, match=r"entries \['v_prj'\] matched no layer"):
        inject_lora(build_tiny("llama"), LoraConfig(target_modules=["q_proj", "v_prj"]))


def test_invalid_config_values_are_named():
    with pytest.raises(ValueError, match=r"lora.r must be an integer >= 1, got 0"):
        inject_lora(build_tiny("llama"), LoraConfig(r=0))
    problems = LoraConfig(init="xavier", dropout=1.5, target_modules="all_linear(").problems()
    assert any("lora.init must be one of kaiming, gaussian; got 'xavier'" in p for p in problems)
    assert any("lora.dropout must be in [0, 1)" in p for p in problems)
    assert any("neither a preset" in p for p in problems)


@pytest.mark.parametrize("kind", CAUSAL_KINDS + ["llama_cls"])
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    model = build_tiny(kind)
    ids = batch()
    base = logits(model, ids)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_lora(model)
    unmerged = logits(model, ids)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter does something
    merge_lora_weights(model, remove_wrappers=False)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora_weights(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-5)
    merge_lora_weights(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_matches_peft_merge_and_unload():
    peft = pytest.importorskip("peft")
    ours, ref = build_tiny("gpt2"), build_tiny("gpt2")
    inject_lora(ours, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["c_attn", "c_fc"]))
    randomize_lora(ours)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    _copy_lora_into_peft(ours, ref)
    merged_ref = ref.merge_and_unload()
    merge_lora_weights(ours)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), merged_ref.state_dict().items(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-6)


def test_named_adapters_and_mixed_rows_equal_single_runs():
    model = build_tiny("llama")
    inject_lora(model, LoraConfig(r=4, dropout=0.0), "a")
    randomize_lora(model, seed=1)
    inject_lora(model, LoraConfig(r=8, alpha=4, dropout=0.0, target_modules="attention"), "b")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".b." in name.replace("lora_A.b.", ".b.").replace("lora_B.b.", ".b."):
                param.normal_(0, 0.1)
    ids = batch(rows=3)
    set_adapter(model, "a")
    out_a = logits(model, ids)
    set_adapter(model, "b")
    out_b = logits(model, ids)
    with adapters_disabled(model):
        out_base = logits(model, ids)
    assert (out_a - out_b).abs().max() > 1e-3 and (out_b - out_base).abs().max() > 1e-3
    with adapter_rows(model, ["b", None, "a"]):
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed[0], out_b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], out_base[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], out_a[2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]; adapters here: \['a', 'b'\]"):
        with adapter_rows(model, ["c", None, "a"]):
            pass


def test_gradients_reach_only_adapters():
    model = build_tiny("qwen2")
    inject_lora(model, LoraConfig(r=4, dropout=0.0))
    randomize_lora(model)
    model.train()
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_qlora_merge_into_dequantized_base_equals_unmerged(kind, caplog):
    from lorakit import NF4Linear, QuantConfig, quantize_model

    model = build_tiny(kind)
    quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert any(isinstance(m.base_layer, NF4Linear) for m in model.modules() if isinstance(m, LoraLinear))
    randomize_lora(model)
    ids = batch()
    unmerged = logits(model, ids)
    with pytest.raises(ValueError, match="4-bit base can only be merged with remove_wrappers=True"):
        merge_lora_weights(model, remove_wrappers=False)
    with caplog.at_level("WARNING"):
        merge_lora_weights(model)
    assert "dequantized full-precision weights (not re-quantized)" in caplog.text
    assert not any(isinstance(m, (NF4Linear, LoraLinear)) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_qlora_gradients_flow_through_4bit_base_with_checkpointing():
    from lorakit import QuantConfig, quantize_model

    model = build_tiny("llama")
    quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    inject_lora(model, LoraConfig(r=4, dropout=0.0))
    randomize_lora(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
