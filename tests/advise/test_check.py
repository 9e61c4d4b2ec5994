"""lorakit.advise.check: the pre-train memory check."""

from __future__ import annotations

import dataclasses

import pytest
from advise_tiny import fixed_rates_fixture, run_config, tiny_dir_fixture  # noqa: F401

from lorakit.advise import check_fits
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
