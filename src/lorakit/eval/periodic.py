"""Task metrics and the forgetting canary at every periodic eval during training (`eval.every_eval`).

Eval loss alone says little about whether the task is learned or the model's general ability is being spent;
so at each eval, besides the loss, `PeriodicEval.measure(model)` returns

    task metrics    greedy answers to a fixed, seeded subset of `eval.during_training_prompts` eval prompts,
                    scored as `lorakit eval` scores them (exact match, JSON validity, accuracy, ...; a classifier
                    head: accuracy and macro F1 over the eval rows)
    canary_loss     token-weighted loss of the canary's completions (+ canary_accuracy over its multiple-choice rows)
    canary_change   exp(L_canary(now) - L_canary(base)) - 1, the perplexity rise over the base; the base's
                    loss is computed once (adapters disabled) and cached
    judge_score     with eval.judge: the judge's mean score of the answers, rescaled to [0, 1]
    eval_time_s     seconds this took

Bounded: the subset is fixed, so each eval decodes at most prompts × generation.max_new_tokens tokens in
batches of eval.batch_size rows, and the canary is one forward over its rows.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.config import EVERY_EVAL_METRICS, EvalConfig, RunConfig
from lorakit.data import read_rows_only
from lorakit.errors import ConfigError
from lorakit.eval.canary import canary_rows, completion_batches, option_accuracy
from lorakit.eval.judge import Judge
from lorakit.eval.metrics import parse_json, score_generations
from lorakit.eval.prompts import PromptSet, load_schema, prompts_from_examples, prompts_from_rows
from lorakit.eval.run import eval_classifier, eval_loss
from lorakit.generate import generate
from lorakit.lora import adapters_disabled, lora_layers

JudgeFn = Callable[[list[str], list[str], list[str]], dict[str, float]]
"""(prompts, answers, references) -> {"judge_score": mean in [0, 1], "judge_failures": count}: a `Judge`."""


def prompt_subset(prompts: PromptSet, n: int, seed: int) -> PromptSet:
    """A fixed subset of n prompts, drawn by `seed` and kept in file order (the same at every eval and resume)."""
    if n >= len(prompts.prompt_ids):
        return prompts
    keep = sorted(random.Random(seed).sample(range(len(prompts.prompt_ids)), n))
    labels = [prompts.labels[i] for i in keep] if prompts.labels else None
    return PromptSet([prompts.prompt_ids[i] for i in keep], [prompts.references[i] for i in keep], labels)


def generation_metrics(settings: EvalConfig, prompts: PromptSet | None, task: str) -> set[str]:
    """The metrics this task's outputs can produce (what `score_generations` reports for these prompts)."""
    if task == "seq_cls":
        return {"accuracy", "macro_f1"}
    if prompts is None or not prompts.prompt_ids:
        return set()
    out = {"exact_match", "token_f1", "rouge_l"}
    if settings.schema is not None or all(isinstance(parse_json(r), (dict, list)) for r in prompts.references):
        out.add("json_valid")
    if settings.schema is not None:
        out.add("schema_valid")
    if prompts.labels is not None or settings.label_key is not None:
        out |= {"accuracy", "macro_f1"}
    if settings.judge.base_url is not None and settings.judge.during_training:
        out.add("judge_score")
    return out


def requested_metrics(config: RunConfig) -> list[str]:
    """Task metrics the run asked for by name: eval.every_eval's list and train.select_best.metric."""
    every, metric = config.eval.every_eval, config.train.select_best.metric
    named = (every if isinstance(every, list) else []) + ([metric] if metric in EVERY_EVAL_METRICS else [])
    return list(dict.fromkeys(named))


def output_problems(config: RunConfig) -> list[str]:
    """Named metrics that need labels or a schema the run does not have (cheap: reads no weights and no data
    beyond eval.prompts). Run after the entry point filled in the task's eval settings."""
    settings, out = config.eval, []
    if config.task == "seq_cls":
        return out
    labels = bool(settings.label_key)
    if not labels and settings.prompts:
        rows = read_rows_only(settings.prompts)
        labels = bool(rows) and all("label" in r for r in rows)
    for metric in requested_metrics(config):
        if metric in ("accuracy", "macro_f1") and not labels:
            out.append(f"{metric} needs labels: set eval.label_key (the JSON key of the class in answers and "
                       f"references) or give eval.prompts rows a \"label\"")
        if metric == "schema_valid" and settings.schema is None:
            out.append("schema_valid needs eval.schema (a JSON schema file or mapping)")
    return out


class PeriodicEval:
    """Measures a model during training; see the module docstring. One instance per run (it caches the base canary)."""

    def __init__(self, settings: EvalConfig, tokenizer: Any, task: str, prompts: PromptSet | None,
                 canary: Sequence[dict[str, str]] | None, wanted: Sequence[str] | None = None, judge: JudgeFn | None = None):
        self.settings, self.tokenizer, self.task = settings, tokenizer, task
        self.prompts, self.canary, self.judge = prompts, list(canary) if canary else None, judge
        self.wanted = set(wanted) if wanted is not None else None
        self.schema = load_schema(settings.schema)
        self.base_canary_loss: float | None = None

    def canary_loss(self, model: nn.Module) -> float | None:
        if not self.canary:
            return None
        batches = completion_batches(self.tokenizer, self.canary, self.settings.batch_size)
        return eval_loss(model, batches)["loss"]

    def measure_base(self, model: nn.Module) -> float | None:
        """The base's canary loss, once: adapters disabled (a model without adapters is taken as it is: call
        this before the first step of full fine-tuning)."""
        if self.base_canary_loss is None and self.canary:
            if any(True for _ in lora_layers(model)):
                with adapters_disabled(model):
                    self.base_canary_loss = self.canary_loss(model)
            else:
                self.base_canary_loss = self.canary_loss(model)
        return self.base_canary_loss

    @torch.no_grad()
    def measure(self, model: nn.Module, classifier_batches: Callable[[], Iterable[dict]] | None = None) -> dict[str, float]:
        """Task metrics, canary and seconds spent, for the model as it is now (mode restored afterwards)."""
        start = time.perf_counter()
        scores: dict[str, float] = {}
        if self.task == "seq_cls":
            if classifier_batches is not None:
                found = eval_classifier(model, classifier_batches())
                scores |= {k: found[k] for k in ("accuracy", "macro_f1")}
        elif self.prompts is not None and self.prompts.prompt_ids:
            scores |= self._generate_and_score(model)
        if self.wanted is not None:
            scores = {k: v for k, v in scores.items() if k in self.wanted or k == "judge_failures"}
        loss = self.canary_loss(model)
        if loss is not None:
            scores["canary_loss"] = loss
            mc = option_accuracy(model, self.tokenizer, self.canary, self.settings.batch_size)
            if mc is not None:
                scores["canary_accuracy"] = mc
            base = self.measure_base(model)
            if base is not None:
                scores["canary_change"] = _change(loss, base)
        scores["eval_time_s"] = round(time.perf_counter() - start, 3)
        return scores

    def _generate_and_score(self, model: nn.Module) -> dict[str, float]:
        p, s = self.prompts, self.settings
        answers = generate(model, self.tokenizer, p.prompt_ids, s.generation, s.batch_size)
        scores = score_generations(answers, p.references, self.schema, p.labels, s.label_key)
        if self.judge is not None and (self.wanted is None or "judge_score" in self.wanted):
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in p.prompt_ids]
            scores |= self.judge(texts, answers, p.references)
        return scores


def _change(loss: float, base: float) -> float:
    """Canary perplexity rise over the base: ppl / ppl_base - 1 = exp(L - L_base) - 1."""
    return math.exp(min(loss - base, 700.0)) - 1


def build_periodic_eval(config: RunConfig, data: Any, tokenizer: Any) -> PeriodicEval | None:
    """The run's PeriodicEval (None when eval.every_eval is off); a ConfigError names any requested metric that
    these prompts cannot produce (e.g. json_valid when the references are not JSON and there is no schema).
    With eval.judge (and judge.during_training) the judge's requests go to output_dir/judge.jsonl."""
    settings = config.eval
    if settings.every_eval is False:
        return None
    prompts = None
    if config.task == "causal_lm":
        if settings.prompts:
            template = getattr(data, "chat_template", None)
            prompts = prompts_from_rows(read_rows_only(settings.prompts), tokenizer, template)
        elif data.eval:
            prompts = prompts_from_examples(data.eval, tokenizer)
        if prompts is not None:
            prompts = prompt_subset(prompts, settings.during_training_prompts, config.train.seed)
    produced = generation_metrics(settings, prompts, config.task)
    missing = [m for m in requested_metrics(config) if m not in produced]
    if missing:
        why = "no eval prompts" if not produced else f"these eval prompts produce {', '.join(sorted(produced))}"
        raise ConfigError([f"{m} cannot be measured during training: {why}" for m in missing])
    canary = canary_rows(settings) if config.task == "causal_lm" else None
    wanted = settings.every_eval if isinstance(settings.every_eval, list) else None
    if wanted is not None and config.train.select_best.metric in EVERY_EVAL_METRICS:
        wanted = [*wanted, config.train.select_best.metric]
    judge = None
    if settings.judge.base_url and settings.judge.during_training and config.task == "causal_lm":
        judge = Judge(settings.judge, config.output_dir)
    return PeriodicEval(settings, tokenizer, config.task, prompts, canary, wanted, judge)
