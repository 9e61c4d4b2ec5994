"""LoRA layers and injection against a float64 evaluation of the formula and against PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import (
    ALL_KINDS,
    CAUSAL_KINDS,
    batch,
    build_tiny,
    logits,
    randomize_lora,
    tiny_qlora_some_targets,
)
from lorakit import (
    LoraConfig,
    LoraLinear,
    QuantConfig,
    adapter_rows,
    adapters_disabled,
    count_parameters,
    inject_lora,
    merge_lora_weights,
    parameter_report,
    quantize_model,
    set_adapter,
    unmerge_lora_weights,
)
from lorakit.lora import delete_adapter, find_target_modules
from lorakit.quant import NF4Linear


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_zero_B_is_identical_to_base(kind):
    model = build_tiny(kind)
    ids = batch()
    before = logits(model, ids)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert torch.equal(logits(model, ids), before)


def _base_layer(kind: str) -> nn.Module:
    """A 24 -> 40 layer of each kind LoRA wraps, with a non-zero bias."""
    torch.manual_seed(0)
    if kind == "conv1d":
        layer = Conv1D(nf=40, nx=24)  # weight (in, out)
    else:
        layer = nn.Linear(24, 40)
    nn.init.normal_(layer.bias, std=0.5)
    return NF4Linear.from_linear(layer, compute_dtype=torch.float32) if kind.startswith("nf4") else layer


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_forward_equals_float64_formula_on_every_base(kind):
    """base(x) is evaluated in float64 from the layer's own (dequantized) weight: x Wᵀ + b (Conv1D: x W + b)."""
    base = _base_layer(kind)
    layer = LoraLinear(base)
    layer.add_adapter("default", LoraConfig(r=3, alpha=7.0, dropout=0.0))
    nn.init.normal_(layer.lora_B["default"].weight)
    assert (layer.in_features, layer.out_features) == (24, 40)
    x = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(1))
    if kind == "nf4":
        W = base.dequantize(torch.float64)  # (out, in)
    else:
        W = base.weight.double().T if kind == "conv1d" else base.weight.double()  # (out, in)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = x.double() @ W.T + base.bias.double() + (7.0 / 3) * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_is_bit_identical_to_peft(init):
    """Same seed, same factors: A kaiming-uniform (PEFT's True) or N(0, 1/r) ('gaussian'), B zero."""
    peft = pytest.importorskip("peft")
    ours, ref = build_tiny("llama"), build_tiny("llama")
    torch.manual_seed(5)
    inject_lora(ours, LoraConfig(r=4, init=init))
    torch.manual_seed(5)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, target_modules="all-linear",
                                                   init_lora_weights=True if init == "kaiming" else "gaussian"))
    from lorakit.adapters import lora_state_dict

    mine, theirs = lora_state_dict(ours), peft.get_peft_model_state_dict(ref)
    assert sorted(mine) == sorted(theirs) and len(mine) == 2 * 14
    for key, tensor in mine.items():
        assert torch.equal(tensor, theirs[key]), key
        if ".lora_B." in key:
            assert not tensor.any()
    A = ours.model.layers[0].mlp.down_proj.lora_A["default"].weight  # (4, 64)
    if init == "kaiming":  # kaiming_uniform(a=√5) is U(-1/√in, 1/√in)
        assert A.abs().max() <= 64**-0.5 and A.abs().max() > 0.8 * 64**-0.5
    else:
        assert 0.15 < A.std() < 0.35  # std 1/r = 0.25


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
def test_matches_peft_forward(kind, capsys):
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
    assert count_parameters(ours) == ref.get_nb_trainable_parameters()  # a head trained in full: original + copy
    ref.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == parameter_report(ours)


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
    assert any("lora.init must be one of kaiming, gaussian, pissa, pissa_niter_N, olora, loftq; got 'xavier'" in p for p in problems)
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


# --------------------------------------------------------------------------- targets, heads, config errors


def test_heads_are_adapted_only_when_asked():
    model = build_tiny("gpt2")  # lm_head is tied to the input embedding
    assert not any("lm_head" in n for n in inject_lora(model, LoraConfig(r=2), "auto"))
    assert find_target_modules(build_tiny("llama"), ["q_proj", "lm_head"])[-1] == "lm_head"
    assert find_target_modules(build_tiny("llama"), r"lm_head|.*\.0\.self_attn\.q_proj") == [
        "model.layers.0.self_attn.q_proj", "lm_head"]
    cls = build_tiny("bert_cls")
    targets = inject_lora(cls, LoraConfig(r=2, modules_to_save=["classifier"]))
    assert not any(t.endswith("classifier") for t in targets) and "bert.pooler.dense" in targets
    trainable = {n for n, p in cls.named_parameters() if p.requires_grad}
    # the head is trained in full, as the adapter's copy (PEFT's module path); the original stays frozen
    assert {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"} <= trainable
    assert all(".lora_" in n or n.startswith("classifier.modules_to_save.") for n in trainable)


def test_every_invalid_lora_value_is_named_with_the_valid_choices():
    problems = LoraConfig(r=2.5, alpha=-1, dropout=1.0, target_modules=[], init="xavier", bias="all",
                          modules_to_save="score").problems()
    expected = [
        "lora.r must be an integer >= 1, got 2.5",
        "lora.alpha must be a number > 0, got -1",
        "lora.dropout must be in [0, 1), got 1.0",
        "lora.target_modules must be a preset (minimal, attention, all-linear), a non-empty list of module-name suffixes, or a regex; got []",
        "lora.init must be one of kaiming, gaussian, pissa, pissa_niter_N, olora, loftq; got 'xavier'",
        "lora.bias must be one of none; got 'all'",
        "lora.modules_to_save must be a list of module names or null (the task's default), got 'score'",
    ]
    assert [p.split(" (a common")[0] for p in problems] == expected
    with pytest.raises(ValueError, match=r"lora.bias must be one of none; got 'all'"):
        inject_lora(build_tiny("llama"), LoraConfig(bias="all"))


@pytest.mark.parametrize("kind, minimal, attention", [
    ("llama", 4, 8), ("qwen2", 4, 8), ("mistral", 4, 8), ("phi3", 2, 4), ("gpt2", 2, 4), ("bert_cls", 4, 8),
])
def test_presets_resolve_on_every_family(kind, minimal, attention):
    model = build_tiny(kind)
    small, attn = find_target_modules(model, "minimal"), find_target_modules(model, "attention")
    assert (len(small), len(attn)) == (minimal, attention) and set(small) <= set(attn)
    assert set(attn) < set(find_target_modules(model, "all-linear"))


def test_preset_typo_is_reported_with_the_presets():
    with pytest.raises(ValueError, match=r"'all_linear' matched no module; linear layers here end with: .*q_proj.*"
                                         r"a preset \(minimal, attention, all-linear\), or a regex"):
        inject_lora(build_tiny("llama"), LoraConfig(target_modules="all_linear"))


def test_error_when_modules_to_save_matches_nothing():
    with pytest.raises(ValueError, match=r"lora.modules_to_save entry 'score' matched no module; heads here: \['classifier'\]"):
        inject_lora(build_tiny("bert_cls"), LoraConfig(modules_to_save=["score"]))


def test_qlora_parameter_count_is_the_logical_model_size():
    plain, quantized = build_tiny("qwen2"), build_tiny("qwen2")
    quantize_model(quantized, QuantConfig(), compute_dtype=torch.float32, progress=False)
    inject_lora(plain, LoraConfig(r=4))
    inject_lora(quantized, LoraConfig(r=4))
    assert count_parameters(quantized) == count_parameters(plain)
    assert parameter_report(quantized) == parameter_report(plain)


# --------------------------------------------------------------------------- several adapters


def _two_adapters(kind: str):
    """Adapters 'a' (all-linear, r=4) and 'b' (attention, r=8), both with random factors."""
    model = build_tiny(kind)
    inject_lora(model, LoraConfig(r=4, dropout=0.0), "a")
    inject_lora(model, LoraConfig(r=8, alpha=4, dropout=0.0, target_modules="attention"), "b")
    randomize_lora(model, seed=3)  # every factor, of both adapters
    set_adapter(model, "a")
    return model


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_mixed_rows_equal_each_row_run_alone(kind):
    model = _two_adapters(kind)
    ids = batch(rows=4)
    names = ["b", None, "a", "b"]
    with adapter_rows(model, names):
        mixed = logits(model, ids)
    for i, name in enumerate(names):
        if name is None:
            with adapters_disabled(model):
                alone = logits(model, ids[i : i + 1])
        else:
            set_adapter(model, name)
            alone = logits(model, ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    with adapters_disabled(model):
        base = logits(model, ids)
    assert all((mixed[i] - base[i]).abs().max() > 1e-3 for i in (0, 2, 3))  # both adapters do something


def test_set_adapter_makes_only_the_active_adapter_trainable():
    model = _two_adapters("llama")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.a." in n or ".lora_B.a." in n for n in trainable)
    set_adapter(model, "b")
    assert count_parameters(model)[0] == 2 * (8 * (32 + 32) * 2 + 8 * (32 + 16) * 2)  # q,o 32->32; k,v 32->16
    delete_adapter(model, "b")
    with pytest.raises(ValueError, match=r"no adapter named 'b'; adapters here: \['a'\]"):
        set_adapter(model, "b")


def test_several_adapter_errors_name_the_adapters():
    model = _two_adapters("llama")
    with pytest.raises(ValueError, match=r"no adapter named 'c'; adapters here: \['a', 'b'\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match=r"adapter 'a' already exists; adapters here: \['a', 'b'\]"):
        inject_lora(model, LoraConfig(), "a")
    with pytest.raises(ValueError, match=r"adapter_rows has 2 names for a batch of 3 rows"):
        with adapter_rows(model, ["a", "b"]):
            logits(model, batch(rows=3))
    merge_lora_weights(model, remove_wrappers=False)
    with pytest.raises(RuntimeError, match=r"adapter\(s\) \['a'\] are merged into the base weights; unmerge"):
        with adapter_rows(model, ["a", "b"]):
            pass
    with pytest.raises(RuntimeError, match="adapters are merged into the base weights; unmerge before disabling"):
        with adapters_disabled(model):
            logits(model, batch())


def test_two_adapters_train_their_own_copies_of_the_head():
    """As PEFT's ModulesToSaveWrapper: one copy per adapter, the base's own head kept for adapters_disabled."""
    model = build_tiny("llama_cls")
    base_logits = logits(model, batch())
    inject_lora(model, LoraConfig(r=4, modules_to_save=["score"]), "a")
    inject_lora(model, LoraConfig(r=4, modules_to_save=["score"]), "b")
    inject_lora(model, LoraConfig(r=4, target_modules="minimal", modules_to_save=[]), "c")  # no head of its own
    randomize_lora(model)  # the active adapter's (c's) factors
    for name in ("a", "b"):
        set_adapter(model, name)
        randomize_lora(model, seed=len(name) + ord(name))  # this adapter's factors and head copy
    heads = model.score.modules_to_save
    assert sorted(heads) == ["a", "b"] and not torch.equal(heads["a"].weight, heads["b"].weight)
    assert not model.score.original_module.weight.requires_grad and heads["b"].weight.requires_grad
    assert not heads["a"].weight.requires_grad  # only the active adapter's copy trains
    set_adapter(model, "c")
    hidden = torch.randn(2, 32)
    torch.testing.assert_close(model.score(hidden), model.score.original_module(hidden))  # c: the base's head
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model, batch()), base_logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- QLoRA merge


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_qlora_merge_with_some_targets_leaves_a_plain_model(kind, caplog):
    """Layers without an adapter are dequantized too, and GPT-2's Conv1D comes back as a Conv1D."""
    model = tiny_qlora_some_targets(kind)
    ids = batch()
    unmerged = logits(model, ids)
    with caplog.at_level("WARNING"):
        merge_lora_weights(model)
    assert "4-bit layers without an adapter were dequantized too" in caplog.text
    assert not any(isinstance(m, (NF4Linear, LoraLinear)) for m in model.modules())
    if kind == "gpt2":
        assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D) and isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_qlora_merge_of_a_bf16_model_stays_bf16():
    """On CUDA the model is bf16: merged layers in fp32 would break the next forward (dtype mismatch)."""
    model = build_tiny("llama").to(torch.bfloat16)
    quantize_model(model, QuantConfig(), compute_dtype=torch.bfloat16, progress=False)
    inject_lora(model, LoraConfig(r=4, dropout=0.0))
    randomize_lora(model)
    ids = batch()
    unmerged = logits(model, ids).float()
    merge_lora_weights(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(model, ids).float(), unmerged, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_zero_B_is_identical_to_quantized_base(kind):
    model = build_tiny(kind)
    quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    ids = batch()
    before = logits(model, ids)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert torch.equal(logits(model, ids), before)


# --------------------------------------------------------------------------- the fused single-adapter path


def _fused_layer(base_kind: str, inp: int = 20, out: int = 24) -> LoraLinear:
    torch.manual_seed(0)
    if base_kind == "conv1d":
        base = Conv1D(nf=out, nx=inp)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(inp, out, bias=base_kind != "linear_nobias")
    if base_kind == "nf4":
        base = NF4Linear.from_linear(base)
    layer = LoraLinear(base.requires_grad_(False))
    layer.add_adapter("default", LoraConfig(r=4, alpha=8, dropout=0.0))
    nn.init.normal_(layer.lora_B["default"].weight)
    return layer


def _base_weight64(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor | float]:
    base = layer.base_layer
    if isinstance(base, NF4Linear):
        w = base.dequantize(torch.float64)
    else:
        w = base.weight.double().T if isinstance(base, Conv1D) else base.weight.double()  # (out, in)
    return w, 0.0 if base.bias is None else base.bias.double()


@pytest.mark.parametrize("base_kind", ["linear", "linear_nobias", "conv1d", "nf4"])
def test_fused_forward_and_gradients_equal_float64(base_kind):
    layer = _fused_layer(base_kind)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    g = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2))
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_LoraMatmulBackward"  # the fused path ran
    (y * g).sum().backward()

    w, b = _base_weight64(layer)
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    want = x64 @ w.T + b + 2.0 * (x64 @ A64.T @ B64.T)
    (want * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in ((x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference takes the same maths without an autograd node
        y_inference = layer(x)
    assert y_inference.grad_fn is None
    torch.testing.assert_close(y_inference.double(), want.detach(), rtol=1e-5, atol=1e-5)


def test_fused_dropout_path_equals_unfused_with_the_same_mask():
    layer = LoraLinear(nn.Linear(20, 24).requires_grad_(False))
    layer.add_adapter("default", LoraConfig(r=4, alpha=8, dropout=0.3))
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.train()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x = torch.randn(6, 20, requires_grad=True)
    results = []
    for fused in (True, False):
        torch.manual_seed(5)  # the same dropout mask both times
        y = layer(x) if fused else layer.base_layer(x) + layer.delta(x, "default")
        assert (type(y.grad_fn).__name__ == "_LoraMatmulBackward") == fused
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, *params])))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_path_over_4bit_base_saves_nothing_weight_sized():
    layer = _fused_layer("nf4", 96, 80)
    saved: list[int] = []
    x = torch.randn(2, 3, 96, requires_grad=True)  # 2·3·96 inputs << 80·96 weights
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert type(y.grad_fn).__name__ == "_LoraMatmulBackward" and max(saved) < 80 * 96, saved
