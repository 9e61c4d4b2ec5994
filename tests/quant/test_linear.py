"""NF4Linear against float64 maths on its dequantized weight; quantize_model on tiny transformers."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from lorakit.config import LoraConfig, QuantConfig
from lorakit.lora import LoraLinear, inject_lora
from lorakit.quant import NF4Linear, dequantize_nf4, quantize_model, quantize_nf4
from lorakit.runtime.devices import pick_dtype, pick_matmul_dtype

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
    names = quantize_model(model, QuantConfig(compute_dtype="float32"), progress=False)  # fp32, as bnb's below
    assert len(names) == 2 * 7 and {n.rsplit(".", 1)[-1] for n in names} == LLAMA_KINDS
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.embed_tokens, nn.Embedding)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32
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


def test_quantize_model_shows_progress(capsys):
    model = _tiny_llama()
    quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=True)
    err = capsys.readouterr().err
    assert "quantizing to nf4" in err and "/14 [" in err and "layer/s" in err  # a bar over the 14 layers
    quantize_model(_tiny_llama(), QuantConfig(), compute_dtype=torch.float32, progress=False)
    assert "quantizing" not in capsys.readouterr().err


def test_quantize_is_vectorized_as_fast_as_bitsandbytes_c_kernel():
    """1M weights (16384 blocks): a per-block Python loop would take seconds; we stay near bnb's C code."""
    import time

    bnb = pytest.importorskip("bitsandbytes.functional")
    w = _randn(1024, 1024, seed=8)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best(lambda: quantize_nf4(w))
    theirs = best(lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
    assert ours < 4 * theirs + 0.05, (ours, theirs)


def test_whole_model_bytes_per_quantized_parameter():
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    model = tf.LlamaForCausalLM(config)
    quantize_model(model, QuantConfig(), progress=False)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    logical = sum(m.in_features * m.out_features for m in layers)
    stored = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    assert len(layers) == 14 and stored / logical <= 0.52, stored / logical
    assert not any(p.numel() == m.in_features * m.out_features for m in layers for p in m.parameters())


def test_dtype_auto_model_fp32_on_cpu_and_nf4_matmuls_bf16_where_bf16_is_fast(monkeypatch):
    import lorakit.runtime.devices as devices

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("auto", "cuda") == pick_matmul_dtype("auto", "cuda", torch.float32) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("auto", "cuda") == torch.float16  # pre-Ampere GPUs
    assert pick_matmul_dtype("auto", "cuda", torch.float16) == torch.float16
    assert pick_dtype("float32", "cuda") == pick_matmul_dtype("float32", "cuda", torch.bfloat16) == torch.float32
    for fast, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert pick_dtype("auto", "cpu") == torch.float32  # the model (LoRA factors, norms) stays fp32 on a CPU
        assert pick_matmul_dtype("auto", "cpu", torch.float32) == want
        model = _tiny_llama()
        quantize_model(model, QuantConfig(compute_dtype="auto"), progress=False)  # resolved on each layer's device
        assert {m.compute_dtype for m in model.modules() if isinstance(m, NF4Linear)} == {want}


def test_cpu_flags_read_avx512_bf16_from_cpuinfo(tmp_path):
    from lorakit.runtime.devices import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_fused_lora_over_a_bf16_matmul_base_in_an_fp32_model():
    """LoRA's fused path over an NF4 base whose matmuls run in bf16 while the model (x, A, B, bias) is fp32:
    y = bf16(x) Ŵᵀ + b + s·(x Aᵀ) Bᵀ and its gradients, against float64 maths on the bf16-rounded inputs
    (tolerance: the bf16 rounding of the base matmul's output, 2⁻⁸ relative)."""
    from lorakit.config import LoraConfig
    from lorakit.lora import LoraLinear

    torch.manual_seed(0)
    base = NF4Linear.from_linear(_linear(128, 64), compute_dtype=torch.bfloat16)
    layer = LoraLinear(base)
    layer.add_adapter("default", LoraConfig(r=4, alpha=8, dropout=0.0))
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    g = torch.randn_like(y)
    y.backward(g)

    W = base.dequantize(torch.bfloat16).double()  # (out, in), the bf16 weight the matmul sees
    A, B = (t.detach().double() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    x64, g64 = x.detach().double(), g.double()
    want = x.detach().bfloat16().double() @ W.T + base.bias.double() + 2.0 * (x64 @ A.T) @ B.T
    want_gx = g.bfloat16().double() @ W + 2.0 * (g64 @ B) @ A
    want_gA = 2.0 * ((g64 @ B).reshape(-1, 4).T @ x64.reshape(-1, 128))
    torch.testing.assert_close(y.detach().double(), want, rtol=8e-3, atol=5e-3)
    torch.testing.assert_close(x.grad.double(), want_gx, rtol=8e-3, atol=5e-3)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), want_gA, rtol=1e-5, atol=1e-6)


def test_input_grad_under_autocast_with_fp32_compute_dtype():
    """Autocast runs the forward matmul in bf16, so grad_y arrives in bf16; backward must still work."""
    layer = NF4Linear.from_linear(_linear(64, 32), compute_dtype=torch.float32)
    x = _randn(4, 64, seed=9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    want = torch.ones(4, 32, dtype=torch.float64) @ layer.dequantize(torch.float64)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), want, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("source", ["linear", "conv1d", "linear_nobias"])
def test_dequantized_layer_gives_back_the_original_type(source):
    torch.manual_seed(0)
    original = Conv1D(nf=48, nx=64) if source == "conv1d" else nn.Linear(64, 48, bias=source == "linear")
    layer = NF4Linear.from_linear(original)
    delta = _randn(48, 64, seed=10) * 0.01  # (out, in), like a LoRA update
    plain = layer.dequantized_layer(delta, dtype=torch.bfloat16)
    assert type(plain) is type(original) and plain.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in plain.parameters())
    x = _randn(3, 64, seed=11)
    want = x.double() @ (layer.dequantize(torch.float64) + delta.double()).T
    if original.bias is not None:
        want = want + original.bias.double()
    torch.testing.assert_close(plain.float()(x).double(), want, rtol=0.02, atol=0.02)
    torch.testing.assert_close(layer.dequantized_layer()(x), layer(x), rtol=1e-6, atol=1e-6)  # fp32, no delta


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_quantization_equals_cpu_and_everything_stays_on_the_device():
    linear = _linear(256, 192)
    cpu = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    gpu = NF4Linear.from_linear(linear.cuda(), compute_dtype=torch.bfloat16)  # quantized on the GPU
    assert all(b.device.type == "cuda" for b in gpu.buffers())
    assert torch.equal(gpu.packed.cpu(), cpu.packed)  # the same rounding on every device
    # the offset is a mean, reduced in another order on the GPU: the last bit may differ, a code rarely
    assert (gpu.qabsmax.cpu() != cpu.qabsmax).float().mean() < 0.01
    torch.testing.assert_close(gpu.dequantize(torch.float32).cpu(), cpu.dequantize(), rtol=1e-2, atol=1e-6)
    moved = NF4Linear.from_linear(_linear(256, 192)).cuda()  # quantized on the CPU, then moved
    assert moved.absmax2.dtype == torch.float32 and torch.equal(moved.dequantize(torch.float32).cpu(), cpu.dequantize())
    x = _randn(4, 256, seed=12, requires_grad=True)
    xg = x.detach().cuda().requires_grad_(True)
    y = gpu(xg)
    y.sum().backward()
    assert y.dtype == torch.float32 and y.device.type == "cuda" and xg.grad.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), cpu(x), rtol=0.02, atol=0.05)
    merged = gpu.dequantized_layer(dtype=torch.bfloat16)
    assert merged.weight.device.type == "cuda" and merged.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(80, 96), (3, 64), (5, 70), (1, 7)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_scratch_dequantize_is_bit_exact_and_reuses_its_buffer(shape, double_quant):
    from lorakit.quant.linear import dequantize_scratch

    state = quantize_nf4(_randn(*shape, seed=11), double_quant=double_quant)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert torch.equal(dequantize_scratch(state, dtype), dequantize_nf4(state, dtype))
    if shape[0] * shape[1] % 64 == 0:  # whole blocks: the fast path, into the same memory each call
        first = dequantize_scratch(state, torch.float32).data_ptr()
        assert dequantize_scratch(state, torch.float32).data_ptr() == first


def test_quantize_model_copies_the_rest_out_of_the_checkpoint_mapping_and_keeps_ties(tiny):
    """The unquantized tensors get their own memory (so the memory-mapped fp32 checkpoint can go);
    a head tied to the embedding stays tied, and nothing changes value."""
    model = tiny("gpt2")
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embed.weight
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    assert head.weight is embed.weight
    for name, param in model.named_parameters():
        if name in before and "bias" not in name:
            ptr, value = before[name]
            assert param.data_ptr() != ptr and torch.equal(param, value), name


@pytest.mark.parametrize("shape", [(2048, 64), (100, 64 * 257)])
def test_scratch_absmax_decode_is_bit_exact(shape):
    from lorakit.quant.linear import _float_absmax

    state = quantize_nf4(_randn(*shape, seed=12))  # 2048 / 257·100 blocks: whole and partial 256-blocks of scales
    assert torch.equal(_float_absmax(state), state.float_absmax())
