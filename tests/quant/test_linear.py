"""NF4Linear against float64 maths on its dequantized weight; quantize_model on tiny transformers."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from lorakit.config import LoraConfig, QuantConfig
from lorakit.devices import pick_dtype
from lorakit.lora import LoraLinear, inject_lora
from lorakit.quant import NF4Linear, dequantize_nf4, quantize_model, quantize_nf4

LLAMA_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _linear(inp: int, out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out, bias=bias)
    if bias:
        nn.init.normal_(layer.bias, std=0.5)
    return layer


def _randn(*shape: int, seed: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def _tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return tf.LlamaForCausalLM(config).float().eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_grad_match_float64(bias):
    layer = NF4Linear.from_linear(_linear(96, 80, bias=bias))
    assert layer.bias is None or not layer.bias.requires_grad
    w = layer.dequantize(torch.float64)  # (out, in)
    assert w.shape == (80, 96) and torch.equal(w, dequantize_nf4(layer.state(), torch.float64))
    x = _randn(2, 5, 96, seed=1, requires_grad=True)
    g = _randn(2, 5, 80, seed=2)
    y = layer(x)
    (y * g).sum().backward()
    b = layer.bias.double() if bias else 0.0
    torch.testing.assert_close(y.double(), x.double() @ w.T + b, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), g.double() @ w, rtol=0, atol=1e-5)
    assert y.dtype == torch.float32 and not any(p.requires_grad for p in layer.parameters())
    if bias:  # frozen by default, but a user may unfreeze it: then it gets its gradient
        layer.bias.requires_grad_(True)
        (layer(x) * g).sum().backward()
        torch.testing.assert_close(layer.bias.grad, g.sum((0, 1)), rtol=0, atol=1e-5)


def test_input_grad_under_non_reentrant_checkpoint_is_the_same():
    layer = NF4Linear.from_linear(_linear(64, 48))
    x = _randn(3, 4, 64, seed=3, requires_grad=True)
    g = _randn(3, 4, 48, seed=4)

    def block(t: torch.Tensor) -> torch.Tensor:
        return layer(t).tanh()  # tanh saves its output, so backward really recomputes the block

    expected = torch.autograd.grad((block(x) * g).sum(), x)[0]
    got = torch.autograd.grad((checkpoint(block, x, use_reentrant=False) * g).sum(), x)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_backward_saves_nothing_weight_sized():
    out_f, in_f = 80, 96
    layer = NF4Linear.from_linear(_linear(in_f, out_f))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    x = _randn(2, 3, in_f, seed=5, requires_grad=True)  # 2·3·80 output values << 80·96 weights
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (layer(x) ** 2).sum()  # pow saves its input, so the hook is seen working
    loss.backward()
    assert saved and max(saved) < out_f * in_f, saved


def test_conv1d_is_transposed_into_out_in():
    torch.manual_seed(0)
    conv = Conv1D(nf=48, nx=64)  # weight (in=64, out=48)
    nn.init.normal_(conv.weight, std=0.05)
    nn.init.normal_(conv.bias, std=0.5)
    layer = NF4Linear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (64, 48)
    expected_w = dequantize_nf4(quantize_nf4(conv.weight.detach().T.contiguous()))  # (48, 64)
    assert torch.equal(layer.dequantize(), expected_w)
    x = _randn(2, 7, 64, seed=6)
    want = x.double() @ expected_w.double().T + conv.bias.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0.1 * conv(x).abs().max().item())


def test_bytes_per_parameter_with_all_scales():
    layer = NF4Linear.from_linear(_linear(512, 256, bias=False))
    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert set(dict(layer.named_buffers())) == {"packed", "qabsmax", "absmax2", "offset"}
    assert nbytes / (512 * 256) <= 0.52


def test_state_dict_roundtrip_and_dtype_casts_keep_scales_exact():
    layer = NF4Linear.from_linear(_linear(64, 32, seed=1))
    other = NF4Linear.from_linear(_linear(64, 32, seed=2))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.dequantize(), layer.dequantize())
    before = layer.dequantize()
    layer.to(torch.bfloat16)  # model.to(dtype) must not round the fp32 scales
    assert layer.absmax2.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.float32), before)
    assert "blocksize=64" in repr(layer) and "out_features=32" in repr(layer)


def test_bf16_compute_returns_input_dtype():
    layer = NF4Linear.from_linear(_linear(64, 32), compute_dtype=torch.bfloat16)
    x = _randn(4, 64, seed=7)
    y = layer(x)
    assert y.dtype == torch.float32
    want = x.double() @ layer.dequantize(torch.float64).T + layer.bias.double()
    torch.testing.assert_close(y.double(), want, rtol=0.02, atol=0.05)


def test_quantize_model_llama_replaces_the_seven_projections():
    model = _tiny_llama()
    ids = _ids()
    before = _logits(model, ids)
    names = quantize_model(model, QuantConfig(), progress=False)
    assert len(names) == 2 * 7 and {n.rsplit(".", 1)[-1] for n in names} == LLAMA_KINDS
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.embed_tokens, nn.Embedding)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == pick_dtype("auto", "cpu")
    after = _logits(model, ids)
    assert (after - before).norm() / before.norm() < 0.2  # NF4 costs ~9% RMS per weight here

    bnb = pytest.importorskip("bitsandbytes.functional")
    same = _tiny_llama()  # the fp32 model with each weight replaced by bnb's dequantized NF4 weight
    with torch.no_grad():
        for name in names:
            weight = same.get_submodule(name).weight
            weight.copy_(
                bnb.dequantize_4bit(*bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True))
            )
    torch.testing.assert_close(after, _logits(same, ids), rtol=0, atol=1e-5)


def test_quantize_model_gpt2_conv1d(tiny):
    model = tiny("gpt2")
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    names = quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    assert {n.split(".", 3)[-1] for n in names} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert len(names) == 2 * 4 and not any(isinstance(m, Conv1D) for m in model.modules())
    assert (_logits(model, ids) - before).norm() / before.norm() < 0.2


def test_quantize_model_inside_lora_wrappers():
    model = _tiny_llama()
    reference = _tiny_llama()
    inject_lora(model, LoraConfig(r=4, target_modules="attention", dropout=0.0))
    names = quantize_model(model, QuantConfig(skip_modules=["lm_head", "v_proj"]), progress=False)
    assert "model.layers.0.self_attn.q_proj.base_layer" in names
    assert not any(".lora_" in n or n.endswith("v_proj.base_layer") or n.endswith("v_proj") for n in names)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLinear) and isinstance(q_proj.base_layer, NF4Linear)
    assert type(q_proj.lora_A["default"]) is nn.Linear
    assert type(model.model.layers[0].self_attn.v_proj.base_layer) is nn.Linear
    quantize_model(reference, QuantConfig(skip_modules=["lm_head", "v_proj"]), progress=False)
    torch.testing.assert_close(_logits(model, _ids()), _logits(reference, _ids()), rtol=0, atol=1e-5)  # B = 0


def test_quantize_model_error_lists_the_suffixes_present():
    model = _tiny_llama()
    with pytest.raises(ValueError, match=r"end with: down_proj, gate_proj, k_proj, lm_head, o_proj") as err:
        quantize_model(model, QuantConfig(skip_modules=["lm_head", *LLAMA_KINDS]), progress=False)
    assert "quant.skip_modules" in str(err.value)
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D layer in Embedding"):
        quantize_model(nn.Embedding(10, 4), QuantConfig(), progress=False)
    quantize_model(model, QuantConfig(), progress=False)
    with pytest.raises(ValueError, match="already has 14 NF4Linear layers"):
        quantize_model(model, QuantConfig(), progress=False)
