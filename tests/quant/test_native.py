"""The C NF4 decode (lorakit.quant.native) against `dequantize_nf4`, bit for bit, and its fallback."""

from __future__ import annotations

import pytest
import torch

import lorakit.quant.linear as qlinear
from lorakit.quant import dequantize_nf4, native, quantize_nf4
from lorakit.quant.nf4 import NF4_CODE


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _decode(state, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(state.shape[0] * state.shape[1], dtype=dtype)
    scales = qlinear._float_absmax(state).contiguous()
    assert native.decode(state.packed, scales, NF4_CODE.float(), state.blocksize, out)
    return out.view(state.shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def test_the_kernel_builds_here():
    """CI installs a C compiler (.ci/run): a missing one must fail here, not slow every QLoRA step silently."""
    assert native.available()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("shape", "blocksize"), [
    ((96, 320), 64), ((5632 // 8, 2048 // 8), 64),  # whole 16-byte steps
    ((5, 70), 64), ((1, 7 * 2), 64),  # tails the vector loop leaves to the scalar one
    ((33, 128), 128), ((3, 64), 32),  # other block sizes the vector loop takes
    ((7, 48), 16),  # a block of 16 weights: the scalar loop alone
])
def test_decode_equals_dequantize_nf4_bit_for_bit(shape, blocksize, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for double_quant in (True, False):
        state = quantize_nf4(_randn(*shape, seed=shape[0]) * 0.05, blocksize=blocksize, double_quant=double_quant)
        for dtype in (torch.float32, torch.bfloat16):
            assert _same_bits(_decode(state, dtype), dequantize_nf4(state, dtype)), (double_quant, dtype)


def test_bf16_rounding_of_ties_subnormals_infinities_and_nan_is_torchs():
    """Scales picked so that products land on bf16 ties and below fp32's normal range, plus inf (and 0·inf = NaN):
    the kernel's integer round-to-nearest-even gives torch's bits for every one."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(8)  # every byte: every code pair, 2048 bytes
    ties = 1.0 + torch.arange(64, dtype=torch.float32) * 2.0**-8 + 2.0**-9  # halfway between two bf16 values
    scales = torch.cat([ties, torch.tensor([1e-39, -3e-40, 2.0**-149, float("inf"), float("-inf"), 0.0, 1e38,
                                            -1.0]).repeat(8)])  # (128,) for 4096 weights in blocks of 32
    out = torch.empty(4096, dtype=torch.bfloat16)
    assert native.decode(codes, scales, NF4_CODE.float(), 32, out)
    want = (NF4_CODE.float()[torch.stack([codes >> 4, codes & 15], -1).view(-1).long()].view(-1, 32)
            * scales[:, None]).to(torch.bfloat16).view(-1)
    assert torch.isnan(want).any() and torch.isinf(want).any()
    assert _same_bits(out, want)


def test_tiles_and_the_whole_weight_take_the_kernel_and_equal_the_eager_decode(monkeypatch):
    state = quantize_nf4(_randn(200, 128, seed=11))
    monkeypatch.setattr(qlinear, "TILE_BYTES", 4096)  # 25 tiles, the last partial
    for dtype in (torch.float32, torch.bfloat16):
        fast = [t.clone() for _, t in qlinear._tiles(state, dtype)]
        whole = qlinear.dequantize_scratch(state, dtype).clone()
        with monkeypatch.context() as m:
            m.setattr(native, "decode", lambda *a: False)  # as where no compiler is: the eager ops
            eager = [t.clone() for _, t in qlinear._tiles(state, dtype)]
            whole_eager = qlinear.dequantize_scratch(state, dtype).clone()
        assert len(fast) == len(eager) == 25
        assert all(_same_bits(f, e) for f, e in zip(fast, eager, strict=True))
        assert _same_bits(whole, whole_eager) and _same_bits(whole, dequantize_nf4(state, dtype))


def test_no_compiler_means_one_warning_and_the_eager_decode(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="lorakit.quant.native"):
            state = quantize_nf4(_randn(64, 128, seed=3))
            assert torch.equal(qlinear.dequantize_scratch(state, torch.float32), dequantize_nf4(state))
            assert not native.available()
        assert caplog.text.count("native NF4 decode is unavailable") == 1
        assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-written left behind
    finally:
        native._library.cache_clear()
