"""lorakit: LoRA and QLoRA fine-tuning that agrees with PEFT and bitsandbytes, fast on CPU and GPU.

The pipelines as calls (what `lorakit train/eval/generate/merge` run):

    import lorakit
    result = lorakit.train_lora("my-run.yaml", ["train.lr=1e-4"])      # -> TrainResult (run dir, adapter, summary)
    report = lorakit.evaluate("my-run.yaml")                           # -> EvalReport (base vs tuned)
    text = lorakit.generate_text("./base", "Hi!", adapter=result.adapter_dir)
    lorakit.merge("./base", result.adapter_dir, "merged/")             # standard transformers checkpoint

and the building blocks: `inject_lora`, `save_lora_adapter` / `load_lora_adapter` (PEFT format), `quantize_model`
(NF4), `load_base`. Every user mistake raises a `LorakitError` whose message says what to do.
"""

from lorakit.adapters import (
    export_merged,
    load_lora_adapter,
    lorakit_version,
    save_lora_adapter,
)
from lorakit.advise import advise
from lorakit.api import evaluate, generate_text, merge, train_lora
from lorakit.config import LoraConfig, QuantConfig, RunConfig, load_run_config
from lorakit.errors import (
    AdapterError,
    AdviceError,
    ConfigError,
    DataError,
    LorakitError,
    ModelLoadError,
    OutputError,
    TrainingError,
)
from lorakit.lora import (
    LoraLinear,
    adapter_rows,
    adapters_disabled,
    count_parameters,
    inject_lora,
    merge_lora_weights,
    parameter_report,
    set_adapter,
    unmerge_lora_weights,
)
from lorakit.models import load_base
from lorakit.quant import NF4Linear, quantize_model

__version__ = lorakit_version()

__all__ = [
    "AdapterError", "AdviceError", "ConfigError", "DataError", "LoraConfig", "LoraLinear", "LorakitError",
    "ModelLoadError", "NF4Linear", "OutputError", "QuantConfig", "RunConfig", "TrainingError", "__version__",
    "adapter_rows", "adapters_disabled", "advise", "count_parameters", "evaluate", "export_merged",
    "generate_text", "inject_lora", "load_base", "load_lora_adapter", "load_run_config", "merge",
    "merge_lora_weights", "parameter_report", "quantize_model", "save_lora_adapter", "set_adapter",
    "train_lora", "unmerge_lora_weights",
]
