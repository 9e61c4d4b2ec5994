"""The advice as a whole (`Advice`: model, config, memory, time, recommendations, notes) and how it is
shown: the text report, JSON and the ready-to-run YAML config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lorakit.advise.eval_timing import EvalTime
from lorakit.advise.memory import MemoryBreakdown, qlora_load_summary
from lorakit.advise.recommend import Recommendation
from lorakit.advise.shapes import ModelShape
from lorakit.advise.timing import TimeModel
from lorakit.advise.units import fmt_bytes, fmt_seconds
from lorakit.advise.workload import Workload
from lorakit.config import RunConfig


@dataclass
class Advice:
    """Everything `lorakit advise` prints: recommendations, the config, memory and time predictions."""

    model: ModelShape
    config: RunConfig
    device: str
    memory_available: int
    memory: MemoryBreakdown
    time: TimeModel
    recommendations: list[Recommendation]
    notes: list[str]
    examples: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    price_per_hour: float | None
    evals: EvalTime | None = None  # the evals during training (loss; generation and canary with eval.every_eval)

    @property
    def peak_memory_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def step_time_s(self) -> float:
        return self.time.step_time_s

    @property
    def fits(self) -> bool:
        return self.memory.peak_bytes <= self.memory_available

    @property
    def epoch_time_s(self) -> float | None:
        return None if self.steps_per_epoch is None else self.steps_per_epoch * self.step_time_s

    @property
    def total_time_s(self) -> float | None:
        """Training steps plus the evals between them."""
        if self.total_steps is None:
            return None
        evals = self.evals.total_s if self.evals is not None else None
        return self.total_steps * self.step_time_s + (evals or 0.0)

    @property
    def cost(self) -> float | None:
        if self.price_per_hour is None or self.total_time_s is None:
            return None
        return self.total_time_s / 3600 * self.price_per_hour

    def yaml(self) -> str:
        import yaml

        return yaml.safe_dump(dataclasses.asdict(self.config), sort_keys=False)

    def to_json(self) -> dict[str, Any]:
        m, t = self.memory, self.time
        return {
            "model": {"name": self.model.name, "source": self.model.source, "params": self.model.n_params,
                      "hidden": self.model.hidden, "intermediate": self.model.intermediate, "layers": self.model.layers,
                      "heads": self.model.heads, "kv_heads": self.model.kv_heads, "vocab": self.model.vocab},
            "device": self.device,
            "memory_available_bytes": self.memory_available,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_allocated_bytes": m.peak_allocated_bytes,
            "peak_phase": m.peak_phase,
            "fits": self.fits,
            "memory_terms": {x.name: {"bytes": x.bytes, "explanation": x.explanation} for x in m.terms},
            "phases_bytes": m.phases,
            "step_time_s": self.step_time_s,
            "flops_per_token": t.flops_per_token,
            "tokens_per_step": t.tokens_per_step,
            "step_time_parts_s": t.parts,
            "rates": t.rates_source,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_time_s": self.epoch_time_s,
            "total_steps": self.total_steps,
            "eval_time_s": self.evals.seconds if self.evals else None,
            "eval_time_parts_s": self.evals.parts if self.evals else None,
            "evals": self.evals.evals if self.evals else None,
            "total_time_s": self.total_time_s,
            "cost": self.cost,
            "recommendations": [dataclasses.asdict(r) for r in self.recommendations],
            "notes": self.notes,
            "config_yaml": self.yaml(),
        }

    def render(self) -> str:
        return render_text(self)


def notes_for(w: Workload, shape: ModelShape, mem: MemoryBreakdown, available: int, dev: str) -> list[str]:
    """What the numbers alone do not say: what a QLoRA load streams, the dominant term, what does not fit."""
    notes = []
    if w.method == "qlora":
        notes.append(f"{qlora_load_summary(w, shape)}; the load phase {fmt_bytes(mem.phases['load'])} with the "
                     f"framework overhead, the training steps {fmt_bytes(max(mem.phases['forward'], mem.phases['backward']))}")
    logits = mem.term("logits_loss")
    if logits > 0.25 * mem.peak_bytes:
        notes.append(f"the loss buffers (vocab {shape.vocab:,} × tokens) are {fmt_bytes(logits)} of the peak: "
                     "a shorter sequence or smaller micro-batch shrinks them linearly")
    if shape.attn_impl == "eager":
        notes.append(f"{shape.model_type} uses eager attention: its T×T probabilities are saved per layer")
    if mem.peak_bytes > available:
        notes.append(f"does NOT fit: predicted {fmt_bytes(mem.peak_bytes)} > {fmt_bytes(available)} available")
    if dev == "cpu":
        notes.append("CPU peak is resident memory (RSS): glibc heap slack and the measured baseline are included")
    return notes


def render_text(a: Advice) -> str:
    m, s = a.memory, a.model
    lines = [f"model: {s.name} ({s.source}) {s.n_params / 1e9:.2f}B params, hidden {s.hidden}, "
             f"{s.layers} layers, {s.heads}/{s.kv_heads} heads, vocab {s.vocab:,}",
             f"device: {a.device}, memory available {fmt_bytes(a.memory_available)}", "", "Recommendations:"]
    lines += [f"  {r.key:30s} {r.value!s:12s} {r.reason}" for r in a.recommendations]
    lines += ["", f"Memory (peak {fmt_bytes(m.peak_bytes)} in {m.peak_phase}, "
                  f"{'fits' if a.fits else 'DOES NOT FIT'}):"]
    lines += [f"  {t.name:20s} {fmt_bytes(t.bytes):>12s}  {t.explanation}" for t in m.terms if t.bytes]
    lines.append("  phases: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m.phases.items()))
    t = a.time
    lines += ["", f"Time: {fmt_seconds(a.step_time_s)}/step ({t.tokens_per_step:,} tokens, "
                  f"{t.flops_per_token / 1e9:.2f} GFLOP/token; rates: {t.rates_source})",
              "  " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in t.parts.items() if v)]
    if a.epoch_time_s is not None:
        lines.append(f"  epoch: {a.steps_per_epoch} steps, {fmt_seconds(a.epoch_time_s)}")
    if a.evals is not None and a.evals.seconds:
        count = f"{a.evals.evals} evals × " if a.evals.evals is not None else "per eval: "
        lines.append(f"  evals: {count}{fmt_seconds(a.evals.seconds)} ("
                     + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in a.evals.parts.items() if v) + ")")
    if a.total_time_s is not None:
        cost = f", cost {a.cost:.2f} at {a.price_per_hour}/h" if a.cost is not None else ""
        with_evals = " and the evals" if a.evals is not None and a.evals.seconds else ""
        lines.append(f"  total: {a.total_steps} steps{with_evals}, {fmt_seconds(a.total_time_s)}{cost}")
    if a.notes:
        lines += ["", "Notes:"] + [f"  - {n}" for n in a.notes]
    lines += ["", "Config (lorakit train config.yaml):", a.yaml()]
    return "\n".join(lines)
