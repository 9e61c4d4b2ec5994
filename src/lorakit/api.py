"""The pipelines as Python calls -- what the CLI runs, for a notebook that never needs the CLI.

    train_lora(config)                      fine-tune (LoRA / QLoRA / full) and return where everything went
    evaluate(config, adapter)               base vs tuned on the run's eval split, prompts and canary
    generate_text(base, prompt, adapter)    one answer from a base (+ adapter), with the training chat template
    merge(base, adapter, out)               the adapter folded into a full-precision copy of the base

`config` is a RunConfig or the path of a YAML file (overrides as ["train.lr=1e-4", ...]). The built-in demo
is resolved here, at the entry: `base_model: demo` becomes the built demo model and `data.train: null` the demo
task's files, so nothing below this layer knows about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorakit.adapters import export_merged, read_adapter_config, read_chat_template
from lorakit.config import GenerationConfig, RunConfig, load_run_config
from lorakit.demo import resolve_base_name, resolve_demo
from lorakit.eval import EvalReport, evaluate_run, parse_thresholds
from lorakit.export.merge_stream import merge_adapter_streaming
from lorakit.generate import check_generation, generate, render_chat_prompt
from lorakit.models import load_base
from lorakit.runtime.outdir import check_output_dir
from lorakit.train import TrainResult
from lorakit.train import train_lora as _train_lora


def run_config(config: RunConfig | str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig (from a path, or the defaults when None) with the demo's names resolved."""
    if not isinstance(config, RunConfig):
        config = load_run_config(config, overrides)
    return resolve_demo(config)


def train_lora(config: RunConfig | str | Path | None, overrides: list[str] | None = None, *, resume: bool = False,
               progress: bool = True, memory_check: bool = True, overwrite: bool = False,
               resume_anyway: bool = False) -> TrainResult:
    """Run one fine-tuning job end to end (see `lorakit.train.train_lora`); returns the run directory, the
    adapter (or model) directory, the summary and the trained model. An output_dir holding a previous run
    is refused unless `resume` or `overwrite` (the old run is moved aside, never deleted)."""
    source = None if isinstance(config, RunConfig) or config is None else Path(config)
    return _train_lora(run_config(config, overrides), resume=resume, progress=progress, memory_check=memory_check,
                       overwrite=overwrite, resume_anyway=resume_anyway, source=source)


def evaluate(config: RunConfig | str | Path, adapter: str | Path | None = None, out: str | Path | None = None,
             overrides: list[str] | None = None, fail_below: list[str] | None = None) -> EvalReport:
    """Base vs tuned on the run's data: writes out/eval.{md,json,png} (default output_dir/eval) and returns
    the report. `adapter` defaults to output_dir/adapter. `fail_below` thresholds (METRIC=VALUE) are checked
    before anything loads, so a typo costs nothing."""
    parse_thresholds(fail_below or [])
    config = run_config(config, overrides)
    adapter_dir = Path(adapter) if adapter else Path(config.output_dir) / "adapter"
    return evaluate_run(config, adapter_dir, Path(out) if out else Path(config.output_dir) / "eval")


def generate_text(base: str, prompt: str, adapter: str | Path | None = None, *, raw: bool = False,
                  generation: GenerationConfig | None = None) -> str:
    """One completion of `prompt` by `base` (+ `adapter`). Unless `raw`, the prompt is one user turn rendered
    with the adapter's saved chat template (else the tokenizer's own), exactly as in training."""
    generation = generation or GenerationConfig()
    check_generation(generation, [prompt] if raw else [], flags=True)  # before anything loads
    model, tokenizer = load_base(resolve_base_name(base), adapter=adapter)
    template = read_chat_template(adapter)
    if not raw and (template or tokenizer.chat_template):
        prompt = render_chat_prompt(tokenizer, [{"role": "user", "content": prompt}], template)
    return generate(model, tokenizer, [prompt], generation)[0]


def merge(base: str, adapter: str | Path, out: str | Path, force: bool = False) -> Path:
    """The adapter folded into the base's own full-precision weights (never into dequantized 4-bit codes),
    written as a standard transformers checkpoint (safetensors) with the tokenizer.

    A causal LM is merged shard by shard (the base's dtypes and shards; peak ≈ one tensor + the adapter,
    whatever the model's size). A SEQ_CLS adapter gives an AutoModelForSequenceClassification checkpoint
    with its trained head and class names (id2label), merged in memory in fp32 (its config changes too).
    A non-empty `out` is refused unless `force`; then only the files written here are replaced."""
    check_output_dir(out, force)  # before anything loads
    task_type = read_adapter_config(adapter, allow_dora=True).get("task_type", "CAUSAL_LM")
    task: Any = "seq_cls" if task_type == "SEQ_CLS" else "causal_lm"
    if task == "causal_lm":
        return merge_adapter_streaming(resolve_base_name(base), adapter, out, task=task, force=force)
    model, tokenizer = load_base(resolve_base_name(base), task=task, dtype=torch.float32, adapter=adapter)
    return export_merged(model, out, tokenizer, force=force)
