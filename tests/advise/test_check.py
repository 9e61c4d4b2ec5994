"""lorakit.advise.check: the pre-train memory check."""

from __future__ import annotations

import dataclasses

import pytest
from advise_tiny import fixed_rates_fixture, llama3_8b_by_hand, run_config, tiny_dir_fixture  # noqa: F401

from lorakit.advise import CPU_BASELINE_BYTES, check_fits, fmt_bytes
from lorakit.advise.memory import quantize_workspace_bytes
from lorakit.config import DataConfig, RunConfig, TrainConfig
from lorakit.errors import ConfigError


def test_check_fits(tiny_dir):
    config = run_config(tiny_dir)
    assert check_fits(config, 64 * 2**30) is None
    message = check_fits(config, 2**20)
    assert "exceeds" in message and "gradient_checkpointing" in message and "--no-memory-check" in message
    missing = dataclasses.replace(config, base_model=tiny_dir + "-missing")
    assert check_fits(missing, 2**20) is None  # an advisor limitation never blocks training


@pytest.mark.parametrize("targets", [["qproj"], ["q_proj", "qproj"], r"model\.nothing\..*"])
def test_a_config_mistake_is_raised_not_skipped(tiny_dir, targets):
    """lora.target_modules matching nothing is the user's to fix: it surfaces here, before any weight
    loads, naming the suffixes that exist (it used to be swallowed and raised after loading)."""
    config = run_config(tiny_dir, targets=targets)
    with pytest.raises(ConfigError, match="matched no") as error:
        check_fits(config, 64 * 2**30)
    assert "q_proj" in str(error.value) and "down_proj" in str(error.value)


def test_a_load_that_cannot_fit_is_a_clear_error_with_the_numbers():
    """Llama-3-8B QLoRA on 4 GiB: even the streamed load (NF4 3.35 GiB + bf16 embeddings/head 1.96 GiB + one
    weight being quantized) does not fit. The check says so, with each number, and offers no batch or
    sequence setting (none lowers the load)."""
    hand = llama3_8b_by_hand()
    config = RunConfig(base_model="8B", method="qlora", train=TrainConfig(device="cpu", dtype="float32"))
    message = check_fits(config, 4 * 2**30)
    load = hand["nf4"] + hand["unquantized"] + 2 * hand["largest"] + quantize_workspace_bytes(hand["largest"])
    assert message.startswith("8B does not even load in the 4.00 GiB available on cpu: the load needs "
                              f"{fmt_bytes(load + CPU_BASELINE_BYTES)}")
    for part in (hand["nf4"], hand["unquantized"], 2 * hand["largest"], quantize_workspace_bytes(hand["largest"]), load):
        assert fmt_bytes(part) in message
    assert "streamed" in message and "smaller model" in message and "micro_batch_size" not in message
    assert check_fits(config, 24 * 10**9) is None  # the 24 GB machine: it fits


def test_a_load_that_fits_with_steps_that_do_not_gets_the_alternatives():
    config = RunConfig(base_model="8B", method="qlora", data=DataConfig(max_seq_len=8192),
                       train=TrainConfig(device="cpu", dtype="float32", gradient_checkpointing=False))
    message = check_fits(config, 24 * 10**9)
    assert "exceeds" in message and "train.gradient_checkpointing: true" in message and "does not even load" not in message
