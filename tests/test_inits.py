"""PiSSA, OLoRA and LoftQ inits against PEFT (the oracle), their converted adapters, and their config errors."""

from __future__ import annotations

import inspect
import json
import logging
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import batch, build_tiny, logits, randomize_lora
from lorakit import LoraConfig, QuantConfig, inject_lora, load_lora_adapter, save_lora_adapter
from lorakit.config import RunConfig
from lorakit.inits import loftq
from lorakit.quant import NF4Linear
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "qwen2": ["k_proj", "gate_proj"]}
TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(kind: str, init: str, r: int = 4, alpha: float = 8, use_rslora: bool = False):
    """(ours, PEFT's) after the same init on the same tiny base, from the same RNG state."""
    ours, ref = build_tiny(kind), build_tiny(kind)
    torch.manual_seed(3)
    inject_lora(ours, LoraConfig(r=r, alpha=alpha, dropout=0.0, target_modules=TARGETS[kind], init=init,
                                 use_rslora=use_rslora))
    torch.manual_seed(3)
    ref = peft.get_peft_model(ref, peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS[kind], init_lora_weights=init,
        use_rslora=use_rslora, fan_in_fan_out=kind == "gpt2"))
    return ours, ref


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind, init", [
    ("llama", "pissa"), ("llama", "pissa_niter_3"), ("llama", "olora"), ("qwen2", "pissa"), ("qwen2", "olora"),
    ("gpt2", "pissa"), ("gpt2", "pissa_niter_2"),
])
def test_init_factors_and_reduced_base_equal_peft_and_the_model_starts_unchanged(kind, init):
    before = logits(build_tiny(kind), batch())
    ours, ref = _pair(kind, init)
    mine, theirs = _state(ours), _state(ref)
    checked = [k for k in mine if ".lora_A." in k or ".lora_B." in k or k.endswith("base_layer.weight")]
    assert len(checked) == 3 * sum(".lora_A." in k for k in mine) >= 3 * 2 * len(TARGETS[kind])  # 2 blocks
    for key in checked:
        torch.testing.assert_close(mine[key], theirs[key], **TOL)
    layer = ours.get_submodule(next(k for k in mine if ".lora_B." in k).split(".lora_B.")[0])
    assert layer.lora_B["default"].weight.abs().max() > 0  # not LoRA's B = 0: the principal directions
    torch.testing.assert_close(logits(ours, batch()), before, **TOL)


def _peft_converted(ref: torch.nn.Module, tmp_path) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's documented flow: save the initial adapter with init_lora_weights=True, train, save converted."""
    ref.peft_config["default"].init_lora_weights = True
    ref.save_pretrained(tmp_path / "peft_init")
    randomize_lora(ref, seed=21)
    ref.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    return config, load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))


@pytest.mark.parametrize("init, use_rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_converted_adapter_equals_peft_converted_adapter(init, use_rslora, tmp_path):
    ours, ref = _pair("llama", init, use_rslora=use_rslora)
    randomize_lora(ours, seed=21)  # "training": the same new factors on both sides
    trained = logits(ours, batch())
    peft_config, peft_tensors = _peft_converted(ref, tmp_path)
    save_lora_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, peft_config["lora_alpha"], True)
    assert sorted(tensors) == sorted(peft_tensors)
    for key in tensors:
        assert tensors[key].shape[0 if ".lora_A." in key else 1] == 8
        torch.testing.assert_close(tensors[key], peft_tensors[key], **TOL)
    # the converted adapter applies to the ORIGINAL base, in lorakit and in PEFT
    fresh = build_tiny("llama")
    load_lora_adapter(fresh, tmp_path / "ours")
    torch.testing.assert_close(logits(fresh, batch()), trained, **TOL)
    loaded = peft.PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, batch()), trained, **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_adapter_recomputes_the_reduced_base_on_load_in_lorakit_and_peft(init, tmp_path):
    ours, _ = _pair("llama", init)
    randomize_lora(ours, seed=21)
    trained = logits(ours, batch())
    save_lora_adapter(ours, tmp_path / "a", converted=False)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (4, init)
    assert json.loads((tmp_path / "a" / "lorakit.json").read_text())["init"] == {"method": init, "converted": False}
    fresh = build_tiny("llama")
    load_lora_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, batch()), trained, **TOL)
    loaded = peft.PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "a").eval()
    torch.testing.assert_close(logits(loaded, batch()), trained, **TOL)


def test_qlora_pipeline_quantizes_the_pissa_residual():
    """method: qlora + init: pissa: the init runs on the full-precision W, then W − s·B₀A₀ is quantized."""
    from lorakit.train.setup import adapt_for_method

    config = RunConfig(method="qlora", lora=LoraConfig(r=4, alpha=8, dropout=0.0, init="pissa", target_modules=["q_proj"]),
                       quant=QuantConfig(double_quant=False))
    config.train.gradient_checkpointing = False
    original = build_tiny("llama")
    model = adapt_for_method(build_tiny("llama"), config, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = original.model.layers[0].self_attn.q_proj.weight
    residual = quantize_nf4(W - 2.0 * B @ A, 64, False)
    assert isinstance(layer.base_layer, NF4Linear) and torch.equal(layer.base_layer.packed, residual.packed)
    assert isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)  # the untargeted layers are quantized too
    err_pissa = (dequantize_nf4(residual, torch.float32) + 2.0 * B @ A - W).norm()
    err_plain = (dequantize_nf4(quantize_nf4(W, 64, False), torch.float32) - W).norm()
    assert err_pissa < err_plain  # the principal part stays in full precision


def _peft_loftq_on_cpu():
    """PEFT's own loftq_init (peft.utils.loftq_utils), with its hard-coded "cuda" compute device set to the CPU
    (bitsandbytes quantizes NF4 on the CPU too); everything else is PEFT's code as installed."""
    import peft.utils.loftq_utils as lu

    source = textwrap.dedent(inspect.getsource(lu.loftq_init))
    patched = source.replace('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"')
    assert patched != source
    namespace = dict(vars(lu))
    exec(patched, namespace)  # noqa: S102 - PEFT's installed source, one string changed
    return namespace["loftq_init"]


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft_loftq(iters):
    """Same W, alpha = r (PEFT's LoftQ ignores the scaling): Q̂ bit for bit, BA and both errors to 1e-5."""
    pytest.importorskip("bitsandbytes")
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    Q_ref, A_ref, B_ref = _peft_loftq_on_cpu()(W.clone(), num_bits=4, reduced_rank=4, num_iter=iters)
    init, state = loftq(W, 4, 1.0, iters, QuantConfig(double_quant=False))
    assert torch.equal(dequantize_nf4(state, torch.float32), Q_ref)
    torch.testing.assert_close(init.B @ init.A, B_ref @ A_ref, **TOL)
    before, after = init.error
    assert before == pytest.approx(torch.linalg.matrix_norm(W - dequantize_nf4(quantize_nf4(W, 64, False), torch.float32)).item(), rel=1e-6)
    assert after == pytest.approx(torch.linalg.matrix_norm(W - Q_ref - B_ref @ A_ref).item(), rel=1e-5)
    assert after < before
    # with s = alpha/r != 1 lorakit divides B by s (PEFT does not, huggingface/peft#1982): s·BA is unchanged
    scaled, _ = loftq(W, 4, 4.0, iters, QuantConfig(double_quant=False))
    torch.testing.assert_close(4.0 * scaled.B @ scaled.A, B_ref @ A_ref, **TOL)


def test_loftq_inject_quantizes_the_targets_and_logs_the_errors(caplog):
    model = build_tiny("llama")
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="lorakit.lora"):
        inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, init="loftq", loftq_iter=2, target_modules=["q_proj"]),
                    quant=QuantConfig())
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, NF4Linear) and isinstance(model.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    Q = layer.base_layer.dequantize(torch.float32)
    approx = Q + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (approx - W).norm() < (Q - W).norm()
    assert "LoftQ (loftq_iter=2, r=4) on 2 layers: reconstruction error ‖W − NF4(W)‖ =" in caplog.text


def test_weight_inits_refuse_what_they_cannot_do():
    from lorakit.quant import quantize_model

    model = build_tiny("llama")
    with pytest.raises(ValueError, match=r"lora.r=40 is larger than this layer's smallest side \(32, 32\)"):
        inject_lora(model, LoraConfig(r=40, init="pissa", target_modules=["q_proj"]))
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"changes the base weights, which the adapter\(s\) \['default'\]"):
        inject_lora(model, LoraConfig(r=4, init="olora", target_modules=["q_proj"]), adapter_name="b")
    quantized = build_tiny("llama")
    quantize_model(quantized, QuantConfig(), compute_dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match=r"initialize the adapter before quantizing"):
        inject_lora(quantized, LoraConfig(r=4, init="pissa", target_modules=["q_proj"]))


def test_config_problems_name_the_key_before_weights_load():
    problems = LoraConfig(init="pissa_niter_x", loftq_iter=0, use_dora="yes").problems()
    assert "lora.init 'pissa_niter_x': the N of pissa_niter_N must be an integer >= 1 (e.g. pissa_niter_4)" in problems
    assert "lora.loftq_iter must be an integer >= 1 (1 is PEFT's default), got 0" in problems
    assert "lora.use_dora must be true or false, got 'yes'" in problems
    run = RunConfig(method="lora", lora=LoraConfig(init="loftq")).problems()
    assert any(p.startswith("lora.init: loftq needs method: qlora") for p in run)
    assert RunConfig(method="qlora", lora=LoraConfig(init="loftq", use_dora=True)).problems() == []
    full = RunConfig(method="full", lora=LoraConfig(use_dora=True)).problems()
    assert any("method: full trains every weight without one" in p for p in full)


def test_qlora_pipeline_with_an_init_keeps_the_classifier_head_trained_in_full():
    """seq_cls + qlora + pissa: quantizing after the init skips the head's trained copy and the base's own head."""
    from lorakit.heads import SavedModule
    from lorakit.train.setup import adapt_for_method

    config = RunConfig(task="seq_cls", method="qlora", lora=LoraConfig(r=4, alpha=8, init="olora", target_modules="all-linear"))
    config.train.gradient_checkpointing = False
    model = adapt_for_method(build_tiny("llama_cls"), config, progress=False)
    assert isinstance(model.score, SavedModule)
    assert not any(isinstance(m, NF4Linear) for m in model.score.modules())
    assert isinstance(model.model.layers[0].mlp.up_proj.base_layer, NF4Linear)
