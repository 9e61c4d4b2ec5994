"""The training loop: one function for LoRA, QLoRA and full fine-tuning (the method is config).

Loss over an optimizer step of K micro-batches is weighted by supervised tokens, not a mean of means:

    L = Σ_k Σ_{t ∈ supervised(k)} ce_t / N,     N = Σ_k |supervised(k)|

so a micro-batch of 10 answer tokens counts 10×, not the same as one of 1000. Each micro-batch's
backward uses its share Σ_t ce_t / N, which sums to exactly ∇L (equal to one big batch).

The data order is a pure function of (seed, epoch), and a checkpoint stores the trainable weights,
optimizer and schedule, RNG states and the count of micro-batches consumed; resuming therefore
continues bit-for-bit (on CPU in fp32) as if the run had never stopped.

Under torchrun the same loop runs on W ranks (lorakit.runtime.distributed): each optimizer step takes K·W
micro-batches of the one data order, rank r the r-th block of K, N is all-reduced before backward, and
the losses equal those of one process with grad_accum K·W. Rank 0 alone logs and writes files.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.config import RunConfig, to_dict
from lorakit.data import collate, training_rows
from lorakit.errors import TrainingError
from lorakit.eval.periodic import build_periodic_eval
from lorakit.loss import loss_sum, supervised_tokens
from lorakit.runtime.atomic import atomic_directory, atomic_file
from lorakit.runtime.checkpoint import (
    RunState,
    load_checkpoint,
    load_trainable_state,
    newest_checkpoint,
    save_checkpoint,
    trainable_state,
)
from lorakit.runtime.distributed import (
    all_reduce_sum,
    broadcast,
    full_tensor,
    grad_sync,
    is_lost_rank,
    is_main,
    lost_rank_message,
    my_share,
    rank,
    reshard,
    sharded,
    world_size,
)
from lorakit.runtime.interrupt import StopRequest
from lorakit.train.loggers import Reporters, open_reporters
from lorakit.train.select import Selection
from lorakit.train.setup import BatchPlan, build_optimizer, build_scheduler, total_steps

log = logging.getLogger(__name__)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Loop:
    """State of one run; `run()` reads as the list of what happens each optimizer step.

    `model` is the plain model (names, saving, eval); `wrapped` is what forward/backward go through: a DDP
    wrapper, the FSDP2-sharded model itself, or (one process) the model."""

    def __init__(self, config: RunConfig, model: nn.Module, tokenizer: Any, data: Any, device: torch.device,
                 run_dir: Path, progress: bool, wrapped: nn.Module | None = None):
        self.config, self.model, self.tokenizer, self.data = config, model, tokenizer, data
        self.device, self.run_dir, self.progress = device, run_dir, progress
        self.wrapped = wrapped if wrapped is not None else model
        self.rank, self.world = rank(), world_size()
        self.collate = lambda rows: collate(rows, tokenizer.pad_token_id, config.data.packing, config.data.max_seq_len)
        dc = config.data
        self.plan = BatchPlan(training_rows(data.train, dc.packing, config.task, dc.max_seq_len),
                              config.train.micro_batch_size, config.train.seed)
        self.eval_rows = training_rows(data.eval, dc.packing, config.task, dc.max_seq_len) if data.eval else []
        self.total = total_steps(config, self.plan, self.world)
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total)
        self.state = RunState()
        self.selection = Selection.from_config(config)  # which eval's weights become adapter/ (train/select.py)
        self.periodic = build_periodic_eval(config, data, tokenizer)  # eval.every_eval: None when off
        if self.periodic is not None and sharded(model):
            raise TrainingError("eval.every_eval cannot generate from an FSDP2-sharded model (every forward is a "
                                "collective); use train.parallel: ddp, or run `lorakit eval` on the checkpoints")
        self.window = {"loss": 0.0, "tokens": 0, "steps": 0, "start": time.perf_counter(), "grad_norm": 0.0}
        self.stop_reason = "completed"
        self.stopped_at: Path | None = None  # the checkpoint a Ctrl-C saved (see run)
        self.reporters = Reporters([])  # train.report_to trackers, opened by run() on rank 0

    # ----- one optimizer step

    def step(self, stream: Iterator[tuple[float, list[Any]]]) -> float:
        """Forward/backward over this rank's grad_accum micro-batches, clip, update; returns the fractional epoch."""
        self.model.train()
        accum = self.config.train.grad_accum
        micro = [next(stream) for _ in range(accum * self.world)]  # the whole step, in data order
        batches = [to_device(self.collate(rows), self.device) for _, rows in my_share(micro, accum)]
        n_tokens = int(all_reduce_sum(sum(supervised_tokens(b) for b in batches))[0])  # N of the global step
        step_loss = self.forward_backward(batches, n_tokens)
        grad_norm = self.clip_gradients()
        self.guard_finite(step_loss, grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.micro_batches += len(micro)
        self.state.tokens += n_tokens
        self.window["loss"] += step_loss * n_tokens
        self.window["tokens"] += n_tokens
        self.window["steps"] += 1
        self.window["grad_norm"] = grad_norm
        return micro[-1][0]

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], n_tokens: int) -> float:
        """Backpropagate W · S_k / N per micro-batch; DDP / FSDP2 average over the W ranks, so the gradient
        is that of Σ_k S_k / N over the global step. Returns that loss, summed over ranks."""
        step_loss = 0.0
        for i, batch in enumerate(batches):
            with grad_sync(self.wrapped, sync=i == len(batches) - 1):
                loss = loss_sum(self.wrapped, batch) / max(n_tokens, 1)
                (loss * self.world).backward()
            step_loss += loss.item()
        return all_reduce_sum(step_loss)[0]

    def clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.train.max_grad_norm or float("inf")
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    def guard_finite(self, loss: float, grad_norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        last = newest_checkpoint(self.run_dir)
        raise TrainingError(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {self.state.step + 1} "
            f"(loss={loss}, grad_norm={grad_norm}). Likely causes: learning rate too high (train.lr="
            f"{self.config.train.lr}; try 2-10x lower), no clipping (train.max_grad_norm), fp16 overflow "
            f"(use bfloat16 or float32), or a bad example in the data. The last good checkpoint is "
            f"{last or 'none (no checkpoint was saved yet)'}; fix the cause and rerun with --resume."
        )

    # ----- logging, eval, checkpoints

    def log_metrics(self, epoch: float) -> dict[str, Any]:
        w = self.window
        elapsed = time.perf_counter() - w["start"]
        row = {
            "step": self.state.step,
            "epoch": round(epoch, 4),
            "loss": w["loss"] / max(w["tokens"], 1),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": w["grad_norm"],
            "tokens": self.state.tokens,
            "tokens_per_s": w["tokens"] / max(elapsed, 1e-9),
        }
        self.window.update(loss=0.0, tokens=0, steps=0, start=time.perf_counter())
        return row

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted eval loss. Eval batches are dealt round-robin to the ranks, the sums all-reduced;
        every rank runs the same number of forwards (FSDP2 gathers weights collectively), the spare ones
        on a batch whose result is dropped."""
        if not self.eval_rows:
            return None
        size, rows = self.config.eval_batch_rows(), self.eval_rows  # no grad: more rows per forward
        starts = list(range(0, len(rows), size))
        mine = starts[self.rank::self.world]
        total, count = 0.0, 0
        self.model.eval()
        for i in range(math.ceil(len(starts) / self.world)):
            start = mine[i] if i < len(mine) else 0
            batch = to_device(self.collate(rows[start:start + size]), self.device)
            loss = loss_sum(self.model, batch)
            if i < len(mine):
                total, count = total + float(loss), count + supervised_tokens(batch)
        self.model.train()
        reshard(self.model)
        total, count = all_reduce_sum(total, count)
        if count == 0:
            raise TrainingError("the eval data holds no supervised tokens (every label is -100); check data.eval")
        return total / count

    def evaluate_more(self) -> dict[str, float]:
        """eval.every_eval: task metrics and the canary (lorakit.eval.periodic). Rank 0 measures the plain model
        (under DDP every rank holds all the weights) while the others wait for its scores in the broadcast, so
        every rank takes the same selection and early-stopping decisions."""
        if self.periodic is None:
            return {}
        scores = self.periodic.measure(self.model, self.classifier_batches) if is_main() else None
        self.model.train()
        return broadcast(scores)

    def classifier_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        size = self.config.eval_batch_rows()
        for start in range(0, len(self.eval_rows), size):
            yield self.collate(self.eval_rows[start:start + size])

    def measure_base(self) -> None:
        """The base's canary loss, once per run (kept in the checkpoint): what canary_change is relative to."""
        if self.periodic is None:
            return
        if self.selection.base_canary_loss is not None:  # resumed
            self.periodic.base_canary_loss = self.selection.base_canary_loss
            return
        if self.config.method == "full" and self.state.step > 0:  # NOTE: the base weights are gone by now
            log.warning("full fine-tuning resumed without the base canary loss: canary_change is not measured")
            self.periodic.canary = None
            return
        self.selection.base_canary_loss = broadcast(self.periodic.measure_base(self.model) if is_main() else None)

    def record_eval(self, row: dict[str, Any]) -> bool:
        """Track the lowest eval loss and the selection rule's choice (train/select.py), whose weights go to best/;
        return True when early stopping says stop."""
        s = self.state
        loss = row.get("eval_loss")
        if loss is not None and (s.best_eval_loss is None or loss < s.best_eval_loss):
            s.best_eval_loss, s.best_step = loss, s.step
        if self.selection.record(row) and self.selection.active:
            tensors = trainable_state(self.model)
            if is_main():
                with atomic_directory(self.run_dir / "best") as tmp:
                    save_file(tensors, str(tmp / "trainable.safetensors"), metadata={"step": str(s.step)})
        s.evals_without_improvement = self.selection.since_best
        s.selection = self.selection.state()
        return self.selection.should_stop()

    def restore_best(self) -> None:
        """Load the chosen eval's weights from best/ (written when it was chosen; its step is checked)."""
        path = self.run_dir / "best" / "trainable.safetensors"
        tensors = None
        if is_main() and path.is_file():
            with safe_open(str(path), "pt") as f:
                step = (f.metadata() or {}).get("step")
            if step is None or int(step) == self.selection.chosen_step:
                tensors = load_file(str(path))
            else:
                log.warning("%s holds step %s, not the chosen step %s: keeping the last weights", path, step,
                            self.selection.chosen_step)
        tensors = broadcast(tensors)
        if tensors is not None:
            load_trainable_state(self.model, tensors, path)

    def checkpoint(self) -> Path:
        self.state.elapsed_s = self.elapsed()
        self.state.selection = self.selection.state()
        return save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state,
                               self.config.train.keep_checkpoints,
                               {"config": to_dict(self.config), "data_hash": self.data.stats.get("data_hash")})

    def resume(self) -> None:
        found = broadcast(newest_checkpoint(self.run_dir) if is_main() else None)
        if found is None:
            if is_main():
                log.warning("--resume: no checkpoint in %s; starting from scratch", self.run_dir / "checkpoints")
            return
        self.state = load_checkpoint(found, self.model, self.optimizer, self.scheduler)
        self.selection.load(self.state.selection)
        if is_main():
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
            print(f"resumed from {found} (step {self.state.step}/{self.total})", file=sys.stderr)

    def elapsed(self) -> float:
        return self.base_elapsed + (time.perf_counter() - self.started)

    # ----- the run

    def run(self) -> None:
        """Train until max_steps (or early stopping). Ctrl-C stops at the next step boundary with a checkpoint
        there and raises KeyboardInterrupt (lorakit.runtime.interrupt); `stopped_at` names that checkpoint."""
        self.started = time.perf_counter()
        self.base_elapsed = self.state.elapsed_s
        stream = self.plan.stream(self.state.micro_batches)
        bar = make_progress(self.total, self.state.step, self.progress)
        self.measure_base()
        metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if is_main() else None
        if is_main():
            self.reporters = open_reporters(self.config, self.run_dir, self.state.step)
        stop = StopRequest(enabled=self.world == 1)  # NOTE: across ranks a stop would have to be agreed on
        try:
            with stop:
                while self.state.step < self.total:
                    if stop.requested:  # between two steps: everything --resume reads says the same step
                        raise KeyboardInterrupt
                    if self.one_step(stream, metrics, bar):
                        break
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
            self.on_interrupt(stop)
            raise
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            self.reporters.close(self.stop_reason)
            self.state.elapsed_s = self.elapsed()

    def one_step(self, stream: Iterator[tuple[float, list[Any]]], metrics: Any, bar: Any) -> bool:
        """One optimizer step with its metrics line, eval and checkpoint; True when early stopping says stop."""
        tc = self.config.train
        epoch_before = self.state.micro_batches // self.plan.per_epoch
        epoch = self.step(stream)
        bar.update(1)
        row = None
        if self.state.step % tc.log_every == 0 or self.state.step == self.total:
            row = self.log_metrics(epoch)
        epoch_ended = self.state.micro_batches // self.plan.per_epoch > epoch_before
        should_stop = False
        if (tc.eval_every and self.state.step % tc.eval_every == 0) or epoch_ended or self.state.step == self.total:
            started = time.perf_counter()
            eval_value = self.evaluate()
            more = self.evaluate_more()
            if eval_value is not None or more:
                row = row or {"step": self.state.step, "epoch": round(epoch, 4)}
                row |= ({"eval_loss": eval_value} if eval_value is not None else {}) | more
                row["eval_time_s"] = round(time.perf_counter() - started, 3)
                should_stop = self.record_eval(row)
        if row is not None:
            self.record_row(row, metrics, bar)
        if tc.save_every and self.state.step % tc.save_every == 0:
            self.checkpoint()
        if should_stop:
            self.stop_reason = (f"early stopping: no {self.selection.metric} improvement in "
                                f"{tc.early_stopping_patience} evals")
        return should_stop

    def on_interrupt(self, stop: StopRequest) -> None:
        """After a Ctrl-C between two steps: a checkpoint there (`stopped_at`), for --resume. Not after a second
        Ctrl-C mid-step (the state may be half an update), nor under torchrun (a checkpoint is collective)."""
        if stop.requested and not stop.forced:
            self.stopped_at = self.checkpoint()
            print(f"interrupted at step {self.state.step}: saved {self.stopped_at}; continue with --resume",
                  file=sys.stderr)
        elif stop.forced:
            print(f"stopped at once, mid-step (a second Ctrl-C): nothing new saved; the newest checkpoint is "
                  f"{newest_checkpoint(self.run_dir) or 'none'}", file=sys.stderr)

    def record_row(self, row: dict[str, Any], metrics: Any, bar: Any) -> None:
        """One metrics line: to metrics.jsonl (rank 0), the history (summary, plot) and the progress bar."""
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            self.reporters.log(row)  # train.report_to: the same scalars to TensorBoard / MLflow / W&B
        self.state.history.append(row)
        bar.set_postfix(progress_fields(row))


def make_progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def progress_fields(row: dict[str, Any]) -> dict[str, str]:
    fields = {}
    if "loss" in row:
        fields.update(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    if "eval_loss" in row:
        fields["eval"] = f"{row['eval_loss']:.4f}"
    if "canary_change" in row:
        fields["canary"] = f"{row['canary_change']:+.1%}"
    return fields


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines written after the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    with atomic_file(path) as f:
        f.write("".join(line + "\n" for line in kept))


def run_loop(loop: Loop) -> None:
    """loop.run(), with out-of-memory and a lost rank turned into messages that say what to do."""
    try:
        loop.run()
    except torch.OutOfMemoryError:
        raise TrainingError(oom_advice(loop.config)) from None
    except RuntimeError as e:
        if not is_lost_rank(e):
            raise
        raise TrainingError(lost_rank_message(e, newest_checkpoint(loop.run_dir))) from None


def oom_advice(config: RunConfig) -> str:
    tc = config.train
    tips = [
        f"halve train.micro_batch_size ({tc.micro_batch_size} -> {max(1, tc.micro_batch_size // 2)}) and double "
        f"train.grad_accum ({tc.grad_accum} -> {tc.grad_accum * 2}) to keep the effective batch",
        f"shorten data.max_seq_len ({config.data.max_seq_len})",
    ]
    if not tc.gradient_checkpointing:
        tips.append("set train.gradient_checkpointing: true (activations recomputed in backward)")
    if config.method != "qlora":
        tips.append("use method: qlora (4-bit base weights, about 1/4 of bf16)")
    return "out of memory. Try, in this order:\n  - " + "\n  - ".join(tips) + "\n(`lorakit advise --config ...` predicts the peak before you start.)"
