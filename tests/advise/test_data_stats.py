"""lorakit.advise.data_stats: the data read through lorakit.data (one reader), and a given config predicted
at the widest micro-batch its data makes after tokenization and padding or packing, not at max_seq_len."""

from __future__ import annotations

import json

import pytest
from advise_tiny import fixed_rates_fixture, run_config, tiny_dir_fixture  # noqa: F401

from conftest import save_tiny_base, write_text_data
from lorakit.advise import advise, data_stats, memory_model, model_shape, resolve_workload
from lorakit.data import collate, pack_examples, prepare_data
from lorakit.errors import DataError
from lorakit.models import load_tokenizer
from lorakit.train import BatchPlan, total_steps


def test_data_stats_reads_every_format_through_lorakit_data(tmp_path):
    """40 characters of text = 10 tokens at 4 characters/token; chat and alpaca rows count their content."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": "x" * 40 * k}) for k in (1, 2, 3)) + "\n")
    (folder / "b.csv").write_text("prompt,completion\n" + "p" * 20 + "," + "c" * 20 + "\n")
    stats = data_stats(folder)
    assert stats.examples == 4 and not stats.tokenized and stats.longest_row is None
    assert stats.p95_tokens == 30 and stats.mean_tokens == pytest.approx((10 + 20 + 30 + 10) / 4)
    (folder / "c.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        data_stats(folder)


@pytest.fixture
def text_run(tmp_path):
    """A tiny base with a tokenizer and 48 short text rows, as a config that names them."""
    base = save_tiny_base(tmp_path / "base")
    train = write_text_data(tmp_path / "train.jsonl", n=48)
    config = run_config(str(base))
    config.data.train, config.data.max_seq_len = str(train), 1024
    return config


@pytest.mark.parametrize(("packing", "max_seq_len"), [(False, 1024), (True, 1024), (True, 32)])
def test_a_given_config_is_predicted_at_its_datas_widest_batch(text_run, packing, max_seq_len):
    config = text_run
    config.data.packing, config.data.max_seq_len = packing, max_seq_len
    advice = advise(config, memory="8GB", device="cpu")
    # the training pipeline itself: tokenize, split, (pack), and collate every row into one padded batch
    data = prepare_data(config.data, load_tokenizer(config.base_model), "causal_lm", config.train.micro_batch_size)
    rows = pack_examples(data.train, max_seq_len) if packing else data.train
    widest = collate(rows, 0, max_seq_len=max_seq_len)["input_ids"].shape[1]
    assert widest < 1024 and (widest <= 32 if max_seq_len == 32 else True)
    shape = model_shape(config.base_model)
    at_widest = memory_model(resolve_workload(config, shape, "cpu", seq_len=widest), shape)
    at_max = memory_model(resolve_workload(config, shape, "cpu"), shape)
    assert advice.peak_memory_bytes == at_widest.peak_bytes
    if max_seq_len == 1024:
        assert advice.memory.term("activations") < at_max.term("activations")
    assert any(f"the widest {widest} tokens" in note for note in advice.notes)
    assert advice.examples == len(data.train)
    plan = BatchPlan(rows, config.train.micro_batch_size, config.train.seed)
    assert advice.total_steps == total_steps(config, plan)


def test_without_a_tokenizer_the_lengths_are_estimated(tiny_dir, tmp_path):
    """A model directory with config.json only: the data is counted and its lengths estimated, and the
    memory is predicted at data.max_seq_len."""
    config = run_config(tiny_dir)
    config.data.train = str(write_text_data(tmp_path / "train.jsonl", n=20))
    advice = advise(config, memory="8GB", device="cpu")
    shape = model_shape(tiny_dir)
    assert advice.examples == 20
    assert advice.peak_memory_bytes == memory_model(resolve_workload(config, shape, "cpu"), shape).peak_bytes
    assert any("estimated at 4 characters/token" in note for note in advice.notes)
