"""The forgetting canary: base vs tuned loss on general text the task never trained on.

    increase = ppl_tuned / ppl_base - 1 = exp(L_tuned - L_base) - 1,  `degraded` when above the threshold
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.data import read_rows_only
from lorakit.eval.prompts import EvalSettings
from lorakit.generate import encode_prompts

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


def canary_rows(settings: EvalSettings) -> list[dict[str, str]] | None:
    """The forgetting canary: `eval.canary` a file of {"prompt", "completion"} rows, `builtin` the general
    sentences above, null none."""
    if settings.canary is None:
        return None
    if settings.canary != "builtin":
        return read_rows_only(settings.canary)
    return [{"prompt": p, "completion": c} for p, c in GENERAL_CANARY]
