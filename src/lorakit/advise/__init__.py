"""Advisor: what to run, whether it fits, and how long it takes -- before any weight is loaded.

Everything comes from the model's shapes (config.json only; a `meta`-device model, no weights). One
module per step, each importing only the ones above it in this list:

    units       byte sizes and durations; the memory this machine has
    families    typical shapes of named model families ('llama-3-8b', '8B')
    shapes      ModelShape: a model's layers and sizes, read from its config
    workload    Workload: a RunConfig resolved as lorakit.train runs it (dtypes, tokens, targets)
    memory      the memory terms and the peak over the phases of a run
    timing      calibrated rates and the time model
    eval_timing the evals during training: loss, generation and canary (eval.every_eval)
    data_stats  the training data's size and lengths
    recommend   the decision tables and the search for a setting that fits
    check       check_fits: the pre-train memory check
    report      Advice: the result, as text, JSON and YAML
    advisor     advise(): ties them together
"""

from lorakit.advise.advisor import advise
from lorakit.advise.check import check_fits
from lorakit.advise.data_stats import DataStats, data_stats, run_data_stats
from lorakit.advise.families import FAMILIES, HUB_IDS, SIZES, family_config
from lorakit.advise.memory import (
    CPU_BASELINE_BYTES,
    CPU_HEAP_SLACK,
    CPU_PLOT_BYTES,
    CUDA_ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    MemoryBreakdown,
    MemoryTerm,
    activation_bytes,
    layer_activation_bytes,
    load_bytes,
    lora_parameter_count,
    memory_model,
    nf4_bytes,
    optimizer_state_bytes,
    qlora_load_parts,
    weight_bytes,
)
from lorakit.advise.recommend import (
    Fit,
    Recommendation,
    dropout_by_examples,
    epochs_by_examples,
    method_by_memory,
    rank_by_task,
    search_fit,
    target_effective_batch,
)
from lorakit.advise.report import Advice
from lorakit.advise.shapes import Linear, ModelShape, meta_model, model_shape
from lorakit.advise.timing import GPUS, TimeModel, assumed_gpu_rates, calibrate, matmul_rate, time_model
from lorakit.advise.units import GiB, MiB, available_memory, fmt_bytes, fmt_seconds, parse_bytes
from lorakit.advise.workload import Workload, resolve_workload

__all__ = [
    "CPU_BASELINE_BYTES", "CPU_HEAP_SLACK", "CPU_PLOT_BYTES", "CUDA_ALLOCATOR_SLACK", "CUDA_CONTEXT_BYTES",
    "FAMILIES", "GPUS", "HUB_IDS", "SIZES", "Advice", "DataStats", "Fit", "GiB", "Linear",
    "MemoryBreakdown", "MemoryTerm", "MiB", "ModelShape", "Recommendation", "TimeModel", "Workload",
    "activation_bytes", "advise", "assumed_gpu_rates", "available_memory", "calibrate", "check_fits",
    "data_stats", "dropout_by_examples", "epochs_by_examples", "family_config", "fmt_bytes", "fmt_seconds",
    "layer_activation_bytes", "load_bytes", "lora_parameter_count", "matmul_rate", "memory_model", "meta_model",
    "method_by_memory", "model_shape", "nf4_bytes", "optimizer_state_bytes", "parse_bytes", "qlora_load_parts",
    "rank_by_task", "resolve_workload", "run_data_stats", "search_fit", "target_effective_batch", "time_model",
    "weight_bytes",
]
