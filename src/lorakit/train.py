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
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapters import save_lora_adapter
from lorakit.config import RunConfig, dump_yaml, load_run_config, to_dict
from lorakit.errors import ConfigError, TrainingError
from lorakit.lora import inject_lora, parameter_report
from lorakit.runtime.atomic import atomic_directory, atomic_file
from lorakit.runtime.checkpoint import (
    RunState,
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from lorakit.runtime.devices import pick_device, pick_dtype, proc_kib
from lorakit.runtime.distributed import (
    all_reduce_sum,
    barrier,
    broadcast,
    full_model_state,
    full_tensor,
    gathered_parameters,
    grad_sync,
    is_lost_rank,
    is_main,
    lost_rank_message,
    my_share,
    process_group,
    rank,
    reshard,
    restarted,
    sharded,
    unwrap,
    world_size,
    wrap_model,
)
from lorakit.runtime.outdir import output_errors
from lorakit.runtime.resume import check_resume
from lorakit.runtime.rundir import RunDirClaim, claim_run_dir

log = logging.getLogger(__name__)




@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path | None
    summary: dict[str, Any]
    model: nn.Module | None = None
    tokenizer: Any = None
    rank: int = 0  # under torchrun: which process returned this (rank 0 wrote the files)


# --------------------------------------------------------------------------- setup


def prepare_model(config: RunConfig, device: torch.device, dtype: torch.dtype,
                  load_on: torch.device | None = None) -> tuple[nn.Module, Any]:
    """Load the base, quantize it for QLoRA, add adapters (or unfreeze all for full).

    `load_on` (default: `device`) is where the weights are built: the CPU for FSDP2, which then moves
    only each rank's shard to the accelerator."""
    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.base_model, config.revision)
    load_dtype = torch.float32 if config.method == "full" and dtype != torch.float32 and device.type == "cpu" else dtype
    model = load_model(config.base_model, config.task, load_dtype, load_on or device, config.revision, config.num_labels)
    return adapt_for_method(model, config, dtype), tokenizer


def adapt_for_method(model: nn.Module, config: RunConfig, dtype: torch.dtype, progress: bool = True) -> nn.Module:
    """The method as config: NF4 base for qlora, adapters for lora/qlora, everything trainable for full;
    then gradient checkpointing (non-reentrant, so frozen inputs and 4-bit layers work)."""
    if config.method == "qlora":
        from lorakit.quant import quantize_model

        quantize_model(model, config.quant, compute_dtype=dtype, progress=progress)
    if config.method == "full":
        model.requires_grad_(True)
    else:
        inject_lora(model, config.lora)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; LoRA+ gives B its own, larger learning rate."""
    tc = config.train
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = tc.lora_plus_ratio
    groups = [{"params": [p for n, p in params if not (ratio and ".lora_B." in n)], "lr": tc.lr}]
    if ratio:
        groups.append({"params": [p for n, p in params if ".lora_B." in n], "lr": tc.lr * ratio})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["weight_decay"] = tc.weight_decay
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    return _bnb_optimizer(groups, config)


def _bnb_optimizer(groups: list[dict], config: RunConfig) -> torch.optim.Optimizer:
    if not torch.cuda.is_available():
        raise TrainingError(f"train.optimizer: {config.train.optimizer} needs a CUDA device; use adamw on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainingError(f"train.optimizer: {config.train.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    cls = bnb.optim.PagedAdamW8bit if config.train.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=config.train.lr, weight_decay=config.train.weight_decay)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig, total_steps: int) -> Any:
    tc = config.train
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(tc.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, tc.scheduler))


# --------------------------------------------------------------------------- data order


class BatchPlan:
    """Training rows cut into micro-batches in an order fixed by (seed, epoch)."""

    def __init__(self, rows: list[Any], micro_batch_size: int, seed: int):
        if not rows:
            raise TrainingError("no training examples left after data preparation; check data.train")
        self.rows, self.size, self.seed = rows, micro_batch_size, seed
        self.per_epoch = math.ceil(len(rows) / micro_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def stream(self, start: int) -> Iterator[tuple[float, list[Any]]]:
        """(fractional epoch after this micro-batch, rows) from micro-batch index `start` on."""
        index, order_epoch, order = start, None, []
        while True:
            epoch, within = divmod(index, self.per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self.epoch_order(epoch)
            picked = order[within * self.size:(within + 1) * self.size]
            index += 1
            yield epoch + (within + 1) / self.per_epoch, [self.rows[i] for i in picked]


def total_steps(config: RunConfig, plan: BatchPlan, world: int = 1) -> int:
    """Optimizer steps of the run; a step consumes grad_accum × world micro-batches of the data order."""
    tc = config.train
    if tc.max_steps:
        return tc.max_steps
    return max(1, math.ceil(tc.epochs * plan.per_epoch / (tc.grad_accum * world)))


# --------------------------------------------------------------------------- loss


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    labels = batch["labels"]
    if labels.dim() == 1:  # classification: one label per row
        return labels.numel()
    return int((labels[:, 1:] != -100).sum())


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ of per-token cross-entropy over supervised positions (labels shifted by one, as in HF)."""
    from lorakit.data import model_inputs

    inputs = model_inputs(batch, unwrap(model))  # `model` may be a DDP wrapper: forward through it
    labels = batch["labels"]
    if labels.dim() == 1:
        out = model(**inputs, labels=labels)
        return out.loss * labels.numel()
    from lorakit.loss import causal_lm_loss_sum

    # the LM head and cross-entropy in row chunks: the (B, T, V) logits are never made (see loss.py)
    return causal_lm_loss_sum(model, inputs, labels, inner=unwrap(model))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------- the loop


class Loop:
    """State of one run; `run()` reads as the list of what happens each optimizer step.

    `model` is the plain model (names, saving, eval); `wrapped` is what forward/backward go through: a DDP
    wrapper, the FSDP2-sharded model itself, or (one process) the model."""

    def __init__(self, config: RunConfig, model: nn.Module, tokenizer: Any, data: Any, device: torch.device,
                 run_dir: Path, progress: bool, wrapped: nn.Module | None = None):
        from lorakit.data import collate

        self.config, self.model, self.tokenizer, self.data = config, model, tokenizer, data
        self.device, self.run_dir, self.progress = device, run_dir, progress
        self.wrapped = wrapped if wrapped is not None else model
        self.rank, self.world = rank(), world_size()
        self.collate = lambda rows: collate(rows, tokenizer.pad_token_id, config.data.packing, config.data.max_seq_len)
        self.plan = BatchPlan(training_rows(data.train, config), config.train.micro_batch_size, config.train.seed)
        self.eval_rows = training_rows(data.eval, config) if data.eval else []
        self.total = total_steps(config, self.plan, self.world)
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total)
        self.state = RunState()
        self.window = {"loss": 0.0, "tokens": 0, "steps": 0, "start": time.perf_counter(), "grad_norm": 0.0}
        self.stop_reason = "completed"

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
        last = list_checkpoints(self.run_dir)
        raise TrainingError(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {self.state.step + 1} "
            f"(loss={loss}, grad_norm={grad_norm}). Likely causes: learning rate too high (train.lr="
            f"{self.config.train.lr}; try 2-10x lower), no clipping (train.max_grad_norm), fp16 overflow "
            f"(use bfloat16 or float32), or a bad example in the data. The last good checkpoint is "
            f"{last[-1] if last else 'none (no checkpoint was saved yet)'}; fix the cause and rerun with --resume."
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
        from lorakit.evaluate import batch_loss_sum

        size, rows = self.config.train.micro_batch_size, self.eval_rows
        starts = list(range(0, len(rows), size))
        mine = starts[self.rank::self.world]
        total, count = 0.0, 0
        self.model.eval()
        for i in range(math.ceil(len(starts) / self.world)):
            start = mine[i] if i < len(mine) else 0
            loss, n = batch_loss_sum(self.model, to_device(self.collate(rows[start:start + size]), self.device))
            if i < len(mine):
                total, count = total + float(loss), count + n
        self.model.train()
        reshard(self.model)
        total, count = all_reduce_sum(total, count)
        if count == 0:
            raise TrainingError("the eval data holds no supervised tokens (every label is -100); check data.eval")
        return total / count

    def record_eval(self, eval_loss: float) -> bool:
        """Track the best eval; save its weights; return True when early stopping says stop."""
        s = self.state
        if s.best_eval_loss is None or eval_loss < s.best_eval_loss:
            s.best_eval_loss, s.best_step, s.evals_without_improvement = eval_loss, s.step, 0
            tensors = trainable_state(self.model)
            if is_main():
                with atomic_directory(self.run_dir / "best") as tmp:
                    save_file(tensors, str(tmp / "trainable.safetensors"))
            return False
        s.evals_without_improvement += 1
        patience = self.config.train.early_stopping_patience
        return patience is not None and s.evals_without_improvement >= patience

    def restore_best(self) -> None:
        path = self.run_dir / "best" / "trainable.safetensors"
        tensors = broadcast(load_file(str(path)) if is_main() and path.is_file() else None)
        if tensors is not None:
            load_trainable_state(self.model, tensors, path)

    def checkpoint(self) -> Path:
        self.state.elapsed_s = self.elapsed()
        return save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state,
                               self.config.train.keep_checkpoints,
                               {"config": to_dict(self.config), "data_hash": self.data.stats.get("data_hash")})

    def resume(self) -> None:
        found = broadcast(list_checkpoints(self.run_dir) if is_main() else None)
        if not found:
            if is_main():
                log.warning("--resume: no checkpoint in %s; starting from scratch", self.run_dir / "checkpoints")
            return
        self.state = load_checkpoint(found[-1], self.model, self.optimizer, self.scheduler)
        if is_main():
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
            print(f"resumed from {found[-1]} (step {self.state.step}/{self.total})", file=sys.stderr)

    def elapsed(self) -> float:
        return self.base_elapsed + (time.perf_counter() - self.started)

    # ----- the run

    def run(self) -> None:
        tc = self.config.train
        self.started = time.perf_counter()
        self.base_elapsed = self.state.elapsed_s
        stream = self.plan.stream(self.state.micro_batches)
        bar = make_progress(self.total, self.state.step, self.progress)
        metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if is_main() else None
        try:
            while self.state.step < self.total:
                epoch_before = self.state.micro_batches // self.plan.per_epoch
                epoch = self.step(stream)
                bar.update(1)
                row = None
                if self.state.step % tc.log_every == 0 or self.state.step == self.total:
                    row = self.log_metrics(epoch)
                epoch_ended = self.state.micro_batches // self.plan.per_epoch > epoch_before
                should_stop = False
                if (tc.eval_every and self.state.step % tc.eval_every == 0) or epoch_ended or self.state.step == self.total:
                    eval_value = self.evaluate()
                    if eval_value is not None:
                        row = row or {"step": self.state.step, "epoch": round(epoch, 4)}
                        row["eval_loss"] = eval_value
                        should_stop = self.record_eval(eval_value)
                if row is not None:
                    self.record_row(row, metrics, bar)
                if tc.save_every and self.state.step % tc.save_every == 0:
                    self.checkpoint()
                if should_stop:
                    self.stop_reason = f"early stopping: no eval improvement in {tc.early_stopping_patience} evals"
                    break
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
            if self.world == 1:  # NOTE: across ranks a checkpoint is collective; an interrupt may hit one rank only
                print(f"interrupted at step {self.state.step}: saved {self.checkpoint()}; continue with --resume",
                      file=sys.stderr)
            raise
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            self.state.elapsed_s = self.elapsed()
        if tc.early_stopping_patience is not None:
            self.restore_best()

    def record_row(self, row: dict[str, Any], metrics: Any, bar: Any) -> None:
        """One metrics line: to metrics.jsonl (rank 0), the history (summary, plot) and the progress bar."""
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
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
    return fields


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines written after the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    with atomic_file(path) as f:
        f.write("".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------- entry point


def training_rows(examples: list[Any], config: RunConfig) -> list[Any]:
    """What a micro-batch samples from: packed rows of several examples, or single examples."""
    if not config.data.packing or config.task != "causal_lm":
        return list(examples)
    from lorakit.data import pack_examples

    return pack_examples(examples, config.data.max_seq_len)


def train_lora(config: RunConfig | str | Path, overrides: list[str] | None = None, resume: bool = False,
               progress: bool = True, memory_check: bool = True, overwrite: bool = False,
               resume_anyway: bool = False) -> TrainResult:
    """Run one fine-tuning job end to end and return where everything went.

    `config` is a RunConfig or a YAML path (validated whole before any weight is loaded). With
    `memory_check` the advisor predicts the peak memory from config.json alone and stops the run, with
    what to change, before any weight is loaded when it would not fit. Under torchrun every rank calls
    this (see lorakit.runtime.distributed); a worker group that torchrun restarted resumes by itself.

    An output_dir holding a previous run is refused unless `resume` (continue it: the checkpoint's config
    and data must match, or `resume_anyway`) or `overwrite` (moved aside once everything is validated)."""
    source = None if isinstance(config, RunConfig) or config is None else Path(config)
    if not isinstance(config, RunConfig):
        config = load_run_config(config, overrides)
    if resume and overwrite:
        raise ConfigError(["--resume continues the run in output_dir, --overwrite starts over: pass one of them"])
    resume = resume or restarted()
    mode = "resume" if resume else "overwrite" if overwrite else "new"
    with process_group(config.train.device) as device, output_errors(config.output_dir), \
            claim_run_dir(config.output_dir, mode, source, main=is_main()) as claim:
        return _train(config, device, claim, progress and is_main(), memory_check, resume_anyway)


def _train(config: RunConfig, device: torch.device, claim: RunDirClaim, progress: bool, memory_check: bool,
           resume_anyway: bool = False) -> TrainResult:
    resume = claim.mode == "resume"
    barrier()  # every rank has looked at output_dir (the claim) before rank 0 writes to it
    fsdp = config.train.parallel == "fsdp" and world_size() > 1
    if fsdp and config.train.optimizer != "adamw":
        raise TrainingError(f"train.optimizer: {config.train.optimizer} cannot update FSDP2-sharded parameters; "
                            f"use adamw with train.parallel: fsdp, or train.parallel: ddp")
    if memory_check and not fsdp:  # NOTE: the advisor models one device holding the whole model, not FSDP shards
        check_memory(config)
    run_dir = claim.path
    dtype = pick_dtype(config.train.dtype, device)
    data = _prepare_data(config)
    if resume:
        check_resume(config, run_dir, data.stats.get("data_hash"), resume_anyway)
    torch.manual_seed(config.train.seed)  # the same initial adapter on every rank
    model, tokenizer = prepare_model(config, device, dtype, load_on=torch.device("cpu") if fsdp else device)
    claim.commit()  # config, data and model are valid: only now may --overwrite move the previous run aside
    fingerprint = _base_fingerprint(model, config)  # before FSDP2 turns NF4 codes into (sharded) parameters
    if is_main():
        print(parameter_report(model), file=sys.stderr)
        print(batch_report(config), file=sys.stderr)
    wrapped = wrap_model(model, config.train.parallel, device)
    torch.manual_seed(config.train.seed + rank())  # dropout masks: one stream per rank
    loop = Loop(config, model, tokenizer, data, device, run_dir, progress, wrapped)
    if resume:
        loop.resume()
    if is_main():  # once the checkpoint has loaded: a refused or failed resume leaves config.yaml as it was
        dump_yaml(config, run_dir / "config.yaml")  # resolved: data paths and num_labels filled in
    run_loop(loop)
    adapter_dir = save_outputs(loop, fingerprint)
    summary = write_summary(loop, adapter_dir, device)
    result = TrainResult(run_dir, adapter_dir, summary, model, tokenizer, rank())
    if config.eval.at_end:
        evaluate_at_end(result, config, progress)
    return result


def evaluate_at_end(result: TrainResult, config: RunConfig, progress: bool) -> None:
    """`lorakit eval` on the trained model in memory (base = adapters disabled): eval/eval.{md,json,png}.

    NOTE: single-process LoRA/QLoRA only. Full fine-tuning has no adapter to disable for the base side,
    and under torchrun the model is wrapped on every rank: there, run `lorakit eval CONFIG` afterwards."""
    if config.method == "full" or world_size() > 1:
        if is_main():
            print(f"eval.at_end: skipped ({'full fine-tuning' if config.method == 'full' else 'multi-process run'}); "
                  f"run `lorakit eval {result.run_dir / 'config.yaml'}`", file=sys.stderr)
        return
    from lorakit.evaluate import evaluate_run

    report = evaluate_run(config, result.adapter_dir, result.run_dir / "eval", model=result.model,
                          tokenizer=result.tokenizer, progress=progress)
    result.summary["eval"] = report.json
    if progress:
        print(report.markdown, file=sys.stderr)


def batch_report(config: RunConfig) -> str:
    """The global batch, printed at start: rows per micro-batch × micro-batches per rank × ranks."""
    tc, world = config.train, world_size()
    how = f"{tc.parallel.upper()} over {world} processes" if world > 1 else "1 process"
    return (f"global batch: {tc.micro_batch_size} rows/micro-batch × {tc.grad_accum} grad_accum × {world} "
            f"world size = {tc.micro_batch_size * tc.grad_accum * world} rows per optimizer step ({how})")


def run_loop(loop: Loop) -> None:
    """loop.run(), with out-of-memory and a lost rank turned into messages that say what to do."""
    try:
        loop.run()
    except torch.OutOfMemoryError:
        raise TrainingError(oom_advice(loop.config)) from None
    except RuntimeError as e:
        if not is_lost_rank(e):
            raise
        last = list_checkpoints(loop.run_dir)
        raise TrainingError(lost_rank_message(e, last[-1] if last else None)) from None


def check_memory(config: RunConfig) -> None:
    """Raise TrainingError with the advisor's advice when the predicted peak exceeds what is available."""
    from lorakit.advise import available_memory, check_fits

    device = pick_device(config.train.device)
    problem = check_fits(config, available_memory(str(device)))
    if problem:
        raise TrainingError(problem)


def _prepare_data(config: RunConfig) -> Any:
    from lorakit.data import prepare_data
    from lorakit.models import load_tokenizer

    if config.data.train is None:
        from lorakit.demo import write_demo_data

        paths = broadcast(write_demo_data(Path(config.output_dir) / "data") if is_main() else None)  # rank 0 writes
        config.data.train = str(paths["train"])
        config.data.eval = config.data.eval or str(paths["eval"])
    tokenizer = load_tokenizer(config.base_model, config.revision)
    data = prepare_data(config.data, tokenizer, config.task, config.train.micro_batch_size)
    if config.task == "seq_cls" and config.num_labels is None:
        config.num_labels = len(data.label_names) if data.label_names else 1 + max(e.labels for e in data.train + data.eval)
    return data


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


def save_outputs(loop: Loop, fingerprint: dict[str, Any] | None = None) -> Path | None:
    """adapter/ (PEFT format) for LoRA/QLoRA, model/ (save_pretrained) for full fine-tuning; loss.png.

    Every rank calls this (FSDP2 gathers the sharded weights collectively); rank 0 writes."""
    config, run_dir = loop.config, loop.run_dir
    if is_main():
        plot_losses(loop.state.history, run_dir / "loss.png")
    if config.method == "full":
        return save_full_model(loop)
    metadata = {
        "data_hash": loop.data.stats.get("data_hash"),
        "hyperparameters": {"method": config.method, "lora": asdict(config.lora), "train": asdict(config.train),
                            "quant": asdict(config.quant) if config.method == "qlora" else None},
        "metrics": {"best_eval_loss": loop.state.best_eval_loss, "steps": loop.state.step},
    }
    if fingerprint is not None:
        metadata["base_model"] = fingerprint
    with gathered_parameters(loop.model):
        if is_main():
            save_lora_adapter(loop.model, run_dir / "adapter", task_type="SEQ_CLS" if config.task == "seq_cls" else "CAUSAL_LM",
                              metadata=metadata, chat_template=getattr(loop.data, "chat_template", None))
    barrier()
    return run_dir / "adapter"


def save_full_model(loop: Loop) -> Path:
    state = full_model_state(loop.model) if sharded(loop.model) else None  # whole weights on rank 0
    if is_main():
        with atomic_directory(loop.run_dir / "model") as tmp:
            loop.model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            loop.tokenizer.save_pretrained(tmp)
    barrier()
    return loop.run_dir / "model"


def _base_fingerprint(model: nn.Module, config: RunConfig) -> dict[str, Any] | None:
    if config.method == "full":
        return None
    from lorakit.adapters import base_fingerprint

    return base_fingerprint(model)


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s (pip install 'lorakit[plot]')", path)
        return
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token-weighted)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak of this process: CUDA allocator peak, else VmHWM. Why not ru_maxrss: a child started by fork
    inherits its parent's peak there, so a run launched from a big Python process would over-report."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = proc_kib("/proc/self/status", "VmHWM")
    return peak if peak is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB


def write_summary(loop: Loop, adapter_dir: Path | None, device: torch.device) -> dict[str, Any]:
    s = loop.state
    last = next((r for r in reversed(s.history) if "loss" in r), {})
    summary = {
        "status": loop.stop_reason,
        "steps": s.step,
        "total_steps": loop.total,
        "final_loss": last.get("loss"),
        "final_eval_loss": next((r["eval_loss"] for r in reversed(s.history) if "eval_loss" in r), None),
        "best_eval_loss": s.best_eval_loss,
        "best_step": s.best_step,
        "tokens": s.tokens,
        "wall_time_s": round(s.elapsed_s, 2),
        "tokens_per_s": s.tokens / max(s.elapsed_s, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device),
        "world_size": loop.world,
        "output": str(adapter_dir) if adapter_dir else None,
    }
    if is_main():
        with atomic_file(loop.run_dir / "summary.json") as f:
            json.dump(summary, f, indent=2)
    return summary


def format_summary(result: TrainResult) -> str:
    s, d = result.summary, result.run_dir
    lines = [
        f"{s['status']}: {s['steps']}/{s['total_steps']} steps in {s['wall_time_s']:.1f}s "
        f"({s['tokens_per_s']:.0f} supervised tokens/s, peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB)",
        f"final train loss {s['final_loss']:.4f}" if s["final_loss"] is not None else "no train loss logged",
    ]
    if s["best_eval_loss"] is not None:
        lines.append(f"eval loss {s['final_eval_loss']:.4f} (best {s['best_eval_loss']:.4f} at step {s['best_step']})")
    lines += [
        f"{'model' if result.adapter_dir and result.adapter_dir.name == 'model' else 'adapter'}: {result.adapter_dir}",
        f"metrics: {d / 'metrics.jsonl'}   plot: {d / 'loss.png'}   summary: {d / 'summary.json'}",
    ]
    if (d / "eval" / "eval.md").is_file():
        lines.append(f"eval (base vs tuned): {d / 'eval' / 'eval.md'}")
    return "\n".join(lines)
