"""lorakit.advise.timing: the time model's parts, and a calibration taken on a busy machine."""

from __future__ import annotations

import pytest
from advise_tiny import RATES, fixed_rates_fixture, predicted, run_config, tiny_dir_fixture  # noqa: F401

from lorakit.advise import advise, time_model, timing


def test_time_model_parts_add_up(tiny_dir):
    w, shape = predicted(run_config(tiny_dir), masked=True)
    t = time_model(w, shape, RATES)
    assert t.step_time_s == pytest.approx(sum(t.parts.values()))
    slower = time_model(*predicted(run_config(tiny_dir, gc=True), True), RATES)
    assert slower.step_time_s > t.step_time_s and slower.flops_per_token > t.flops_per_token


def test_a_calibration_taken_on_a_busy_machine_is_flagged(tiny_dir, monkeypatch):
    monkeypatch.setattr(timing, "calibrate", lambda *args, **kwargs: dict(RATES, other_load=0.5))
    advice = advise(run_config(tiny_dir), memory="8GB")
    assert any("other processes used 50%" in note for note in advice.notes)
