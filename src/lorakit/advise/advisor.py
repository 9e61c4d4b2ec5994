"""`advise()`: what to run, whether it fits, and how long it takes -- before any weight is loaded. Reads
the model's shapes, the data's size, this machine's memory and rates, then recommends and predicts."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Literal

from lorakit.advise.data_stats import CHARS_PER_TOKEN, DataStats, data_stats, run_data_stats
from lorakit.advise.eval_timing import eval_time
from lorakit.advise.families import HUB_IDS
from lorakit.advise.memory import memory_model
from lorakit.advise.recommend import recommend
from lorakit.advise.report import Advice, notes_for
from lorakit.advise.shapes import TYPICAL, ModelShape, model_shape
from lorakit.advise.timing import GPUS, init_note, rates_for, time_model
from lorakit.advise.units import available_memory, parse_bytes
from lorakit.advise.workload import auto_device, resolve_workload
from lorakit.config import RunConfig, load_run_config
from lorakit.errors import AdviceError, ModelLoadError


def advise(
    config: RunConfig | str | Path | None = None,
    *,
    model: str | None = None,
    memory: int | str | None = None,
    device: Literal["cuda", "cpu"] | None = None,
    task: str | None = None,
    examples: int | None = None,
    data: str | Path | None = None,
    seq_len: int | None = None,
    serving: Literal["single", "multi"] = "single",
    price_per_hour: float | None = None,
    gpu: str | None = None,
    calibrate_now: bool = True,
) -> Advice:
    """Recommend a run and predict its memory and time.

    Given `config` (a RunConfig or a YAML path), the prediction is for that exact run and the
    recommendations say what to change. Without one, the recommendations build the config (from
    `model`, `task`, the data size and the memory) and the prediction is for it. `gpu` names a GPU
    that is not on this machine ('RTX 4090', see GPUS) for its memory and datasheet rates;
    `calibrate_now=False` never measures (uses a cached calibration or assumed rates)."""
    given = config is not None
    config = _start_config(config, model, seq_len, data)
    if gpu is not None and gpu not in GPUS:
        raise AdviceError(f"gpu {gpu!r} is not one of: {', '.join(GPUS)}")
    dev = device or ("cuda" if gpu else auto_device(config.train.device).split(":")[0])
    available = parse_bytes(memory) if memory is not None else (GPUS[gpu][0] if gpu else available_memory(dev))
    shape = model_shape(config.base_model, config.task, config.revision)
    notes: list[str] = []
    stats = _stats(config, shape, examples, tokenize=given, notes=notes)
    n_examples = examples if examples is not None else (stats.examples if stats else None)
    if not given:
        _fill_model_and_length(config, shape, model, seq_len, stats, notes)
    widest = stats.longest_row if stats else None  # tokens per row of the widest micro-batch, when tokenized
    recs = recommend(config, shape, available, dev, task, n_examples, serving, given, seq_len=widest)
    w = resolve_workload(config, shape, dev, seq_len=widest)
    mem = memory_model(w, shape)
    rates = rates_for(dev, config, gpu, calibrate_now)
    # NOTE: step time at the widest batch too: an upper bound when rows are padded to different widths
    tm = time_model(w, shape, rates)
    steps_per_epoch, total = _steps(config, n_examples, stats)
    evals = eval_time(config, w, shape, rates, _eval_rows(config, n_examples),
                      round(stats.mean_tokens) if stats and stats.mean_tokens else None, total, steps_per_epoch)
    notes += notes_for(w, shape, mem, available, dev)
    notes += init_note(w, shape, rates)
    if rates.get("other_load", 0) > 0.1:
        notes.append(f"the time calibration ran while other processes used {rates['other_load']:.0%} of the CPUs: "
                     "step times are overestimated; rerun lorakit.advise.calibrate(force=True) on a quiet machine")
    return Advice(shape, config, dev, available, mem, tm, recs, notes, n_examples, steps_per_epoch, total, price_per_hour,
                  evals)


def _eval_rows(config: RunConfig, train_examples: int | None) -> int | None:
    """Eval examples: counted in data.eval's file when it is here, else the split-off share (train examples are
    what is left after the split)."""
    if config.data.eval is not None:
        path = Path(config.data.eval)
        return data_stats(path, config.data.format, config.task).examples if path.exists() else None
    f = config.data.eval_fraction
    return None if train_examples is None else math.ceil(train_examples * f / (1 - f))


def _start_config(config: RunConfig | str | Path | None, model: str | None, seq_len: int | None,
                  data: str | Path | None) -> RunConfig:
    """A copy of the given config (or the defaults) with the call's overrides applied."""
    if isinstance(config, (str, Path)):
        config = load_run_config(config)
    if config is None and model is None:
        raise AdviceError("pass a run config or a model (hub id, directory, family like llama-3-8b, or size like 8B)")
    config = copy.deepcopy(config) if config is not None else RunConfig()
    if model is not None:
        config.base_model = model
    if seq_len is not None:
        config.data.max_seq_len = seq_len
    if data is not None:
        config.data.train = str(data)
    return config


def _stats(config: RunConfig, shape: ModelShape, examples: int | None, tokenize: bool,
           notes: list[str]) -> DataStats | None:
    """The training data's statistics when its files are here (and `examples` was not given): tokenized
    through the data pipeline for a given config whose tokenizer loads, else estimated from the text."""
    path = config.data.train
    if path is None or examples is not None or not Path(path).exists():
        return None
    if tokenize and not shape.source.startswith(TYPICAL):
        try:
            stats = run_data_stats(config)
        except ModelLoadError as e:
            notes.append(f"data lengths estimated at {CHARS_PER_TOKEN} characters/token: {e}")
        else:
            packed = f" packed into {stats.rows:,} rows" if config.data.packing and config.task == "causal_lm" else ""
            notes.append(f"data: {stats.examples:,} training examples (after dedup and the eval split){packed}, the "
                         f"widest {stats.longest_row} tokens: memory and time are predicted at micro-batches of "
                         f"{stats.longest_row} tokens per row, not data.max_seq_len {config.data.max_seq_len}")
            return stats
    return data_stats(path, config.data.format, config.task)


def _fill_model_and_length(config: RunConfig, shape: ModelShape, model: str | None, seq_len: int | None,
                           stats: DataStats | None, notes: list[str]) -> None:
    """Without a config: a real hub id for a family or size, and max_seq_len from the data's lengths."""
    family = shape.source.removeprefix(TYPICAL)
    if family in HUB_IDS and "/" not in config.base_model:
        config.base_model = HUB_IDS[family]
        notes.append(f"base_model {config.base_model}: a representative {family} checkpoint for {model!r}; "
                     "put the one you mean in the config")
    if seq_len is None and stats and stats.p95_tokens:
        config.data.max_seq_len = max(64, min(8192, 2 ** math.ceil(math.log2(stats.p95_tokens))))
        notes.append(f"data.max_seq_len {config.data.max_seq_len}: the next power of two above the 95th-percentile "
                     f"length (~{stats.p95_tokens} tokens at {CHARS_PER_TOKEN} characters/token)")


def _steps(config: RunConfig, examples: int | None, stats: DataStats | None) -> tuple[int | None, int | None]:
    """(steps per epoch, total steps). From the exact rows when the data was tokenized (as
    lorakit.train.total_steps counts: ⌈rows / micro-batch⌉ micro-batches per epoch, grad_accum per step),
    else from the example count, less the eval share, packed by the mean length."""
    tc = config.train
    if stats is not None and stats.rows is not None:
        micro_batches = math.ceil(stats.rows / tc.micro_batch_size)
        per_epoch = max(1, math.ceil(micro_batches / tc.grad_accum))
        return per_epoch, tc.max_steps or max(1, math.ceil(tc.epochs * micro_batches / tc.grad_accum))
    per_step = tc.micro_batch_size * tc.grad_accum
    rows = examples
    if examples is not None and config.data.packing and stats and stats.mean_tokens:
        rows = math.ceil(examples * min(stats.mean_tokens, config.data.max_seq_len) / config.data.max_seq_len)
    if rows is not None:
        rows = math.ceil(rows * (1 - (config.data.eval_fraction if config.data.eval is None else 0)))
    per_epoch = None if rows is None else max(1, math.ceil(rows / per_step))
    if tc.max_steps:
        return per_epoch, tc.max_steps
    return per_epoch, None if per_epoch is None else max(1, math.ceil(tc.epochs * per_epoch))
