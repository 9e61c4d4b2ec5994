"""NF4 against bitsandbytes (bit for bit) and against plain float64 nearest-code maths."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.quant.nf4 import NF4_CODE, NF4State, dequantize_nf4, dynamic_map_signed, quantize_nf4

bnb = pytest.importorskip("bitsandbytes.functional")

# numel: a multiple of 64 and of 256·64; not a multiple of 64 (partial block); odd (a padding nibble);
# > 256·64 and not a multiple of it (partial absmax2 block)
SHAPES = [(128, 128), (33, 70), (7, 13), (130, 130), (16_586,)]
SCALES = [1e-3, 0.02, 50.0]


def _weight(shape: tuple[int, ...], scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    return w * torch.rand(shape, generator=g).add(0.5) ** 3  # uneven magnitudes: absmax varies per block


def _codes(state: NF4State) -> torch.Tensor:
    """Unpack to one code per weight, (n,) int64; the first element sits in the high nibble."""
    return torch.stack([state.packed >> 4, state.packed & 15], 1).view(-1)[: math.prod(state.shape)].long()


def _bnb_dequantize(packed: torch.Tensor, qs) -> torch.Tensor:
    # bnb's fallback for an odd last dim is wrapped in torch.compile; eager is the same maths, and fast
    with torch._dynamo.config.patch(disable=True):
        return bnb.dequantize_4bit(packed, qs)


def test_nf4_code_is_bitsandbytes_and_normal_quantiles():
    assert torch.equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu")[:16])
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(0.9677083, 0.5, 9)[:-1].double())  # 8 positive quantiles
    neg = -ppf(torch.linspace(0.9677083, 0.5, 8)[:-1].double())  # 7 negative
    ref = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(NF4_CODE.double(), ref / ref.max(), rtol=0, atol=1e-6)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


def test_dynamic_map_is_bitsandbytes():
    ours = dynamic_map_signed()
    assert torch.equal(ours, bnb.create_dynamic_map(signed=True))
    assert ours.shape == (256,) and bool((ours[1:] > ours[:-1]).all())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_bit_exact_with_bitsandbytes(shape, double_quant):
    for i, scale in enumerate(SCALES):
        w = _weight(shape, scale, seed=i)
        if w.dim() == 2 and w.shape[0] > 64:
            w[3:5] = 0.0  # a zero block (absmax 0) between random ones
        packed, qs = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        state = quantize_nf4(w, blocksize=64, double_quant=double_quant)
        assert torch.equal(state.packed, packed.view(-1))
        if double_quant:
            assert torch.equal(state.qabsmax, qs.absmax) and state.qabsmax.dtype == torch.uint8
            assert torch.equal(state.absmax2, qs.state2.absmax)
            assert torch.equal(state.offset, qs.offset)
        else:
            assert torch.equal(state.absmax, qs.absmax)
        ours = dequantize_nf4(state)
        assert ours.shape == w.shape
        assert torch.equal(ours.view(-1), _bnb_dequantize(packed, qs).view(-1))  # bnb gives (1, n) for 1-D


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 192), (40, 128)])
def test_half_precision_bit_exact_with_bitsandbytes(dtype, shape):
    """Both compute ŵ in fp32 and round once to the output dtype. Shapes whose last dim is a multiple of
    the blocksize (every real linear layer): bnb's CPU C kernel, the path bnb users actually run."""
    w = _weight(shape, 0.05, seed=3).to(dtype)
    packed, qs = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    state = quantize_nf4(w)
    assert torch.equal(state.packed, packed.view(-1)) and torch.equal(state.qabsmax, qs.absmax)
    ours = dequantize_nf4(state, dtype)
    assert ours.dtype == dtype and torch.equal(ours, _bnb_dequantize(packed, qs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 160), (2, 96), (7, 288)])
def test_dequantize_equals_bitsandbytes_reference_when_rows_straddle_blocks(dtype, shape):
    """Last dim a multiple of 32 but not of 64: blocks straddle rows. The codes and scales are still
    bnb's bit for bit; the dequantized values equal bnb's generic PyTorch implementation
    (`backends.default.ops._dequantize_4bit_compute`, the maths of its CUDA kernel: flat block b = i // 64).

    NOTE: bnb 0.50.2's AVX512 CPU kernel (`cdequantize_blockwise_cpu_nf4_*`, every output dtype) gives
    other values here: it scales element (r, c) by absmax[r·(n // 64) + c // 64], as if each row began
    a block, so its dequantize is not the inverse of its own quantize for these shapes. Measured: all
    of (96, 160), (3, 32), (3, 224), (2, 96), (7, 288) differ from the flat maths, while (3, 98),
    (5, 128), (4, 192) agree. No transformer linear has such an in_features, so lorakit keeps the
    correct maths (and bnb's CUDA results) rather than copy that indexing.
    """
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    backend_utils = pytest.importorskip("bitsandbytes.backends.utils")
    w = _weight(shape, 0.05, seed=3).to(dtype)
    packed, qs = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    state = quantize_nf4(w)
    assert torch.equal(state.packed, packed.view(-1)) and torch.equal(state.qabsmax, qs.absmax)
    absmax = bnb.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset  # what bnb.dequantize_4bit does
    assert torch.equal(absmax, state.float_absmax())
    code = backend_utils._get_4bit_code("nf4", packed.device)
    reference = default_ops._dequantize_4bit_compute(packed.view(-1), absmax, code, 64, shape, dtype)
    ours = dequantize_nf4(state, dtype)
    assert ours.dtype == dtype and torch.equal(ours, reference)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_codes_are_float64_nearest_except_ties(blocksize):
    w = _weight((70, 90), 0.1, seed=5)
    x = w.double().reshape(-1)
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    scaled = (blocks / blocks.abs().amax(1, keepdim=True)).view(-1)[:n]  # exact maths, no fp32 rounding
    dist = (scaled[:, None] - NF4_CODE.double()[None, :]).abs()  # (n, 16)
    nearest = dist.argmin(1)
    two = dist.topk(2, dim=1, largest=False).values
    tie = (two[:, 1] - two[:, 0]) < 1e-6  # fp32 rounding of w·(1/absmax) may fall either side
    codes = _codes(quantize_nf4(w, blocksize=blocksize, double_quant=False))
    assert torch.equal(codes[~tie], nearest[~tie])
    assert tie.sum() <= 2


@pytest.mark.parametrize("scale", [1e-3, 0.02, 3.0])
def test_double_quant_codes_grid_snapped_like_bitsandbytes(scale):
    """bnb snaps (absmax - c)/s to a 65536-point grid before its lookup: the chosen 8-bit code is
    at most 2/65535 farther from the value than the nearest code, and differs from it ~0.2% of the
    time. Many blocks (16384) so those cases occur; all of them must still equal bnb."""
    w = _weight((1024, 1024), scale, seed=7)
    state = quantize_nf4(w, double_quant=True)
    _, qs = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(state.qabsmax, qs.absmax) and torch.equal(state.absmax2, qs.state2.absmax)
    absmax = quantize_nf4(w, double_quant=False).absmax.double()
    s = state.absmax2.double().repeat_interleave(256)[: absmax.numel()]
    x = (absmax - state.offset.double()) / s  # float64 maths
    dyn = dynamic_map_signed().double()
    dist = (x[:, None] - dyn[None, :]).abs()  # (nblocks, 256)
    chosen = dist.gather(1, state.qabsmax.long()[:, None]).squeeze(1)
    assert bool((chosen <= dist.min(1).values + 2 / 65535 + 1e-7).all())
    assert (state.qabsmax.long() != dist.argmin(1)).sum() >= 5  # not plain nearest
    err = (state.float_absmax().double() - absmax).abs() / s
    assert err.max() <= (dyn[1:] - dyn[:-1]).max() / 2 + 2 / 65535 + 1e-6  # half the widest code gap


def test_storage_sizes():
    state = quantize_nf4(_weight((300, 301), 1.0, seed=0))
    nblocks = math.ceil(300 * 301 / 64)
    assert state.packed.shape == (math.ceil(300 * 301 / 2),) and state.packed.dtype == torch.uint8
    assert state.qabsmax.shape == (nblocks,) and state.absmax2.shape == (math.ceil(nblocks / 256),)
    assert state.offset.shape == () and state.offset.dtype == torch.float32
    assert state.float_absmax().shape == (nblocks,)


def test_bad_inputs_name_the_value():
    w = _weight((8, 64), 1.0, seed=0)
    for bad in (63, 0, -64, 64.0):
        with pytest.raises(ValueError, match=f"blocksize must be an even integer >= 2, got {bad!r}"):
            quantize_nf4(w, blocksize=bad)
    with pytest.raises(ValueError, match="torch.int64"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.long))
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match="inf/nan in 1 of 8 blocks"):
        quantize_nf4(w)


@pytest.mark.parametrize("shape", [(300, 301), (64 * 40 + 7,), (130, 130)])
def test_chunked_quantization_is_bit_exact_with_one_chunk(monkeypatch, shape):
    """quantize_nf4 takes QUANT_CHUNK weights at a time (temporaries of one chunk only); chunks of any
    whole number of blocks give the same state as quantizing all at once."""
    import lorakit.quant.nf4 as nf4

    w = _weight(shape, 0.3, seed=9)
    monkeypatch.setattr(nf4, "QUANT_CHUNK", 10**9)
    whole = quantize_nf4(w)
    for chunk in (64, 640, 4096):
        monkeypatch.setattr(nf4, "QUANT_CHUNK", chunk)
        part = quantize_nf4(w)
        assert all(torch.equal(a, b) for a, b in zip(part.tensors().values(), whole.tensors().values(), strict=True))
    packed, qs = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(part.packed, packed.view(-1)) and torch.equal(part.qabsmax, qs.absmax)
