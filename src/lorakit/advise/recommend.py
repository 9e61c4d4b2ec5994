"""Recommendations, each with its reason, from the published decision tables (method by memory ratio,
rank by task, alpha = 2r, targets, learning rate by method, dropout by dataset size, micro-batch ×
accumulation for an effective batch of 16–64); then the memory model steps the batch, checkpointing,
targets and method down until the run fits."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from lorakit.advise.memory import memory_model
from lorakit.advise.shapes import ModelShape
from lorakit.advise.units import fmt_bytes
from lorakit.advise.workload import resolve_workload
from lorakit.config import LoraConfig, RunConfig
from lorakit.errors import AdviceError

# --------------------------------------------------------------------------- the decision tables

RANK_BY_TASK = {
    "classification": 4, "sentiment": 4, "seq_cls": 4,
    "qa": 8, "summarization": 8, "translation": 8, "extraction": 8,
    "chat": 16, "instruction": 16, "causal_lm": 16,
    "code": 32, "reasoning": 32, "math": 32,
}
LR_BY_METHOD = {"full": (1e-5, 5e-5, 2e-5), "lora": (5e-5, 2e-4, 1e-4), "qlora": (1e-4, 3e-4, 2e-4)}


@dataclass
class Recommendation:
    key: str  # the YAML key it sets (or a topic)
    value: Any
    reason: str


def method_by_memory(memory: int, n_params: int) -> tuple[str, str]:
    """Full at >= 2× the fp16 model size, LoRA at >= 1×, QLoRA at >= 1/4, else a smaller model/offload."""
    fp16 = 2 * n_params
    ratio = memory / fp16
    sizes = f"{fmt_bytes(memory)} available = {ratio:.2f}× the fp16 model ({fmt_bytes(fp16)})"
    if ratio >= 2:
        return "full", f"{sizes} >= 2×: full fine-tuning fits the table"
    if ratio >= 1:
        return "lora", f"{sizes}: 1–2× -> LoRA on a 16-bit base"
    if ratio >= 0.25:
        return "qlora", f"{sizes}: 1/4–1× -> QLoRA (4-bit base)"
    return "none", f"{sizes} < 1/4: use a smaller model or CPU offloading"


def rank_by_task(task: str | None) -> tuple[int, str]:
    t = (task or "chat").lower()
    r = RANK_BY_TASK.get(t)
    if r is None:
        raise AdviceError(f"task {task!r} is not one of: {', '.join(sorted(RANK_BY_TASK))}")
    return r, (f"task {t}: rank {r} (4 classification, 8 single-domain QA/summarization/translation, 16 chat/"
               "instruction, 32 code/reasoning; 64 only after an ablation shows 32 underfits)")


def dropout_by_examples(examples: int | None) -> tuple[float, str]:
    if examples is None:
        return 0.05, "dataset size unknown: 0.05 (0.1 below 5K examples, 0.0 above 100K)"
    if examples < 5_000:
        return 0.1, f"{examples:,} examples < 5K: dropout 0.1 regularizes a small dataset"
    if examples <= 100_000:
        return 0.05, f"{examples:,} examples in 5K–100K: dropout 0.05"
    return 0.0, f"{examples:,} examples > 100K: no dropout needed"


def target_effective_batch(examples: int | None) -> int:
    if examples is None or examples < 5_000:
        return 16
    return 32 if examples <= 100_000 else 64


def epochs_by_examples(examples: int | None) -> float:
    if examples is None or examples < 5_000:
        return 3
    return 2 if examples <= 100_000 else 1


# --------------------------------------------------------------------------- recommending a run that fits


@dataclass
class Fit:
    """The first setting of a search that fits with 10% headroom or, when none does (`fits` False), the
    one with the least predicted peak; and that peak."""

    trial: RunConfig
    peak: int
    fits: bool

    def setting(self) -> str:
        tc, targets = self.trial.train, self.trial.lora.target_modules
        return (f"micro-batch {tc.micro_batch_size}, {'with' if tc.gradient_checkpointing else 'no'} checkpointing"
                + ("" if self.trial.method == "full" else f", targets {targets}"))


def recommend(config: RunConfig, shape: ModelShape, available: int, dev: str, task: str | None,
              examples: int | None, serving: str, given: bool, seq_len: int | None = None) -> list[Recommendation]:
    """Fill `config` from the decision tables (only the keys a given config leaves to us: none; it is
    predicted as is and the recommendations are advice), then make the memory model agree: the method
    recommended is the first of the table's choice and those below it (full -> lora -> qlora) that the
    memory model says fits, never one it says does not. `seq_len`: the run's widest micro-batch, if known."""
    task_name = task or ("seq_cls" if config.task == "seq_cls" else None)
    r, r_why = rank_by_task(task_name)
    dropout, d_why = dropout_by_examples(examples)
    target_batch = target_effective_batch(examples)
    if not given:
        config.lora = LoraConfig(r=r, alpha=2 * r, dropout=dropout, target_modules="all-linear")
        config.train.epochs = epochs_by_examples(examples)
        config.train.device = dev
        if task_name == "seq_cls":
            config.task = "seq_cls"
    method_rec, fit = _method(config, shape, available, dev, target_batch, seq_len)
    if given:  # the batch that fits the config's own method and targets
        fit = search_fit(config, shape, available, dev, target_batch, [config.method], seq_len, flexible=False)
    batch_recs = _batch_recs(config, fit, available, target_batch, change=not given)  # sets config.method
    lo, hi, pick = LR_BY_METHOD[config.method]
    recs = [method_rec, Recommendation("lora.r", r, r_why),
            Recommendation("lora.alpha", 2 * r, "alpha = 2r: scaling 2 keeps the update's size stable across ranks"),
            Recommendation("lora.dropout", dropout, d_why),
            Recommendation("train.lr", pick, f"{config.method}: {lo:g}–{hi:g} (full 1e-5–5e-5, LoRA 5e-5–2e-4, "
                                             "QLoRA 1e-4–3e-4); higher with small effective batches")]
    if given:
        recs += _check_given(config, r, dropout)
    recs += batch_recs
    recs.append(Recommendation("train.epochs", epochs_by_examples(examples),
                               "3 epochs below 5K examples, 2 up to 100K, 1 above: more overfits small adapters"))
    recs.append(_serving_rec(serving, config.method))
    return recs


def _method(config: RunConfig, shape: ModelShape, available: int, dev: str, target: int,
            seq_len: int | None) -> tuple[Recommendation, Fit]:
    """The table's method if the memory model says it fits, else the first below it that does (full ->
    lora -> qlora); 'none' when not even QLoRA fits. The reason says which and why."""
    table, why = method_by_memory(available, shape.n_params)
    too_big: dict[str, Fit] = {}  # method -> its setting of least memory, which does not fit either
    for method in _methods_from("qlora" if table == "none" else table):
        fit = search_fit(config, shape, available, dev, target, [method], seq_len, flexible=True)
        if not fit.fits:
            too_big[method] = fit
            continue
        fits = f"predicted peak {fmt_bytes(fit.peak)} fits {fmt_bytes(available)} with 10% headroom"
        if method == table:
            return Recommendation("method", method, f"{why}; {fits}"), fit
        if too_big:
            but = f"{_too_big(too_big, available)}; {method} is the first below that fits"
        else:  # the table said none, yet QLoRA fits
            but = f"{method} fits all the same"
        return Recommendation("method", method, f"the table: {why}. But {but} ({fits})"), fit
    reason = (f"the table: {why}. But nothing fits: {_too_big(too_big, available)}. Use a smaller model, a "
              "shorter data.max_seq_len or a machine with more memory")
    return Recommendation("method", "none", reason), too_big["qlora"]


def _too_big(least: dict[str, Fit], available: int) -> str:
    needs = ", ".join(f"{m} needs at least {fmt_bytes(f.peak)} ({f.setting()})" for m, f in least.items())
    return f"{needs} > 90% of {fmt_bytes(available)}"


def _check_given(config: RunConfig, r: int, dropout: float) -> list[Recommendation]:
    out = []
    lo, hi, _ = LR_BY_METHOD[config.method]
    if not lo <= config.train.lr <= hi:
        out.append(Recommendation("train.lr (yours)", config.train.lr, f"outside {lo:g}–{hi:g} for {config.method}"))
    if config.method != "full" and config.lora.alpha != 2 * config.lora.r:
        out.append(Recommendation("lora.alpha (yours)", config.lora.alpha, f"alpha = 2r = {2 * config.lora.r} is the usual choice"))
    return out


def search_fit(config: RunConfig, shape: ModelShape, available: int, dev: str, target: int, methods: list[str],
               seq_len: int | None = None, flexible: bool = True) -> Fit:
    """The first setting that fits with 10% headroom, in order of preference: per method, all-linear ->
    attention -> minimal targets (`flexible`; else the config's), then without -> with checkpointing,
    then the largest micro-batch (≤ target, accumulating to it). Each prediction is a full memory_model."""
    budget, least = 0.9 * available, None  # least: Fit | None, the setting of least memory so far
    trial = copy.deepcopy(config)
    for method in methods:
        trial.method = method
        steps = ("all-linear", "attention", "minimal") if flexible and method != "full" else (config.lora.target_modules,)
        for targets in steps:
            trial.lora.target_modules = targets
            for gc in (False, True):
                trial.train.gradient_checkpointing = gc
                for micro in (m for m in (16, 8, 4, 2, 1) if m <= target):
                    trial.train.micro_batch_size, trial.train.grad_accum = micro, max(1, target // micro)
                    peak = memory_model(resolve_workload(trial, shape, dev, seq_len=seq_len), shape).peak_bytes
                    if peak <= budget:
                        return Fit(trial, peak, True)
                    if least is None or peak < least.peak:
                        least = Fit(copy.deepcopy(trial), peak, False)
    assert least is not None, "no setting was tried"
    return least


def _methods_from(method: str) -> list[str]:
    order = ["full", "lora", "qlora"]
    return order[order.index(method):]


def _batch_recs(config: RunConfig, fit: Fit, available: int, target: int, change: bool) -> list[Recommendation]:
    """The fitting setting's batch, checkpointing and targets, written into `config` when `change` (when
    nothing fits: the setting of least memory, so that the prediction shows how far off it is)."""
    if change:
        _apply(config, fit.trial)
    if not fit.fits:
        return [Recommendation("fit", None, f"nothing fits {fmt_bytes(available)}: the least memory {fit.trial.method} "
                                            f"takes is {fmt_bytes(fit.peak)} ({fit.setting()}) at seq "
                                            f"{config.data.max_seq_len}; shorten data.max_seq_len, use a smaller model "
                                            "or a machine with more memory")]
    tc = fit.trial.train
    fits = f"predicted peak {fmt_bytes(fit.peak)} of {fmt_bytes(available)}"
    recs = [
        Recommendation("train.micro_batch_size", tc.micro_batch_size, f"the largest that fits with 10% headroom ({fits})"),
        Recommendation("train.grad_accum", tc.grad_accum,
                       f"effective batch {tc.micro_batch_size * tc.grad_accum} (16 below 5K examples, 32 to 100K, 64 above)"),
        Recommendation("train.gradient_checkpointing", tc.gradient_checkpointing,
                       "needed to fit" if tc.gradient_checkpointing else "fits without: ~25–35% faster steps"),
    ]
    if fit.trial.method != "full":
        recs.append(Recommendation("lora.target_modules", fit.trial.lora.target_modules,
                                   "all-linear trains best (QLoRA paper); attention/minimal only to save memory"))
    return recs


def _apply(config: RunConfig, trial: RunConfig) -> None:
    config.method = trial.method
    config.lora.target_modules = trial.lora.target_modules
    config.train.micro_batch_size, config.train.grad_accum = trial.train.micro_batch_size, trial.train.grad_accum
    config.train.gradient_checkpointing = trial.train.gradient_checkpointing
    config.train.lr = LR_BY_METHOD[trial.method][2]


def _serving_rec(serving: str, method: str) -> Recommendation:
    if serving == "multi":
        return Recommendation("serving", "multi", "keep adapters separate (one base, many adapters batched per row); "
                                                  "use one rank and target set for all of them")
    merged = " (QLoRA merges into a full-precision base: plan 2 B/weight to serve)" if method == "qlora" else ""
    return Recommendation("serving", "single", f"merge the adapter into the base for zero adapter overhead{merged}")
