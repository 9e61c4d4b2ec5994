"""Load a base model: `load_base` is the one loader every command uses (train, eval, serve, merge, generate).

    load_base(name) = tokenizer + model in the compute dtype on the device
                      [+ NF4 4-bit linears when `quant` is given] [+ a saved adapter]

`base_model` goes to transformers' `from_pretrained`, which reads a local directory or downloads from the
hub -- the same code path either way, so tests cover it with local directories. (The built-in demo is an
application of the library: entry points turn `base_model: demo` into its directory before calling here.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.adapters import adapter_num_labels, load_lora_adapter
from lorakit.config import QuantConfig
from lorakit.errors import ModelLoadError
from lorakit.quant.stream import load_quantized_model
from lorakit.runtime.devices import pick_matmul_dtype

log = logging.getLogger(__name__)




def _check_model_dir(base_model: str) -> None:
    """A local path must be a model directory: say so before transformers blames the tokenizer or sentencepiece
    (a tokenizer alone loads without config.json, so load_tokenizer asks only once it has failed)."""
    path = Path(base_model)
    if path.is_file():
        raise ModelLoadError(f"base_model {base_model!r} is a file; point it at a model directory (config.json, "
                             "*.safetensors, tokenizer files) or a hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise ModelLoadError(f"base_model {base_model!r} has no config.json (found: {found or 'nothing'}); point it "
                             "at a transformers model directory (config.json, *.safetensors, tokenizer files)")


def load_tokenizer(base_model: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    path = base_model
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        _check_model_dir(path)
        raise ModelLoadError(_not_found(base_model, "tokenizer", e)) from None
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked out of attention and loss, so reusing EOS is safe here;
        # the data pipeline keeps the EOS the model must learn supervised even when pad == eos.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    base_model: str,
    task: Literal["causal_lm", "seq_cls"] = "causal_lm",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    num_labels: int | None = None,
) -> nn.Module:
    """A transformers model in `dtype` on `device`, in eval mode (training turns train mode on)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = base_model
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision}
    if task == "seq_cls" and num_labels:
        kwargs["num_labels"] = num_labels
    _check_model_dir(path)
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found(base_model, "model", e)) from None
    _default_pad_token(model, task)
    return model.to(device).eval()


def _default_pad_token(model: nn.Module, task: str) -> None:
    """A classifier pools the last non-pad token, so it needs a pad id; EOS stands in (as in training)."""
    if task == "seq_cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id


def _not_found(base_model: str, what: str, error: Exception) -> str:
    if Path(base_model).exists():
        return f"base_model {base_model!r}: could not load the {what} from this directory ({error})"
    return (
        f"base_model {base_model!r} is not a local directory and could not be loaded from the hub ({error}). "
        "Check the name, log in with `hf auth login` for gated models, or pass a local directory; "
        "offline, use base_model: demo."
    )


def load_dtype(method: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the weights are loaded in: the compute dtype, except full fine-tuning on a CPU, whose
    trainable weights stay fp32 masters (AdamW updates in 16 bits lose most small steps)."""
    if method == "full" and dtype != torch.float32 and torch.device(device).type == "cpu":
        return torch.float32
    return dtype


def load_base(
    base_model: str,
    *,
    task: Literal["causal_lm", "seq_cls"] = "causal_lm",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    num_labels: int | None = None,
    quant: QuantConfig | None = None,
    adapter: str | Path | None = None,
    progress: bool = False,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer): the base in `dtype` on `device`, eval mode; its linears in NF4 when `quant` is
    given (QLoRA, `serve --quant nf4`; their matmuls in `quant.compute_dtype`, see `pick_matmul_dtype`);
    a saved PEFT-format `adapter` directory attached when given."""
    tokenizer = load_tokenizer(base_model, revision)
    if task == "seq_cls" and num_labels is None and adapter is not None:  # the head the adapter was trained with
        num_labels = adapter_num_labels(adapter)
    if quant is None:
        model = load_model(base_model, task, dtype, device, revision, num_labels)
    else:  # quantized while loading: the full-precision model never exists (peak ≈ 4-bit model + one tensor)
        matmul = pick_matmul_dtype(quant.compute_dtype, device, dtype)
        model = load_quantized_model(base_model, task, quant, dtype, device, num_labels, revision, progress=progress,
                                     matmul_dtype=matmul)
        _default_pad_token(model, task)
    if adapter is not None:
        load_lora_adapter(model, adapter)
    return model.eval(), tokenizer  # eval again: the adapter's layers (dropout) came in train mode
