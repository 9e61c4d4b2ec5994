"""Merge a LoRA/QLoRA adapter into its base and write a standard checkpoint, one tensor at a time.

For every adapted layer (A: (r, in), B: (out, r), s = alpha/r, or alpha/√r with rsLoRA):

    base="full":  W' = round_d(W + s·B A)                 W as stored in the base checkpoint (dtype d)
    base="nf4":   W' = round_d(deq(NF4(W)) + s·B A)       the 4-bit weight the QLoRA adapter was trained on;
                                                          every layer quantize_model would quantize is
                                                          replaced by deq(NF4(W)), adapted or not
    DoRA (m):     s·B A is replaced by m/n ⊙ (W + s·BA) − W, n = ‖W + s·BA‖_row (lorakit.dora.merge_update),
                  with W the full or the dequantized 4-bit weight as above

the sum taken in fp32, rounded once to the base tensor's dtype d -- the arithmetic of the in-memory
`lorakit.lora.merge_lora_weights` (tested equal bit for bit). Conv1D weights are stored (in, out):
the update is transposed. Modules trained in full (modules_to_save) replace the base's tensors.

The output has the base's layout: the same shard files, tensor names, dtypes and shapes (plus an extra
shard for a trained module the base lacks, e.g. a new classification head), the base's config and
tokenizer files, and is written into a temp directory renamed into place at the end. Each output
shard's header is known before its data (the layout does not change), so every tensor is read,
merged and appended to its file, then dropped:

    peak ≈ adapter + one base tensor · (1 + 4/b_d + 4/b_d)    read, fp32 sum, fp32 delta
           (nf4: + the NF4 round trip of that tensor, ~13 bytes per weight)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch

from lorakit.adapters import CONFIG_FILE, read_adapter_config, read_adapter_tensors, split_adapter_keys
from lorakit.config import LoraConfig, QuantConfig
from lorakit.dora import merge_update
from lorakit.errors import AdapterError
from lorakit.quant.linear import quant_targets
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4
from lorakit.quant.safetensors_io import (
    INDEX_NAME,
    CheckpointFiles,
    SafetensorsWriter,
    read_header,
    read_tensor,
)
from lorakit.quant.stream import checkpoint_dir, empty_model
from lorakit.runtime.outdir import check_output_dir, output_errors, replace_files

EXTRA_SHARD = "model-lorakit-trained.safetensors"  # modules trained in full that the base does not have


def merge_adapter_streaming(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: Literal["full", "nf4"] = "full",
    quant_config: QuantConfig | None = None,
    task: Literal["causal_lm", "seq_cls"] = "causal_lm",
    revision: str | None = None,
    force: bool = False,
) -> Path:
    """Write base + adapter as a transformers checkpoint in `out_dir` (atomically) and return it.

    base_dir: a local safetensors checkpoint or a hub id. base="nf4" merges into the dequantized 4-bit
    weights (`quant_config`, default QuantConfig(), must be the one used in training) -- what the
    QLoRA-trained model computed with; "full" into the full-precision weights. A non-empty `out_dir` is
    refused unless `force`; then only the files written here are replaced (lorakit.runtime.outdir)."""
    check_output_dir(out_dir, force)
    base_path = checkpoint_dir(base_dir, revision)
    checkpoint = CheckpointFiles.open(base_path)
    updates = _adapter_updates(Path(adapter_dir))
    full = updates.pop("__full__")
    quantized, conv1d = _weight_kinds(base_path, task, quant_config or QuantConfig())
    quantized = quantized if base == "nf4" else set()
    unknown = sorted(set(updates) - {k.removesuffix(".weight") for k in checkpoint.tensors})
    if unknown:
        raise AdapterError(
            f"adapter {adapter_dir} adapts {unknown[:5]}, which {base_path} has no '.weight' tensor for: "
            "the adapter was trained for another base model"
        )
    with output_errors(out_dir, "--out"), replace_files(out_dir) as tmp:
        _copy_side_files(base_path, tmp)
        for file in dict.fromkeys(info.file for info in checkpoint.tensors.values()):
            _write_shard(file, tmp / file.name, updates, full, (quantized, conv1d), quant_config or QuantConfig())
        extra = {k: v for k, v in full.items() if k not in checkpoint.tensors}
        if extra:
            _write_extra(checkpoint, tmp, extra)
    return Path(out_dir)


def _adapter_updates(adapter_dir: Path) -> dict:
    """{module: (A, B, scaling)} plus "__full__": {tensor name: tensor} for modules trained in full."""
    config = read_adapter_config(adapter_dir, allow_dora=True)
    lora, full = split_adapter_keys(read_adapter_tensors(adapter_dir), adapter_dir)
    scaling = LoraConfig(
        r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)), use_rslora=bool(config.get("use_rslora"))
    ).scaling
    for module, parts in lora.items():
        if parts["A"].shape[0] != int(config.get("r", 8)):
            raise AdapterError(f"{adapter_dir / CONFIG_FILE}: r={config.get('r')} but {module}.lora_A has rank "
                               f"{parts['A'].shape[0]}; the config and the weights do not belong together")
        if bool(config.get("use_dora")) != ("m" in parts):
            raise AdapterError(f"{adapter_dir}: use_dora is {bool(config.get('use_dora'))} in {CONFIG_FILE} but {module} "
                               f"{'has' if 'm' in parts else 'lacks'} a lora_magnitude_vector; the files do not belong together")
    return {**{m: (p["A"], p["B"], scaling, p.get("m")) for m, p in lora.items()}, "__full__": full}


def _weight_kinds(base_path: Path, task: str, quant_config: QuantConfig) -> tuple[set[str], set[str]]:
    """(weights `quantize_model` would quantize, weights of GPT-2 Conv1D layers), as tensor names, read
    from the model built on meta (no memory)."""
    from transformers.pytorch_utils import Conv1D

    model = empty_model(base_path, task, None, torch.float32)
    targets, _ = quant_targets(model, quant_config.skip_modules)
    conv1d = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}
    return {f"{t}.weight" for t in targets}, conv1d


def _merged(name: str, tensor: torch.Tensor, updates: dict, kinds: tuple[set[str], set[str]],
            quant_config: QuantConfig) -> torch.Tensor:
    """The output value of base tensor `name`; see the module docstring for the maths."""
    quantized, conv1d = kinds
    update = updates.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
    if update is None and name not in quantized:
        return tensor
    weight = tensor.T if name in conv1d else tensor  # (out, in)
    if name in quantized:
        state = quantize_nf4(weight, quant_config.blocksize, quant_config.double_quant)
        weight = dequantize_nf4(state, torch.float32)  # (out, in) fp32
    else:
        weight = weight.float()
    if update is not None:
        A, B, scaling, magnitude = update
        if magnitude is None:
            weight = weight + (B.float() @ A.float()) * scaling  # (out, r) @ (r, in), as LoraLinear.delta_weight
        else:  # DoRA, as LoraLinear.merge_delta
            weight = weight + merge_update(weight, A, B, magnitude, scaling)[0]
    weight = weight.to(tensor.dtype)
    return (weight.T if name in conv1d else weight).contiguous()


def _write_shard(src: Path, dst: Path, updates: dict, full: dict, kinds: tuple[set[str], set[str]],
                 quant_config: QuantConfig) -> None:
    header = read_header(src)
    layout = [(name, info.dtype, info.shape) for name, info in header.items()]
    with SafetensorsWriter(dst, layout, {"format": "pt"}) as out:
        for name, info in header.items():
            if name in full:
                value = full[name].to(info.dtype)
                if tuple(value.shape) != info.shape:
                    raise AdapterError(f"adapter tensor {name!r} has shape {tuple(value.shape)}, {src} {info.shape}")
            else:
                value = _merged(name, read_tensor(info), updates, kinds, quant_config)
            out.write(name, value)
            del value


def _write_extra(checkpoint: CheckpointFiles, tmp: Path, extra: dict[str, torch.Tensor]) -> None:
    """Trained modules the base lacks: one more shard (in the dtype of the base's largest tensor, as the
    in-memory merge casts them to the model's dtype), and an index that names it."""
    largest = max(checkpoint.tensors.values(), key=lambda info: info.nbytes)
    extra = {k: t.to(largest.dtype) if t.is_floating_point() else t for k, t in extra.items()}
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in extra.items()]
    with SafetensorsWriter(tmp / EXTRA_SHARD, layout, {"format": "pt"}) as out:
        for name, tensor in extra.items():
            out.write(name, tensor)
    weight_map = {name: info.file.name for name, info in checkpoint.tensors.items()} | dict.fromkeys(extra, EXTRA_SHARD)
    total = sum(info.nbytes for info in checkpoint.tensors.values()) + sum(t.numel() * t.element_size() for t in extra.values())
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _copy_side_files(base_path: Path, tmp: Path) -> None:
    """config.json, the index, tokenizer and generation files: everything but the weights themselves."""
    for file in base_path.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and not file.name.startswith("."):
            shutil.copy2(file, tmp / file.name)
