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


def test_every_eval_generation_is_in_the_time_estimate(tiny_dir):
    """eval.every_eval adds generation (prefill + G decode steps per batch of prompts) and the canary to each
    eval, and the evals to the total; the generation term grows with the prompts and the new tokens."""
    from lorakit.advise.eval_timing import eval_count

    def advice(*overrides):
        config = run_config(tiny_dir)
        config.train.max_steps, config.train.eval_every = 100, 25
        for key, value in overrides:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
        return advise(config, memory="8GB", examples=1000, calibrate_now=False)

    plain = advice()
    every = advice(("eval.every_eval", True))
    more = advice(("eval.every_eval", True), ("eval.during_training_prompts", 128))
    assert plain.evals.evals == every.evals.evals == 4  # steps 25, 50, 75, 100
    assert set(plain.evals.parts) == {"loss"} and set(every.evals.parts) == {"loss", "generation", "canary"}
    assert every.evals.parts["generation"] > 0 and every.evals.parts["canary"] > 0
    assert every.total_time_s == pytest.approx(plain.total_time_s + 4 * (every.evals.seconds - plain.evals.seconds))
    assert more.evals.parts["generation"] == pytest.approx(2 * every.evals.parts["generation"], rel=0.05)
    longer = advice(("eval.every_eval", True), ("eval.generation", type(every.config.eval.generation)(max_new_tokens=128)))
    assert longer.evals.parts["generation"] > 1.8 * every.evals.parts["generation"]
    assert "evals: 4 evals ×" in every.render() and "generation" in every.render()
    assert eval_count(100, 25, 30) == 7 and eval_count(100, None, None) == 1 and eval_count(None, 10, None) is None
