"""lorakit.advise.recommend: the decision tables at each boundary, and the config they build."""

from __future__ import annotations

import pytest
from advise_tiny import fixed_rates_fixture, tiny_dir_fixture  # noqa: F401

from lorakit.advise import (
    advise,
    dropout_by_examples,
    fmt_bytes,
    method_by_memory,
    model_shape,
    rank_by_task,
    target_effective_batch,
)
from lorakit.advise.recommend import search_fit
from lorakit.config import RunConfig


@pytest.mark.parametrize(("memory", "method"), [
    (4_000_000_000, "full"), (3_999_999_999, "lora"),  # full at >= 2× the fp16 size (2 GB here)
    (2_000_000_000, "lora"), (1_999_999_999, "qlora"),  # LoRA at >= 1×
    (500_000_000, "qlora"), (499_999_999, "none"),  # QLoRA at >= 1/4; below: smaller model / offload
])
def test_method_by_memory_ratio_boundaries(memory, method):
    chosen, reason = method_by_memory(memory, n_params=1_000_000_000)
    assert chosen == method
    assert "fp16 model" in reason


@pytest.mark.parametrize(("task", "rank"), [
    ("classification", 4), ("qa", 8), ("summarization", 8), ("translation", 8),
    ("chat", 16), ("instruction", 16), ("code", 32), ("reasoning", 32),
])
def test_rank_by_task(task, rank):
    r, reason = rank_by_task(task)
    assert r == rank
    assert "64 only after an ablation" in reason


@pytest.mark.parametrize(("examples", "dropout", "batch"), [
    (4_999, 0.1, 16), (5_000, 0.05, 32), (100_000, 0.05, 32), (100_001, 0.0, 64),
])
def test_dropout_and_effective_batch_by_dataset_size(examples, dropout, batch):
    assert dropout_by_examples(examples)[0] == dropout
    assert target_effective_batch(examples) == batch


@pytest.mark.parametrize(("ratio", "table"), [(2.0, "full"), (1.0, "lora"), (0.25, "qlora")])
def test_recommended_config_follows_the_tables(tiny_dir, ratio, table):
    """Memory = ratio × the fp16 model picks the table's method. The CPU baseline makes none of these tiny
    budgets fit, and the advice must say so rather than recommend what does not fit: method 'none', the
    table's answer in its reason, and a config at the least memory QLoRA can take (the rest as the tables say)."""
    memory = int(ratio * 2 * model_shape(tiny_dir).n_params)
    chosen, why = method_by_memory(memory, model_shape(tiny_dir).n_params)
    assert chosen == table
    advice = advise(model=tiny_dir, memory=memory, device="cpu", task="code", examples=20_000)
    recs = {r.key: r for r in advice.recommendations}
    assert recs["method"].value == "none" and all(r.reason for r in advice.recommendations)
    assert why in recs["method"].reason and "nothing fits" in recs["method"].reason
    assert recs["lora.r"].value == 32 and recs["lora.alpha"].value == 64 and recs["lora.dropout"].value == 0.05
    c = advice.config
    assert c.method == "qlora" and c.lora.r == 32 and c.lora.alpha == 64
    assert 1e-4 <= c.train.lr <= 3e-4
    assert c.train.micro_batch_size * c.train.grad_accum == 32
    assert not advice.fits and "nothing fits" in recs["fit"].reason
    assert f"the least memory qlora takes is {fmt_bytes(advice.peak_memory_bytes)}" in recs["fit"].reason


def test_bare_size_uses_a_family_and_a_real_hub_id():
    advice = advise(model="8B", gpu="RTX 4090", task="chat", examples=10_000)
    assert advice.model.hidden == 4096 and advice.model.layers == 32 and advice.model.vocab == 128256
    assert 7.9e9 < advice.model.n_params < 8.1e9
    assert advice.config.base_model == "meta-llama/Llama-3.1-8B"
    assert advice.config.method == "lora" and advice.fits  # 24 GiB = 1.5× the 16 GB fp16 model
    assert 16 <= advice.config.train.micro_batch_size * advice.config.train.grad_accum <= 64


def test_the_tables_method_when_it_fits(tiny_dir):
    """Plenty of memory: the table's method (full) is recommended and the memory model agrees."""
    advice = advise(model=tiny_dir, memory="64GiB", device="cpu", task="chat", examples=1_000)
    recs = {r.key: r for r in advice.recommendations}
    assert recs["method"].value == "full" and "fits" in recs["method"].reason
    assert advice.config.method == "full" and advice.fits


CASES = [  # (model, memory, gpu): the table's method fits, steps down once or twice, or nothing fits
    ("8B", "24GB", None), ("qwen2.5-0.5b", "8GB", None), ("qwen2.5-1.5b", "4GB", None), ("8B", "4GB", None),
    ("8B", None, "RTX 4090"), ("70B", None, "A100-80GB"), ("3B", "6GB", None),
]


@pytest.mark.parametrize(("model", "memory", "gpu"), CASES)
def test_a_method_that_does_not_fit_is_never_recommended(model, memory, gpu):
    """The method recommended is the first of the table's and those below it (full -> lora -> qlora) that
    fits by the advisor's own memory model: each method above it does not fit in any setting tried, and
    the recommended config's predicted peak fits. 'none' only when not even QLoRA fits."""
    advice = advise(model=model, memory=memory, gpu=gpu, device=None if gpu else "cpu", examples=10_000,
                    calibrate_now=False)
    recs = {r.key: r for r in advice.recommendations}
    table = method_by_memory(advice.memory_available, advice.model.n_params)[0]
    order = ["full", "lora", "qlora"]
    start = order.index("qlora" if table == "none" else table)
    chosen = recs["method"].value
    above = order[start:] if chosen == "none" else order[start:order.index(chosen)]
    dev = advice.device
    for method in above:
        fit = search_fit(advice.config, advice.model, advice.memory_available, dev, 32, [method])
        assert not fit.fits and f"{method} needs at least {fmt_bytes(fit.peak)}" in recs["method"].reason
    if chosen == "none":
        assert advice.peak_memory_bytes > 0.9 * advice.memory_available and "nothing fits" in recs["method"].reason
        assert advice.config.method == "qlora"  # at the least memory it takes: the prediction shows how far off
    else:
        assert advice.config.method == chosen and advice.fits
        assert advice.peak_memory_bytes <= 0.9 * advice.memory_available


def test_8b_on_a_24_gib_cpu_recommends_qlora():
    """The issue's case: 24 GB is 1.5× the 16 GB fp16 model, so the table says LoRA; on a CPU (fp32 compute)
    LoRA does not fit, QLoRA with its streamed load does, and the advice says so instead of recommending
    LoRA and then finding that nothing fits."""
    advice = advise(model="8B", memory="24GB", device="cpu", task="chat", examples=10_000, calibrate_now=False)
    recs = {r.key: r for r in advice.recommendations}
    assert recs["method"].value == "qlora" and advice.config.method == "qlora" and advice.fits
    reason = recs["method"].reason
    assert "1–2× -> LoRA" in reason and "lora needs at least" in reason and "qlora is the first below that fits" in reason
    assert "fit" not in recs  # no 'nothing fits'


def test_a_given_config_gets_a_method_that_fits_as_advice():
    """A given config is predicted as is (LoRA here, which does not fit); the method recommended is still
    one that fits."""
    advice = advise(RunConfig(method="lora"), model="8B", memory="24GB", device="cpu", calibrate_now=False)
    recs = {r.key: r for r in advice.recommendations}
    assert advice.config.method == "lora" and not advice.fits
    assert recs["method"].value == "qlora" and "nothing fits" in recs["fit"].reason
