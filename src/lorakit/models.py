"""Load a transformers model and tokenizer from a hub id or a local directory.

`base_model: demo` resolves to the built-in tiny Llama (built once, cached) so that the quickstart
runs offline. Any other value goes to transformers' `from_pretrained`, which reads a local directory
or downloads from the hub -- the same code path either way, so tests cover it with local directories.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.errors import ModelLoadError

log = logging.getLogger(__name__)




def resolve_base(base_model: str) -> str:
    """'demo' -> the cached built-in demo model directory (built on first use); else unchanged."""
    if base_model == "demo":
        from lorakit.demo import ensure_demo_model

        return str(ensure_demo_model())
    return base_model


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

    path = resolve_base(base_model)
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

    path = resolve_base(base_model)
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision}
    if task == "seq_cls" and num_labels:
        kwargs["num_labels"] = num_labels
    _check_model_dir(path)
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found(base_model, "model", e)) from None
    if task == "seq_cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device).eval()


def _not_found(base_model: str, what: str, error: Exception) -> str:
    if Path(base_model).exists():
        return f"base_model {base_model!r}: could not load the {what} from this directory ({error})"
    return (
        f"base_model {base_model!r} is not a local directory and could not be loaded from the hub ({error}). "
        "Check the name, log in with `hf auth login` for gated models, or pass a local directory; "
        "offline, use base_model: demo."
    )
