"""lorakit: LoRA and QLoRA fine-tuning that agrees with PEFT and bitsandbytes, fast on CPU and GPU."""

__version__ = "0.1.0"

from lorakit.adapters import (  # noqa: E402
    AdapterError,
    export_merged,
    load_lora_adapter,
    save_lora_adapter,
)
from lorakit.advise import AdviceError, advise  # noqa: E402
from lorakit.config import ConfigError, LoraConfig, QuantConfig, RunConfig, load_run_config  # noqa: E402
from lorakit.lora import (  # noqa: E402
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
from lorakit.quant import NF4Linear, quantize_model  # noqa: E402

__all__ = [
    "AdapterError",
    "AdviceError",
    "ConfigError",
    "LoraConfig",
    "LoraLinear",
    "NF4Linear",
    "QuantConfig",
    "RunConfig",
    "__version__",
    "adapter_rows",
    "adapters_disabled",
    "advise",
    "count_parameters",
    "export_merged",
    "inject_lora",
    "load_lora_adapter",
    "load_run_config",
    "merge_lora_weights",
    "parameter_report",
    "quantize_model",
    "save_lora_adapter",
    "set_adapter",
    "unmerge_lora_weights",
]
