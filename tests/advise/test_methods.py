"""The advisor on DoRA and the weight inits: DoRA's parameters and saved tensors against the real layers,
its time term, and lora.init's one-off cost (with the warning a long one gets before any weight loads)."""

from __future__ import annotations

import dataclasses

import pytest
from advise_tiny import RATES, B, T, fixed_rates_fixture, predicted, real_model, run_config, tiny_dir_fixture  # noqa: F401
from test_memory import batch, layer_call, saved_bytes

from lorakit.advise import time_model
from lorakit.advise.check import init_time_warning
from lorakit.advise.memory import dora_norm_bytes, layer_activation_bytes, lora_parameter_count, memory_model
from lorakit.advise.timing import init_seconds
from lorakit.config import RunConfig


def _dora(config: RunConfig) -> RunConfig:
    config.lora.use_dora = True
    return config


@pytest.mark.parametrize(("method", "dropout"), [("lora", 0.0), ("lora", 0.05), ("qlora", 0.05)])
def test_dora_parameters_and_saved_tensors_match_the_real_layer(tiny_dir, method, dropout):
    """m adds out per target; per token DoRA saves z (b·out), or x_d Wᵀ and s·x_d AᵀBᵀ with dropout. Per target
    it also saves n and m/n (and m/n − 1 with dropout), (out,) fp32 each, whatever the batch: counted here."""
    config = _dora(run_config(tiny_dir, method, dropout=dropout))
    model = real_model(config)
    w, shape = predicted(config, masked=False)
    assert lora_parameter_count(w, shape) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    call, shared = layer_call(model, batch(masked=False))
    measured = saved_bytes(call, [*model.parameters(), *model.buffers(), *shared])
    per_target = 4 * sum(t.out_features for t in w.lora_targets) * (3 if dropout else 2)
    assert layer_activation_bytes(w, shape) * B * T + per_target == measured
    plain = dataclasses.replace(w, lora=dataclasses.replace(w.lora, use_dora=False))
    extra = sum(t.out_features for t in w.lora_targets) * 4 * (2 if dropout else 1)
    assert layer_activation_bytes(w, shape) - layer_activation_bytes(plain, shape) == extra


def test_dora_costs_time_and_a_norm_transient(tiny_dir):
    w, shape = predicted(_dora(run_config(tiny_dir)), masked=True)
    plain = dataclasses.replace(w, lora=dataclasses.replace(w.lora, use_dora=False))
    t, t_plain = time_model(w, shape, RATES), time_model(plain, shape, RATES)
    assert t.parts["dora"] > 0 and t_plain.parts["dora"] == 0
    assert t.step_time_s == pytest.approx(sum(t.parts.values()))
    assert dora_norm_bytes(w, shape) == 4 * max(lin.numel for lin in w.lora_targets)
    assert memory_model(w, shape).phases["forward"] > memory_model(plain, shape).phases["forward"]


def test_init_seconds_by_method(tiny_dir):
    w, shape = predicted(run_config(tiny_dir), masked=True)
    rates = dict(RATES, svd_s=1e-8, qr_s=1e-9)
    units = shape.layers * sum(t.numel * min(t.in_features, t.out_features) for t in w.lora_targets)

    def seconds(**lora) -> float:
        return init_seconds(dataclasses.replace(w, lora=dataclasses.replace(w.lora, **lora)), shape, rates)

    assert seconds(init="kaiming") == 0
    assert seconds(init="pissa") == pytest.approx(1e-8 * units)
    assert seconds(init="olora") == pytest.approx(1e-9 * units)
    assert seconds(init="loftq", loftq_iter=2) > 2 * seconds(init="pissa")
    assert 0 < seconds(init="pissa_niter_4") < seconds(init="pissa_niter_16")


def test_a_long_init_is_warned_before_weights_load_with_the_fast_alternative():
    """Llama-3-8B shapes (config only) on a CPU: 224 full SVDs take hours; pissa_niter_4 is named instead."""
    config = RunConfig(base_model="llama-3-8b", method="lora")
    config.train.device = "cpu"
    config.lora.init = "pissa"
    warning = init_time_warning(config)
    assert warning is not None and "WARNING: that is long; lora.init: pissa_niter_4" in warning
    config.lora.init = "kaiming"
    assert init_time_warning(config) is None
