"""The pre-train check: does the run the config describes fit the memory available, and if not, what
would (each alternative predicted)? Reads config.json only, so it runs before any weight loads."""

from __future__ import annotations

import copy
import logging
from typing import Any

from lorakit.advise.memory import MemoryBreakdown, load_bytes, memory_model, qlora_load_summary
from lorakit.advise.shapes import ModelShape, model_shape
from lorakit.advise.timing import INIT_WARN_S, init_note, init_seconds, rates_for
from lorakit.advise.units import fmt_bytes
from lorakit.advise.workload import Workload, resolve_workload
from lorakit.config import RunConfig
from lorakit.errors import AdviceError, LorakitError

log = logging.getLogger(__name__)


def check_fits(config: RunConfig, available_bytes: int) -> str | None:
    """None when the predicted peak fits in `available_bytes`; otherwise the message with what to change
    (each alternative predicted). Reads config.json only; returns None (and logs) when the shapes cannot
    be read, so an advisor limitation never blocks training. A mistake in the config that the check
    finds (lora.target_modules matching no layer: ConfigError) is raised, before any weight loads."""
    try:
        shape = model_shape(config.base_model, config.task, config.revision)
    except (OSError, ValueError) as e:  # AdviceError is a ValueError: the advisor cannot read this model
        if isinstance(e, LorakitError) and not isinstance(e, AdviceError):
            raise
        log.warning("memory check skipped: %s", e)
        return None
    w = resolve_workload(config, shape)
    mem = memory_model(w, shape)
    if mem.peak_bytes <= available_bytes:
        return None
    if w.method == "qlora" and mem.phases["load"] > available_bytes:
        return _load_does_not_fit(config, w, shape, mem, available_bytes)
    lines = [f"predicted peak memory {fmt_bytes(mem.peak_bytes)} ({mem.peak_phase}) exceeds the "
             f"{fmt_bytes(available_bytes)} available on {w.device}. Largest terms: " + ", ".join(
                 f"{t.name} {fmt_bytes(t.bytes)}" for t in sorted(mem.terms, key=lambda t: -t.bytes)[:4])]
    for label, change in _alternatives(config):
        trial = copy.deepcopy(config)
        change(trial)
        peak = memory_model(resolve_workload(trial, shape, w.device), shape).peak_bytes
        mark = "fits" if peak <= available_bytes else "still too big"
        lines.append(f"  - {label}: {fmt_bytes(peak)} ({mark})")
    lines.append("`lorakit advise --config ...` shows every term; --no-memory-check overrides.")
    return "\n".join(lines)


def init_time_warning(config: RunConfig) -> str | None:
    """The advisor's warning when lora.init (pissa, olora, loftq: SVDs of every target weight) would take longer
    than INIT_WARN_S here, from config.json and the cached calibration (never calibrates); None otherwise."""
    if config.method == "full" or not config.lora.init.startswith(("pissa", "olora", "loftq")):
        return None
    try:
        shape = model_shape(config.base_model, config.task, config.revision)
    except (OSError, ValueError) as e:
        log.warning("lora.init time estimate skipped: %s", e)
        return None
    w = resolve_workload(config, shape)
    rates = rates_for(w.device, config, None, calibrate_now=False)
    return init_note(w, shape, rates)[0] if init_seconds(w, shape, rates) > INIT_WARN_S else None


def _alternatives(config: RunConfig) -> list[tuple[str, Any]]:
    tc = config.train
    alts = []
    if not tc.gradient_checkpointing:
        alts.append(("train.gradient_checkpointing: true", lambda c: setattr(c.train, "gradient_checkpointing", True)))
    if tc.micro_batch_size > 1:
        half = max(1, tc.micro_batch_size // 2)

        def halve(c: RunConfig) -> None:
            c.train.micro_batch_size, c.train.grad_accum = half, c.train.grad_accum * 2

        alts.append((f"train.micro_batch_size {tc.micro_batch_size} -> {half}, grad_accum ×2", halve))
    if config.method != "qlora":
        alts.append(("method: qlora", lambda c: setattr(c, "method", "qlora")))
    alts.append((f"data.max_seq_len {config.data.max_seq_len} -> {config.data.max_seq_len // 2}",
                 lambda c: setattr(c.data, "max_seq_len", max(8, c.data.max_seq_len // 2))))
    return alts


def _load_does_not_fit(config: RunConfig, w: Workload, shape: ModelShape, mem: MemoryBreakdown,
                       available_bytes: int) -> str:
    """Even the streamed QLoRA load is too big: no batch, sequence or checkpointing setting lowers it."""
    overhead = mem.phases["load"] - load_bytes(w, shape)
    return (f"{config.base_model} does not even load in the {fmt_bytes(available_bytes)} available on {w.device}: the "
            f"load needs {fmt_bytes(mem.phases['load'])}. {qlora_load_summary(w, shape)}, + {fmt_bytes(overhead)} "
            "framework overhead. No training setting lowers the load: use a smaller model or a machine with more "
            "memory (--no-memory-check overrides).")
