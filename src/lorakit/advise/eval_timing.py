"""Time of the evals during training: the eval loss, and with eval.every_eval the generation and the canary.

Per eval, with P the matmul weights (decoder linears + head), b the compute dtype's bytes:

    loss        one forward over the eval rows in batches of RunConfig.eval_batch_rows: 2·P FLOPs per token
                (+ dequantizing every 4-bit weight per batch)
    generation  ⌈n/B⌉ batches of B = eval.batch_size of the n = eval.during_training_prompts prompts (L tokens each):
                a prefill of B·L tokens, then G = generation.max_new_tokens decode steps of B tokens. A decode step
                reads every weight once and does little arithmetic with it, so it costs
                    max(2·P·B / rate(B), weight bytes / bandwidth) + dispatch (+ QLoRA: dequantize every weight)
    canary      one forward over its rows (~24 tokens each)

G is an upper bound (answers that end early stop their row; the batch runs until its longest answer ends).
Evals happen every train.eval_every steps and at each epoch end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lorakit.advise.shapes import ModelShape
from lorakit.advise.timing import matmul_rate
from lorakit.advise.workload import Workload
from lorakit.config import RunConfig

CANARY_TOKENS = 24  # prompt + completion tokens of a canary row
OPS_PER_LAYER_FORWARD = 30  # small ops of one decoder layer's forward (norms, RoPE, reshapes, adds)


@dataclass
class EvalTime:
    """Seconds of one eval, by part, and how many evals the run holds."""

    parts: dict[str, float]
    evals: int | None

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    @property
    def total_s(self) -> float | None:
        return None if self.evals is None else self.evals * self.seconds


def forward_s(w: Workload, shape: ModelShape, rates: dict[str, Any], tokens: int, rows: int, context: int) -> float:
    """Seconds of one no-grad forward of `rows` rows, `tokens` new tokens in all, attending over `context`."""
    flops = 2 * tokens * shape.matmul_params + 4 * tokens * context * shape.q_dim * shape.layers
    compute = flops / matmul_rate(rates, max(1, min(tokens, shape.hidden)))
    weight_bytes = shape.matmul_params * (0.5 if w.method == "qlora" else w.compute_bytes)
    memory = weight_bytes / rates["bandwidth"]
    ops = shape.layers * (OPS_PER_LAYER_FORWARD + 5 * len(w.lora_targets)) * rates["op_s"]
    dequant = shape.layers * shape.layer_linear_params * rates["dequant_s"] if w.method == "qlora" else 0.0
    return max(compute, memory) + ops + dequant


def eval_time(config: RunConfig, w: Workload, shape: ModelShape, rates: dict[str, Any], eval_rows: int | None,
              prompt_tokens: int | None, total_steps: int | None, steps_per_epoch: int | None,
              canary_rows: int = 32) -> EvalTime:
    """One eval's seconds by part (see the module docstring) and the number of evals in the run."""
    ec = config.eval
    parts: dict[str, float] = {"loss": 0.0}
    if eval_rows:
        rows = min(eval_rows, config.eval_batch_rows())  # RunConfig.eval_batch_rows: more rows than a micro-batch
        batches = math.ceil(eval_rows / rows)
        parts["loss"] = batches * forward_s(w, shape, rates, rows * w.seq_len, rows, w.seq_len)
    if ec.every_eval is not False:
        parts["generation"] = 0.0
        if config.task == "causal_lm":
            parts["generation"] = generation_s(w, shape, rates, ec.during_training_prompts, ec.batch_size,
                                               prompt_tokens or w.seq_len // 2, ec.generation.max_new_tokens)
        if ec.canary is not None and config.task == "causal_lm":
            batches = math.ceil(canary_rows / ec.batch_size)
            rows = min(canary_rows, ec.batch_size)
            parts["canary"] = batches * forward_s(w, shape, rates, rows * CANARY_TOKENS, rows, CANARY_TOKENS)
    return EvalTime(parts, eval_count(total_steps, config.train.eval_every, steps_per_epoch))


def generation_s(w: Workload, shape: ModelShape, rates: dict[str, Any], prompts: int, batch: int, prompt_tokens: int,
                 new_tokens: int) -> float:
    """Greedy decoding of `prompts` prompts in batches: prefill, then `new_tokens` single-token steps per batch."""
    total = 0.0
    for start in range(0, prompts, batch):
        rows = min(batch, prompts - start)
        total += forward_s(w, shape, rates, rows * prompt_tokens, rows, prompt_tokens)
        total += new_tokens * forward_s(w, shape, rates, rows, rows, prompt_tokens + new_tokens // 2)
    return total


def eval_count(total_steps: int | None, eval_every: int | None, steps_per_epoch: int | None) -> int | None:
    """Evals of a run: every `eval_every` steps, at each epoch end and at the last step (each step once)."""
    if total_steps is None:
        return None
    steps = {total_steps}
    if eval_every:
        steps |= set(range(eval_every, total_steps + 1, eval_every))
    if steps_per_epoch:
        steps |= set(range(steps_per_epoch, total_steps + 1, steps_per_epoch))
    return len(steps)
