"""lorakit.advise.recommend: the decision tables at each boundary, and the config they build."""

from __future__ import annotations

import pytest
from advise_tiny import fixed_rates_fixture, tiny_dir_fixture  # noqa: F401

from lorakit.advise import (
    advise,
    dropout_by_examples,
    method_by_memory,
    model_shape,
    rank_by_task,
    target_effective_batch,
)


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


@pytest.mark.parametrize(("ratio", "method", "lr_range"), [
    (2.0, "full", (1e-5, 5e-5)), (1.0, "lora", (5e-5, 2e-4)), (0.25, "qlora", (1e-4, 3e-4)),
])
def test_recommended_config_follows_the_tables(tiny_dir, ratio, method, lr_range):
    """Memory = ratio × the fp16 model picks the method (the CPU baseline makes none of these tiny
    budgets fit, which must not change the table's answer, only say so)."""
    memory = int(ratio * 2 * model_shape(tiny_dir).n_params)
    advice = advise(model=tiny_dir, memory=memory, device="cpu", task="code", examples=20_000)
    recs = {r.key: r for r in advice.recommendations}
    assert recs["method"].value == method and all(r.reason for r in advice.recommendations)
    assert recs["lora.r"].value == 32 and recs["lora.alpha"].value == 64 and recs["lora.dropout"].value == 0.05
    c = advice.config
    assert c.method == method and c.lora.r == 32 and c.lora.alpha == 64
    assert lr_range[0] <= c.train.lr <= lr_range[1]
    assert c.train.micro_batch_size * c.train.grad_accum == 32
    assert not advice.fits and "nothing fits" in recs["fit"].reason


def test_bare_size_uses_a_family_and_a_real_hub_id():
    advice = advise(model="8B", gpu="RTX 4090", task="chat", examples=10_000)
    assert advice.model.hidden == 4096 and advice.model.layers == 32 and advice.model.vocab == 128256
    assert 7.9e9 < advice.model.n_params < 8.1e9
    assert advice.config.base_model == "meta-llama/Llama-3.1-8B"
    assert advice.config.method == "lora" and advice.fits  # 24 GiB = 1.5× the 16 GB fp16 model
    assert 16 <= advice.config.train.micro_batch_size * advice.config.train.grad_accum <= 64
