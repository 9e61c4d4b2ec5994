"""`lorakit train`, end to end: validate, check memory, prepare the run directory and data, load, loop,
save, evaluate at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from lorakit.advise import available_memory, check_fits
from lorakit.advise.check import init_time_warning
from lorakit.config import RunConfig, dump_yaml, load_run_config
from lorakit.data import check_num_labels, prepare_data
from lorakit.errors import ConfigError, TrainingError
from lorakit.eval import evaluate_run
from lorakit.eval.periodic import output_problems
from lorakit.lora import parameter_report
from lorakit.models import load_tokenizer
from lorakit.quant import precision_report
from lorakit.runtime.devices import pick_device, pick_dtype
from lorakit.runtime.distributed import (
    barrier,
    is_main,
    process_group,
    rank,
    restarted,
    world_size,
    wrap_model,
)
from lorakit.runtime.outdir import output_errors
from lorakit.runtime.resume import check_resume
from lorakit.runtime.rundir import RunDirClaim, claim_run_dir
from lorakit.train.loop import Loop, run_loop
from lorakit.train.outputs import TrainResult, adapter_fingerprint, save_outputs, write_summary
from lorakit.train.setup import prepare_model


def train_lora(config: RunConfig | str | Path, overrides: list[str] | None = None, resume: bool = False,
               progress: bool = True, memory_check: bool = True, overwrite: bool = False,
               resume_anyway: bool = False, source: str | Path | None = None) -> TrainResult:
    """Run one fine-tuning job end to end and return where everything went.

    `config` is a RunConfig or a YAML path (validated whole before any weight is loaded). With
    `memory_check` the advisor predicts the peak memory from config.json alone and stops the run, with
    what to change, before any weight is loaded when it would not fit. Under torchrun every rank calls
    this (see lorakit.runtime.distributed); a worker group that torchrun restarted resumes by itself.

    An output_dir holding a previous run is refused unless `resume` (continue it: the checkpoint's config
    and data must match, or `resume_anyway`) or `overwrite` (moved aside once everything is validated).
    `source`: the YAML file the config came from (it may live in output_dir without counting as a run)."""
    if source is None and not isinstance(config, RunConfig) and config is not None:
        source = Path(config)
    if not isinstance(config, RunConfig):
        config = load_run_config(config, overrides)
    problems = output_problems(config)  # metrics that need labels or a schema, before any weight loads
    if problems:
        raise ConfigError(problems)
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
    model, tokenizer = prepare_model(config, device, dtype, load_on=torch.device("cpu") if fsdp else device,
                                     label_names=data.label_names)
    claim.commit()  # config, data and model are valid: only now may --overwrite move the previous run aside
    fingerprint = adapter_fingerprint(model, config)  # before FSDP2 turns NF4 codes into (sharded) parameters
    if is_main():
        print(parameter_report(model), file=sys.stderr)
        precision = precision_report(model)
        if precision:
            print(precision, file=sys.stderr)
        print(batch_report(config), file=sys.stderr)
    wrapped = wrap_model(model, config.train.parallel, device)
    torch.manual_seed(config.train.seed + rank())  # dropout masks: one stream per rank
    loop = Loop(config, model, tokenizer, data, device, run_dir, progress, wrapped)
    if resume:
        loop.resume()
    if is_main():  # once the checkpoint has loaded: a refused or failed resume leaves config.yaml as it was
        dump_yaml(config, run_dir / "config.yaml")  # resolved: data paths and num_labels filled in
    try:
        run_loop(loop)
    except KeyboardInterrupt:
        save_stopped(loop, fingerprint, device)
        raise
    adapter_dir = save_outputs(loop, fingerprint)
    summary = write_summary(loop, adapter_dir, device)
    result = TrainResult(run_dir, adapter_dir, summary, model, tokenizer, rank())
    if config.eval.at_end:
        evaluate_at_end(result, config, progress)
    return result


def save_stopped(loop: Loop, fingerprint: dict[str, Any] | None, device: torch.device) -> None:
    """After a Ctrl-C (or the dashboard's Stop) between two steps: what the run has learned so far, as a finished
    run leaves it -- adapter/ (model/), loss.png, summary.json with status "interrupted" and the measured peak
    memory -- so it can be chatted with, evaluated or exported before (or without) --resume. Nothing after a
    second Ctrl-C mid-step, or under torchrun (see Loop.on_interrupt). No eval at the end: the user said stop."""
    if loop.stopped_at is None:
        return
    adapter_dir = save_outputs(loop, fingerprint)
    write_summary(loop, adapter_dir, device)
    if is_main():
        print(f"the weights at step {loop.state.step}: {adapter_dir} (summary.json: interrupted)", file=sys.stderr)


def evaluate_at_end(result: TrainResult, config: RunConfig, progress: bool) -> None:
    """`lorakit eval` on the trained model in memory (base = adapters disabled): eval/eval.{md,json,png}.

    NOTE: single-process LoRA/QLoRA only. Full fine-tuning has no adapter to disable for the base side,
    and under torchrun the model is wrapped on every rank: there, run `lorakit eval CONFIG` afterwards."""
    if config.method == "full" or world_size() > 1:
        if is_main():
            print(f"eval.at_end: skipped ({'full fine-tuning' if config.method == 'full' else 'multi-process run'}); "
                  f"run `lorakit eval {result.run_dir / 'config.yaml'}`", file=sys.stderr)
        return
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


def check_memory(config: RunConfig) -> None:
    """Raise TrainingError with the advisor's advice when the predicted peak exceeds what is available."""
    device = pick_device(config.train.device)
    problem = check_fits(config, available_memory(str(device)))
    if problem:
        raise TrainingError(problem)
    slow_init = init_time_warning(config)  # PiSSA/LoftQ SVDs of a big model on a CPU take hours
    if slow_init and is_main():
        print(slow_init, file=sys.stderr)


def _prepare_data(config: RunConfig) -> Any:
    tokenizer = load_tokenizer(config.base_model, config.revision)
    data = prepare_data(config.data, tokenizer, config.task, config.train.micro_batch_size)
    if config.task == "seq_cls" and config.num_labels is None:
        config.num_labels = len(data.label_names) if data.label_names else 1 + max(e.labels for e in data.train + data.eval)
    elif config.task == "seq_cls":
        check_num_labels(data, config.num_labels, "num_labels in the config",
                         "fix the labels, or set num_labels to null to read it from the data")
    return data
