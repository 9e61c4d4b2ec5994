"""The tile-by-tile NF4 matmul (few rows) against the plain one (whole Ŵ) and against float64 maths."""

from __future__ import annotations

import threading

import pytest
import torch

import lorakit.quant.linear as qlinear
from lorakit.config import LoraConfig
from lorakit.lora import inject_lora
from lorakit.quant import NF4Linear, dequantize_nf4, quantize_nf4
from lorakit.quant.linear import nf4_grad_input, nf4_linear

SHAPES = [(200, 128), (96, 320), (7, 64)]  # out not a multiple of the tile rows: a partial last tile


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 KiB (8 rows of 128): many tiles even on tiny layers."""
    monkeypatch.setattr(qlinear, "TILE_BYTES", 4096)


def _plain(monkeypatch) -> None:
    monkeypatch.setattr(qlinear, "TILED_MAX_ROWS", 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_tiled_forward_and_grad_input_match_float64(small_tiles, shape, rows):
    state = quantize_nf4(_randn(*shape, seed=1) * 0.05)
    assert qlinear._tiled(state, rows, torch.device("cpu"))
    w = dequantize_nf4(state, torch.float64)  # (out, in)
    x, g, b = _randn(rows, shape[1], seed=2), _randn(rows, shape[0], seed=3), _randn(shape[0], seed=4)
    y = nf4_linear(x, state, torch.float32, b)
    assert y.shape == (rows, shape[0]) and y.is_contiguous()
    torch.testing.assert_close(y.double(), x.double() @ w.T + b.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nf4_grad_input(g, state, torch.float32).double(), g.double() @ w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_tiled_equals_plain_path(small_tiles, monkeypatch, shape):
    state = quantize_nf4(_randn(*shape, seed=5) * 0.05)
    x, g = _randn(9, shape[1], seed=6), _randn(9, shape[0], seed=7)
    tiled = nf4_linear(x, state, torch.float32), nf4_grad_input(g, state, torch.float32)
    _plain(monkeypatch)
    assert not qlinear._tiled(state, 9, torch.device("cpu"))
    plain = nf4_linear(x, state, torch.float32), nf4_grad_input(g, state, torch.float32)
    for got, want in zip(tiled, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tiles_are_the_rows_of_dequantize_bit_for_bit(small_tiles):
    state = quantize_nf4(_randn(200, 128, seed=8))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = dequantize_nf4(state, dtype)
        seen = 0
        for o, tile in qlinear._tiles(state, dtype):
            assert tile.dtype == dtype and torch.equal(tile, want[o:o + tile.shape[0]])
            seen += tile.shape[0]
        assert seen == 200


def test_bf16_tiled_close_to_plain_bf16(small_tiles, monkeypatch):
    state = quantize_nf4(_randn(96, 320, seed=9) * 0.05)
    x = _randn(4, 320, seed=10).bfloat16()
    tiled = nf4_linear(x, state, torch.bfloat16)
    _plain(monkeypatch)
    torch.testing.assert_close(tiled, nf4_linear(x, state, torch.bfloat16), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_nf4_linear_module_tiled_vs_plain_forward_and_backward(small_tiles, monkeypatch, bias):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 200, bias=bias))
    results = []
    for force_plain in (False, True):
        if force_plain:
            _plain(monkeypatch)
        x = _randn(2, 3, 128, seed=11).requires_grad_(True)
        y = layer(x)
        (y * _randn(2, 3, 200, seed=12)).sum().backward()
        results.append((y.detach(), x.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lora_over_nf4_base_tiled_vs_plain(small_tiles, monkeypatch, tiny):
    from lorakit.config import QuantConfig
    from lorakit.quant import quantize_model

    results = []
    for force_plain in (False, True):
        if force_plain:
            _plain(monkeypatch)
        model = tiny("llama")
        quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
        inject_lora(model, LoraConfig(r=4, dropout=0.0, target_modules="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        ids = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(13))
        out = model(input_ids=ids).logits
        out.square().mean().backward()
        results.append([out.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tiled_path_never_makes_the_whole_weight(small_tiles):
    """In a fresh thread (fresh scratch buffers): no buffer holds more than one tile."""
    state = quantize_nf4(_randn(1024, 256, seed=14))
    sizes: dict = {}

    def run():
        nf4_linear(_randn(2, 256, seed=15), state, torch.float32)
        nf4_grad_input(_randn(2, 1024, seed=16), state, torch.float32)
        sizes.update({k: v.numel() for k, v in qlinear._scratch.__dict__.get("buffers", {}).items()})

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    scales = sizes.pop(("absmax codes", torch.int64))  # one code per 64 weights: the layer's decoded scales
    assert scales == 1024 * 256 // 64
    assert sizes and max(sizes.values()) <= qlinear.TILE_BYTES // 4 < 1024 * 256


def test_blocks_straddling_rows_take_the_plain_path():
    state = quantize_nf4(_randn(6, 96, seed=17))  # 96 % 64 != 0: a scale block spans two rows
    assert not qlinear._tiled(state, 1, torch.device("cpu"))
    x = _randn(1, 96, seed=18)
    torch.testing.assert_close(
        nf4_linear(x, state, torch.float32).double(), x.double() @ dequantize_nf4(state, torch.float64).T,
        rtol=1e-5, atol=1e-6,
    )
