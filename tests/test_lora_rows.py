"""Per-row adapters (`adapter_rows`): the grouped path against the reference per-adapter loop and float64 maths.

Mixes of 1-8 adapters with ranks 4-64, base rows among them, adapters that target different layers, over
fp32 and NF4 bases, for prefill (rows of many tokens) and decode (one token per row, a KV cache).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from conftest import build_tiny, randomize_lora
from lorakit import LoraConfig, QuantConfig, adapter_rows, inject_lora, quantize_model
from lorakit.generate import RunningBatch
from lorakit.lora import LoraLinear, delete_adapter, lora_layers
from lorakit.lora_rows import piece_rank
from lorakit.quant import NF4Linear

RANKS = [4, 8, 12, 16, 24, 32, 48, 64]
TARGETS = ["all-linear", "attention", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"],
           ["k_proj", "o_proj", "down_proj"], "all-linear", ["q_proj"], "attention"]
TOL = {"rtol": 1e-6, "atol": 1e-6}  # outputs are of order 1 here, so 1e-6 is a few fp32 roundings


def layer_with_adapters(n: int, base: str, seed: int = 0, in_features: int = 48, out_features: int = 40) -> LoraLinear:
    """A LoraLinear over an fp32 or NF4 base holding adapters a0..a{n-1} of ranks RANKS[:n], random factors."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features).requires_grad_(False)  # frozen, as inject_lora leaves it
    nn.init.normal_(linear.bias, std=0.5)
    layer = LoraLinear(NF4Linear.from_linear(linear, blocksize=16, compute_dtype=torch.float32)
                       if base == "nf4" else linear)
    for i in range(n):
        layer.add_adapter(f"a{i}", LoraConfig(r=RANKS[i], alpha=RANKS[i] * (1 + i % 3), dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_" in name:  # A ~ 0.15, B ~ 0.1/√r: every adapter's update of order 1, like the base output
                param.copy_(torch.randn(param.shape, generator=g) * (0.15 if "lora_A" in name else 0.1 / param.shape[1] ** 0.5))
    return layer.eval()


def row_names(n: int, rows: int, seed: int) -> list[str | None]:
    """Every adapter at least once (when rows allow), base rows in between, in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    names = [f"a{i % n}" for i in range(rows - 1)] + [None]
    return [names[i] for i in torch.randperm(len(names), generator=g)]


def run_layer(layer: LoraLinear, x: torch.Tensor, names, grouped: bool) -> torch.Tensor:
    """The layer's forward with each row on its adapter; `adapter_rows` wants a model, so use a one-layer one."""
    model = nn.Sequential(layer)
    model.lorakit_adapters = {n: None for n in layer.lora_A}
    with torch.no_grad(), adapter_rows(model, names, grouped=grouped):
        return model(x)


def float64_rows(layer: LoraLinear, x: torch.Tensor, names) -> torch.Tensor:
    """base(x) + s · x Aᵀ Bᵀ per row, in float64 from the layer's own (dequantized) weights."""
    base = layer.base_layer
    weight = base.dequantize(torch.float64) if isinstance(base, NF4Linear) else base.weight.double()
    y = x.double() @ weight.T + base.bias.double()
    for i, name in enumerate(names):
        if name is not None:
            A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
            y[i] += (x[i].double() @ A.T @ B.T) * layer.scaling[name]
    return y


@pytest.mark.parametrize("base", ["fp32", "nf4"])
@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("tokens", [1, 7], ids=["decode", "prefill"])
def test_grouped_rows_equal_the_reference_and_float64(base, n, tokens):
    layer = layer_with_adapters(n, base, seed=n)
    for rows, seed in ((n + 1, 0), (2 * n + 3, 1)):  # every slot used / slots left unused
        names = row_names(n, rows, seed)
        x = torch.randn(rows, tokens, layer.in_features, generator=torch.Generator().manual_seed(seed))
        grouped = run_layer(layer, x, names, grouped=True)
        torch.testing.assert_close(grouped, run_layer(layer, x, names, grouped=False), **TOL)
        torch.testing.assert_close(grouped.double(), float64_rows(layer, x, names), rtol=1e-5, atol=1e-5)
        # the grouped path is the one that ran: the layer cached a stack for this set
        assert tuple(sorted({a for a in names if a is not None})) in layer.stacks


def test_grouped_rows_in_float64_match_the_float64_maths_exactly():
    layer = layer_with_adapters(8, "fp32").double()
    names = row_names(8, 13, 2)
    x = torch.randn(13, 5, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(run_layer(layer, x, names, grouped=True), float64_rows(layer, x, names),
                               rtol=1e-12, atol=1e-12)


def test_base_rows_get_exactly_the_base_output_and_one_adapter_runs_fused():
    layer = layer_with_adapters(3, "fp32")
    x = torch.randn(5, 3, layer.in_features)
    names = [None, "a1", None, "a2", "a1"]
    out = run_layer(layer, x, names, grouped=True)
    base = layer.base_layer(x)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    same = run_layer(layer, x, ["a2"] * 5, grouped=True)  # every row on one adapter: the fused path
    torch.testing.assert_close(same, run_layer(layer, x, ["a2"] * 5, grouped=False), **TOL)
    assert not any("a2" in key and len(key) == 1 for key in layer.stacks)


def test_stacks_follow_changed_added_and_deleted_adapters():
    layer = layer_with_adapters(3, "fp32")
    x = torch.randn(4, 2, layer.in_features)
    names = ["a0", "a1", None, "a2"]
    before = run_layer(layer, x, names, grouped=True)
    with torch.no_grad():
        layer.lora_B["a1"].weight.mul_(-2.0)  # in place: the version counter tells the cache
    after = run_layer(layer, x, names, grouped=True)
    torch.testing.assert_close(after, run_layer(layer, x, names, grouped=False), **TOL)
    assert not torch.allclose(before[1], after[1]) and torch.equal(before[0], after[0])
    layer.add_adapter("a3", LoraConfig(r=6, dropout=0.0))
    assert not layer.stacks  # adding an adapter clears the cache
    run_layer(layer, x, ["a3", "a1", "a0", None], grouped=True)
    layer.double()
    assert not layer.stacks  # so does a dtype or device move
    x64 = x.double()
    torch.testing.assert_close(run_layer(layer, x64, names, grouped=True), run_layer(layer, x64, names, grouped=False),
                               rtol=1e-12, atol=1e-12)


def test_stacks_per_layer_are_bounded():
    layer = layer_with_adapters(8, "fp32")
    x = torch.randn(3, 1, layer.in_features)
    for a, b in itertools.combinations(range(8), 2):
        run_layer(layer, x, [f"a{a}", None, f"a{b}"], grouped=True)
    assert len(layer.stacks) <= 4


def test_piece_rank_trades_padding_against_pieces():
    assert piece_rank([8, 16, 32, 64]) == 16  # 8 pieces of 16 instead of 4 of 64
    assert piece_rank([16, 16, 16]) == 16
    assert piece_rank([4, 64]) == 64  # 17 pieces of 4 would cost more than padding 4 to 64


def model_with_adapters(n: int, nf4: bool) -> nn.Module:
    """A tiny Llama (fp32 or NF4 base) with n adapters of different ranks and target sets."""
    model = build_tiny("llama")
    if nf4:
        quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    for i in range(n):
        inject_lora(model, LoraConfig(r=RANKS[i], alpha=2 * RANKS[i], dropout=0.0, target_modules=TARGETS[i]), f"a{i}")
    randomize_lora(model, seed=n)
    return model.eval()


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_prefill_and_decode_of_a_model_equal_the_reference(nf4, n):
    """RunningBatch over a model whose adapters target different layers: logits of prefill and of every
    decode step, grouped vs reference, and rows that join the batch mid-way."""
    model = model_with_adapters(n, nf4)
    first = [[5, 9, 11, 3], [7, 7], [12, 4, 8], [3, 14, 6, 2, 9]]
    later = [[10, 6, 4], [8]]
    names = [f"a{i % n}" for i in range(len(first) - 1)] + [None]
    joined = names + [f"a{(n - 1)}", None]
    results = []
    for grouped in (True, False):
        batch, out = RunningBatch(model), []
        with adapter_rows(model, names, grouped=grouped):
            out.append(batch.prefill(first, pad_id=0))
        tokens = out[-1].argmax(-1)
        for step in range(3):
            rows = names if step == 0 else joined
            with adapter_rows(model, rows, grouped=grouped):
                out.append(batch.step(tokens))
            tokens = out[-1].argmax(-1)
            if step == 0:
                with adapter_rows(model, joined[len(names):], grouped=grouped):
                    tokens = torch.cat([tokens, batch.prefill(later, pad_id=0).argmax(-1)])
        results.append(out)
    for grouped, reference in zip(*results, strict=True):
        torch.testing.assert_close(grouped, reference, **TOL)
    lora = [layer for _, layer in lora_layers(model)]
    assert n == 1 or any(layer.stacks for layer in lora)  # the grouped path ran


def test_training_through_adapter_rows_takes_the_reference_path_and_reaches_each_adapter():
    model = model_with_adapters(3, nf4=False).train()
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)  # every adapter trainable (set_adapter leaves only the last)
    ids = torch.randint(3, 60, (3, 6))
    with adapter_rows(model, ["a0", None, "a2"]):
        model(input_ids=ids).logits.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".a0." in n for n in grads) and any(".a2." in n for n in grads)
    assert not any(".a1." in n for n in grads)
    assert not any(layer.stacks for _, layer in lora_layers(model))


def test_deleting_an_adapter_refreshes_the_cached_layers():
    model = model_with_adapters(3, nf4=False)
    ids = torch.randint(3, 60, (2, 5))
    with torch.no_grad(), adapter_rows(model, ["a0", "a1"]):
        model(input_ids=ids)
    delete_adapter(model, "a1")
    inject_lora(model, LoraConfig(r=4, dropout=0.0, target_modules="all-linear"), "a1")  # same name, new targets
    randomize_lora(model, seed=11)
    with torch.no_grad():
        with adapter_rows(model, ["a0", "a1"]):
            grouped = model(input_ids=ids).logits
        with adapter_rows(model, ["a0", "a1"], grouped=False):
            reference = model(input_ids=ids).logits
    torch.testing.assert_close(grouped, reference, **TOL)


def test_row_names_are_checked_on_every_block_and_no_row_state_outlives_it():
    """Plans are cached per row names once checked; a bad name is refused every time, not cached, and a
    block left by an exception leaves every layer out of row mode."""
    model = model_with_adapters(3, nf4=False)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
            with adapter_rows(model, ["a0", "zz"]):
                pass
    ids = torch.randint(3, 60, (2, 4))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), adapter_rows(model, ["a0", "a2"]):
        model(input_ids=ids)
        assert all(layer.row_plan is not None for _, layer in lora_layers(model))
        raise RuntimeError("boom")
    assert all(layer.row_plan is None for _, layer in lora_layers(model))
    with torch.no_grad():
        plain = model(input_ids=ids).logits  # the active adapter again, on every row
        with adapter_rows(model, ["a2", "a2"]):
            rows = model(input_ids=ids).logits
    torch.testing.assert_close(rows, plain, **TOL)  # inject_lora left a2 active


def test_row_kernels_are_decided_once_per_plan_and_follow_changed_factors():
    layer = layer_with_adapters(3, "fp32")
    model = nn.Sequential(layer)
    model.lorakit_adapters = {n: None for n in layer.lora_A}
    x = torch.randn(4, 1, layer.in_features)
    plans = {"uniform": ["a1"] * 4, "mixed": ["a0", None, "a2", "a1"], "base": [None] * 4}

    def run(names):
        with torch.no_grad(), adapter_rows(model, names):
            return model(x)

    expected = {case: run_layer(layer, x, names, grouped=False) for case, names in plans.items()}
    layer.row_kernels.clear()
    for _ in range(2):  # alternating plans (as continuous batching revisits them) reuse each plan's kernel
        for case, names in plans.items():
            torch.testing.assert_close(run(names), expected[case], **TOL)
    assert len(layer.row_kernels) == len(plans)
    kernel = next(k for k in layer.row_kernels.values() if k.plan.names == tuple(plans["uniform"]))
    with torch.no_grad():
        layer.lora_A["a1"].weight.mul_(3.0)  # in place: the version counters say the kernel is stale
    for names in plans.values():
        torch.testing.assert_close(run(names), run_layer(layer, x, names, grouped=False), **TOL)
    assert not torch.equal(run(plans["uniform"]), layer.base_layer(x))
    assert next(k for k in layer.row_kernels.values() if k.plan.names == tuple(plans["uniform"])) is not kernel
    layer.base_layer = NF4Linear.from_linear(layer.base_layer, blocksize=16, compute_dtype=torch.float32)
    for names in plans.values():  # a base swapped inside the wrapper (quantize_model does): decided again
        torch.testing.assert_close(run(names), run_layer(layer, x, names, grouped=False), **TOL)  # NF4 ≠ fp32 base
    layer.add_adapter("a3", LoraConfig(r=4, dropout=0.0))
    assert not layer.row_kernels  # a new adapter, a dtype or device move: decided again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_grouped_rows_on_cuda_equal_the_reference(base):
    layer = layer_with_adapters(8, base).cuda()
    for tokens in (1, 7):
        x = torch.randn(11, tokens, layer.in_features, device="cuda")
        for names in (row_names(8, 11, seed=tokens), ["a5"] * 11, [None] * 11):
            got = run_layer(layer, x, names, grouped=True)
            assert got.device.type == "cuda"
            torch.testing.assert_close(got, run_layer(layer, x, names, grouped=False), rtol=1e-5, atol=1e-5)


def test_a_base_running_its_own_forward_gets_grouped_rows_equal_to_the_reference():
    """A hooked base (accelerate's offloading hooks it; bitsandbytes' Linear4bit is another type) is called as a
    module: the row kernel still runs grouped, uniform rows included, and equals the reference loop."""
    layer = layer_with_adapters(4, "fp32")
    calls = []
    layer.base_layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    x = torch.randn(6, 3, layer.in_features)
    for names in (["a0", None, "a3", "a1", "a2", "a3"], ["a2"] * 6):
        before = len(calls)
        got = run_layer(layer, x, names, grouped=True)
        assert len(calls) == before + 1  # the base ran as a module
        torch.testing.assert_close(got, run_layer(layer, x, names, grouped=False), **TOL)
    assert any(kernel.run is not None for kernel in layer.row_kernels.values())
