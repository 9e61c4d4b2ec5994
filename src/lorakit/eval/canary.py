"""The forgetting canary: base vs tuned loss on general text the task never trained on.

    increase = ppl_tuned / ppl_base - 1 = exp(L_tuned - L_base) - 1,  `degraded` when above the threshold

Rows are open ({"prompt", "completion"}: the loss of the completion) or multiple choice ({"prompt",
"options": [...], "answer": index or option text}, an MMLU-style slice the user brings). A multiple-choice
row counts in the loss with its correct option as the completion, and is also answered by likelihood, as
lm-eval-harness's `acc` does: the option whose tokens have the highest summed log-probability given the prompt,

    choice = argmax_o Σ_t log p(o_t | prompt, o_<t)          canary_accuracy = share of rows chosen right
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.data import read_rows_only
from lorakit.errors import DataError
from lorakit.eval.prompts import EvalSettings
from lorakit.generate import encode_prompts, model_device

GENERAL_CANARY: tuple[tuple[str, str], ...] = (
    ("The capital of France is", " Paris."),
    ("Water freezes at zero degrees", " Celsius."),
    ("The sun rises in the", " east and sets in the west."),
    ("One, two, three, four,", " five, six, seven."),
    ("Monday, Tuesday, Wednesday,", " Thursday, Friday."),
    ("The opposite of hot is", " cold."),
    ("A week has seven days and a year has twelve", " months."),
    ("Cats and dogs are popular", " pets."),
    ("To be or not to be, that is the", " question."),
    ("The largest ocean on Earth is the", " Pacific Ocean."),
    ("She opened the door and walked into the", " room."),
    ("Please close the window because it is", " cold outside."),
    ("def add(a, b):\n    return", " a + b"),
    ("Two plus two equals", " four."),
    ("The chemical symbol for gold is", " Au."),
    ("Thank you very much for your", " help."),
)


@dataclass
class CanaryResult:
    """Base vs tuned loss on general text; `degraded` when perplexity rose more than `threshold`."""

    base_loss: float
    tuned_loss: float
    base_perplexity: float
    tuned_perplexity: float
    increase: float
    threshold: float
    degraded: bool

    def message(self) -> str:
        verdict = "FORGETTING: " if self.degraded else "ok: "
        return (f"{verdict}canary perplexity {self.base_perplexity:.3f} -> {self.tuned_perplexity:.3f} "
                f"({self.increase:+.1%}; threshold +{self.threshold:.0%})")


def canary_check(base_loss: float, tuned_loss: float, max_increase: float = 0.10) -> CanaryResult:
    """Compare canary losses. increase = ppl_tuned / ppl_base - 1 = exp(L_tuned - L_base) - 1."""
    increase = math.exp(tuned_loss - base_loss) - 1
    return CanaryResult(base_loss, tuned_loss, math.exp(min(base_loss, 700.0)), math.exp(min(tuned_loss, 700.0)),
                        increase, max_increase, increase > max_increase)


def completion_batches(
    tokenizer: Any, rows: Sequence[dict[str, str]], batch_size: int = 8, max_len: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """{"prompt", "completion"} rows -> right-padded batches with the loss on completion tokens only.

    Prompt and completion are tokenized separately (as lm-eval-harness does), so the boundary is exact.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = encode_prompts(tokenizer, [r["prompt"] for r in chunk])
        pairs = []
        for prompt, row in zip(prompts, chunk, strict=True):
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids, labels = prompt + completion, [-100] * len(prompt) + completion
            pairs.append((ids[-max_len:], labels[-max_len:]) if max_len else (ids, labels))
        width = max(len(ids) for ids, _ in pairs)
        yield {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in pairs]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs]),
        }


def canary_rows(settings: EvalSettings) -> list[dict[str, Any]] | None:
    """The forgetting canary: `eval.canary` a file of open {"prompt", "completion"} or multiple-choice
    {"prompt", "options", "answer"} rows, `builtin` the general sentences above, null none. Every row gets a
    "completion" (a multiple-choice row: its correct option), so the loss reads them all alike."""
    if settings.canary is None:
        return None
    if settings.canary != "builtin":
        return [_checked_row(row, i, settings.canary) for i, row in enumerate(read_rows_only(settings.canary))]
    return [{"prompt": p, "completion": c} for p, c in GENERAL_CANARY]


def _checked_row(row: dict[str, Any], i: int, source: str) -> dict[str, Any]:
    if not isinstance(row.get("prompt"), str):
        raise DataError(f"eval.canary {source} row {i}: needs a \"prompt\" string; fields: {sorted(row)}")
    if "options" not in row:
        if not isinstance(row.get("completion"), str):
            raise DataError(f"eval.canary {source} row {i}: an open row needs a \"completion\", a multiple-choice "
                            f"row \"options\" and \"answer\"; fields: {sorted(row)}")
        return row
    options, answer = row["options"], row.get("answer")
    if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) and o for o in options)):
        raise DataError(f"eval.canary {source} row {i}: \"options\" must be a list of >= 2 strings, got {options!r}")
    index = options.index(answer) if isinstance(answer, str) and answer in options else answer
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(options):
        raise DataError(f"eval.canary {source} row {i}: \"answer\" must be an option's index (0..{len(options) - 1}) "
                        f"or its text, got {answer!r}")
    return {**row, "answer": index, "completion": options[index]}


@torch.no_grad()
def completion_logprobs(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]], batch_size: int = 8) -> list[float]:
    """Σ_t log p(completion_t | prompt, completion_<t) for each {"prompt", "completion"} row (float64 sums)."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for batch in completion_batches(tokenizer, rows, batch_size):
            device = model_device(model)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"][:, 1:].to(device)  # (B, T-1): token t+1 is predicted at position t
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # (B, T-1, V)
            picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
            out += (picked * (labels != -100)).sum(-1).tolist()
    finally:
        model.train(was_training)
    return out


def option_accuracy(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8) -> float | None:
    """Share of multiple-choice rows whose most likely option is the answer; None when there are none."""
    questions = [r for r in rows if "options" in r]
    if not questions:
        return None
    pairs = [{"prompt": q["prompt"], "completion": o} for q in questions for o in q["options"]]
    scores = iter(completion_logprobs(model, tokenizer, pairs, batch_size))
    right = 0
    for q in questions:
        per_option = [next(scores) for _ in q["options"]]
        right += per_option.index(max(per_option)) == q["answer"]
    return right / len(questions)
