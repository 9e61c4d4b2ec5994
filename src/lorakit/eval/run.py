"""Scoring a model: token-weighted loss and perplexity, classifier metrics, generations, canary -- with the
adapter (tuned) and inside `adapters_disabled` (base) on the same rows; `evaluate_run` does a whole run's eval.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import read_chat_template
from lorakit.data import check_num_labels, collate, prepare_data, read_rows_only, training_rows
from lorakit.errors import ConfigError, DataError
from lorakit.eval.canary import canary_check, canary_rows, completion_batches, option_accuracy
from lorakit.eval.judge import Judge
from lorakit.eval.metrics import accuracy, macro_f1, score_generations
from lorakit.eval.prompts import (
    EvalSettings,
    PromptSet,
    load_schema,
    prompts_from_examples,
    prompts_from_rows,
)
from lorakit.eval.report import EvalReport
from lorakit.generate import generate, model_device
from lorakit.heads import label_names
from lorakit.lora import adapters_disabled, lora_layers
from lorakit.loss import loss_sum, supervised_tokens
from lorakit.models import load_base
from lorakit.runtime.devices import pick_device, pick_dtype


@torch.no_grad()
def eval_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted loss and perplexity over `batches` (the data pipeline's collate output).

    Only two numbers are accumulated, so memory stays bounded however long the eval set is. The model
    may be in train mode (the training loop calls this): it is switched to eval and back.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            total, count = total + float(loss_sum(model, batch)), count + supervised_tokens(batch)
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("eval_loss: the batches hold no supervised tokens (every label is -100); check the eval data")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


@torch.no_grad()
def eval_classifier(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss, accuracy and macro F1 of a sequence-classification model; batches carry (B,) class labels."""
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    gold: list[int] = []
    total = 0.0
    try:
        for batch in batches:
            device = model_device(model)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}  # (B, T) masks only
            logits = model(**inputs).logits  # (B, C)
            labels = batch["labels"].to(device)
            total += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            predictions += logits.argmax(-1).tolist()
            gold += labels.tolist()
    finally:
        model.train(was_training)
    return {"eval_loss": total / len(gold), "accuracy": accuracy(predictions, gold), "macro_f1": macro_f1(predictions, gold)}


def _loss_scores(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: str) -> dict[str, float]:
    if task == "seq_cls":
        return eval_classifier(model, batches)
    result = eval_loss(model, batches)
    return {"eval_loss": result["loss"], "perplexity": result["perplexity"]}


def score_model(
    model: nn.Module, tokenizer: Any, settings: EvalSettings, loss_batches: Callable[[], Iterable[dict]] | None,
    prompts: PromptSet | None, canary: Sequence[dict[str, str]] | None, task: str = "causal_lm",
    judge: Judge | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Every metric for the model as it is now (adapters on or off); returns (scores, generations). With a
    `judge`, judge_score and judge_failures too (eval/judge.py)."""
    scores: dict[str, float] = {}
    outputs: list[str] = []
    if loss_batches is not None:
        scores |= _loss_scores(model, loss_batches(), task)
    if prompts is not None and prompts.prompt_ids:
        outputs = generate(model, tokenizer, prompts.prompt_ids, settings.generation, settings.batch_size)
        scores |= score_generations(outputs, prompts.references, load_schema(settings.schema), prompts.labels, settings.label_key)
        if judge is not None:
            texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts.prompt_ids]
            scores |= judge(texts, outputs, prompts.references)
    if canary:
        result = eval_loss(model, completion_batches(tokenizer, canary, settings.batch_size))
        scores |= {"canary_loss": result["loss"], "canary_perplexity": result["perplexity"]}
        mc = option_accuracy(model, tokenizer, canary, settings.batch_size)
        if mc is not None:
            scores["canary_accuracy"] = mc
    return scores, outputs


def run_eval(
    model: nn.Module, tokenizer: Any, settings: EvalSettings | None = None, *,
    loss_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
    prompts: PromptSet | None = None, canary: Sequence[dict[str, str]] | None = None, task: str = "causal_lm",
    judge: Judge | None = None,
) -> EvalReport:
    """Score the model with its adapter (tuned) and inside `adapters_disabled` (base), same examples.

    `loss_batches` is a factory (called once per model) so the eval set is streamed twice, never held
    as logits. A model without LoRA layers is scored once, as the base.
    """
    settings = settings or EvalSettings()
    if prompts is not None:
        prompts = PromptSet(prompts.prompt_ids[: settings.max_prompts], prompts.references[: settings.max_prompts],
                            prompts.labels[: settings.max_prompts] if prompts.labels else None)
    tuned = tuned_out = None
    if any(True for _ in lora_layers(model)):
        tuned, tuned_out = score_model(model, tokenizer, settings, loss_batches, prompts, canary, task, judge)
    with adapters_disabled(model):
        base, base_out = score_model(model, tokenizer, settings, loss_batches, prompts, canary, task, judge)
    result = None
    if tuned is not None and "canary_loss" in base:
        result = canary_check(base["canary_loss"], tuned["canary_loss"], settings.canary_max_increase)
    samples = _samples(tokenizer, prompts, base_out, tuned_out, settings.samples)
    return EvalReport(base, tuned, result, samples, asdict(settings))


def _samples(tokenizer: Any, prompts: PromptSet | None, base: list[str], tuned: list[str] | None, n: int) -> list[dict[str, str]]:
    if prompts is None or not base:
        return []
    out = []
    for i in range(min(n, len(base))):
        row = {"prompt": tokenizer.decode(prompts.prompt_ids[i]), "reference": prompts.references[i], "base": base[i]}
        if tuned:
            row["tuned"] = tuned[i]
        out.append(row)
    return out


def load_for_eval(config: Any, adapter_dir: Path | None) -> tuple[nn.Module, Any]:
    """The base as trained (NF4-quantized for qlora) with the adapter loaded, and its tokenizer."""
    device = pick_device(config.train.device)
    dtype = pick_dtype(config.train.dtype, device)
    return load_base(config.base_model, task=config.task, dtype=dtype, device=device, revision=config.revision,
                     num_labels=config.num_labels, quant=config.quant if config.method == "qlora" else None,
                     adapter=adapter_dir)


def _loss_batch_factory(config: Any, examples: list[Any], tokenizer: Any) -> Callable[[], Iterator[dict]]:
    """Batches built as the training loop builds its eval batches (same packing, same collate)."""
    rows = training_rows(examples, config.data.packing, config.task, config.data.max_seq_len)
    size, pad = config.eval_batch_rows(), tokenizer.pad_token_id

    def batches() -> Iterator[dict]:
        for i in range(0, len(rows), size):
            yield collate(rows[i : i + size], pad, config.data.packing, config.data.max_seq_len)

    return batches


def evaluate_run(
    config: Any, adapter_dir: str | Path | None, out_dir: str | Path, *, model: nn.Module | None = None,
    tokenizer: Any = None, settings: EvalSettings | None = None, progress: bool = True,
) -> EvalReport:
    """`lorakit eval`: base vs tuned on the run's eval split, prompts and canary; writes out_dir/eval.*.

    Pass `model`/`tokenizer` (the trained model, adapter attached) to skip loading; otherwise the base
    is loaded as in training and `adapter_dir` attached. Chat prompts use the adapter's saved template.
    With eval.judge, the judge's requests and replies are saved beside the report (out_dir/judge.jsonl).
    """
    settings = settings or config.eval
    problems = settings.problems()
    if problems:
        raise ConfigError(problems)
    if model is None:
        model, tokenizer = load_for_eval(config, Path(adapter_dir) if adapter_dir else None)
    elif tokenizer is None:
        raise ValueError("evaluate_run: pass the tokenizer together with the model")
    data = _eval_data(config, model, tokenizer)
    prompts, canary = None, None
    if config.task == "causal_lm":  # a classifier head has no text to generate and no LM loss to canary
        prompts, canary = _prompts(settings, data, tokenizer, read_chat_template(adapter_dir)), canary_rows(settings)
    if progress:
        n_prompts = min(len(prompts.prompt_ids), settings.max_prompts) if prompts else 0
        print(f"eval: {len(data.eval)} eval examples, {n_prompts} prompts, canary {len(canary or [])}", file=sys.stderr)
    loss_batches = _loss_batch_factory(config, data.eval, tokenizer) if data.eval else None
    judge = Judge(settings.judge, out_dir) if settings.judge.base_url and config.task == "causal_lm" else None
    report = run_eval(model, tokenizer, settings, loss_batches=loss_batches, prompts=prompts, canary=canary,
                      task=config.task, judge=judge)
    report.save(out_dir)
    return report


def _eval_data(config: Any, model: nn.Module, tokenizer: Any) -> Any:
    """The run's data; for a classifier, class names mapped to ids as the model's head was trained
    (its id2label, from the adapter), and every id checked against the head's outputs."""
    if config.task != "seq_cls":
        return prepare_data(config.data, tokenizer, config.task, config.train.micro_batch_size)
    data = prepare_data(config.data, tokenizer, config.task, config.train.micro_batch_size, label_names(model))
    check_num_labels(data, model.config.num_labels, f"the head of {type(model).__name__} (num_labels)",
                     "evaluate on data with the classes the adapter was trained on")
    return data


def _prompts(settings: EvalSettings, data: Any, tokenizer: Any, template: str | None) -> PromptSet:
    """The settings' prompt file (rendered with the training template), else the eval split itself."""
    if settings.prompts:
        return prompts_from_rows(read_rows_only(settings.prompts), tokenizer, template or getattr(data, "chat_template", None))
    return prompts_from_examples(data.eval, tokenizer)
