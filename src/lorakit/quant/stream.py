"""Quantize while loading: a QLoRA base that never exists in 16 or 32 bits.

    1. build the model from its config.json with every *parameter* on the meta device (no memory);
       buffers are built for real, so non-persistent ones (rotary inv_freq) hold their true values
    2. mark the layers `quantize_model` would quantize (every nn.Linear / Conv1D but the heads and
       `quant.skip_modules`)
    3. read the checkpoint tensor by tensor, in file order (quant/safetensors_io.py, no mmap):
         a target weight  ->  to device, to compute dtype, quantize_nf4  ->  NF4Linear; dropped
         anything else    ->  to device, in its storage dtype (below)    ->  the model's parameter
    4. tie shared parameters, check nothing is left on meta, eval mode

Peak memory of the load (`streamed_load_peak_bytes`, for the advisor):

    peak ≈ baseline + Σ_targets nf4(n) + Σ_others n·b_storage + max_targets n·b_ckpt + QUANT_CHUNK·20 B
    nf4(n) = ⌈n/2⌉ + ⌈n/64⌉ + 4·⌈n/16384⌉ + 4          codes, 8-bit scales, fp32 scales, offset

The target weights are read, one at a time, into a single reused buffer (max_targets n·b_ckpt) and
quantized 2M weights at a time (QUANT_CHUNK: ~20 bytes per weight of temporaries); other tensors are
read into the memory they keep. Measured (bench/bench_big.py, VmHWM, imports ~0.24 GiB included):
0.97B Llama 1.20 GiB for 0.71 GiB of weights (transformers + bitsandbytes: 3.66 GiB); Llama-3-8B shape
5.95 GiB for 5.31 GiB (the formula: 5.70 GiB with 0.24 GiB of imports).

Storage dtypes of what is not quantized (`storage_dtype=None`):
- input embeddings and the output head (2-D, vocabulary-sized: the bulk of what is not quantized)
  keep the checkpoint's dtype (bf16 -> 2 B/weight) and compute in the compute dtype: an embedding's
  output is cast by a forward hook (exact: a gather commutes with the cast), the head becomes a
  `CastLinear`, which casts its weight at use (the chunked loss upcasts it once per step);
- everything else (norm weights, biases, non-target linears such as a classifier head) is small
  and is stored in the compute dtype, so that every op sees one dtype.
`storage_dtype=<dtype>` stores embeddings and head in that dtype instead (compute dtype: exactly
what load-then-`quantize_model` gives). Values are bit for bit those of load-then-quantize either
way, since bf16/fp16 -> fp32 is exact.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.config import QuantConfig
from lorakit.errors import ModelLoadError
from lorakit.quant.linear import CastLinear, NF4Linear, quant_targets
from lorakit.quant.nf4 import QUANT_CHUNK, quantize_nf4
from lorakit.quant.safetensors_io import CheckpointError, CheckpointFiles, TensorInfo, read_tensor

LEGACY_RENAMES = [(r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias")]


@dataclass
class StreamedLoad:
    """What `load_quantized_model` did, for the parameter report and the advisor (bytes as stored)."""

    quantized: list[str] = field(default_factory=list)  # module names now NF4Linear
    nf4_bytes: int = 0  # packed codes + scales of every NF4Linear
    other_bytes: int = 0  # every other parameter and buffer (tied ones once)
    storage: dict[str, str] = field(default_factory=dict)  # parameter name -> dtype, for those not in compute
    compute_dtype: str = "float32"
    matmul_dtype: str = "float32"  # what the NF4 layers decode to for their matmuls
    largest_tensor_bytes: int = 0  # in the checkpoint
    ignored_keys: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for


def load_quantized_model(
    path_or_dir: str | Path,
    task: Literal["causal_lm", "seq_cls"] = "causal_lm",
    quant_config: QuantConfig | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_labels: int | None = None,
    revision: str | None = None,
    storage_dtype: torch.dtype | None = None,
    progress: bool = False,
    matmul_dtype: torch.dtype | None = None,
) -> nn.Module:
    """A transformers model with NF4 target layers, streamed from a safetensors checkpoint (local dir or
    hub id); equal bit for bit to `load_model(..., compute_dtype)` + `quantize_model`. In eval mode, on
    `device`; `model.lorakit_load` is a StreamedLoad. Raises CheckpointError (a ModelLoadError) naming
    the tensor and file when the checkpoint lacks a tensor or holds one of the wrong shape.
    `matmul_dtype`: what the NF4 layers decode to for their matmuls (default: compute_dtype); the codes
    are those of the weight as it would be loaded in compute_dtype either way."""
    quant_config = quant_config or QuantConfig()
    device = torch.device(device)
    checkpoint = CheckpointFiles.open(checkpoint_dir(path_or_dir, revision))
    model = empty_model(checkpoint.directory, task, num_labels, compute_dtype)
    targets, _ = quant_targets(model, quant_config.skip_modules)
    plan = _Plan.make(model, checkpoint, set(targets))
    matmul_dtype = matmul_dtype or compute_dtype
    info = StreamedLoad(compute_dtype=_name(compute_dtype), matmul_dtype=_name(matmul_dtype), ignored_keys=plan.ignored)
    loader = _Loader(model, plan, quant_config, compute_dtype, device, storage_dtype, info, matmul_dtype)
    with torch.no_grad():
        loader.stream(checkpoint, progress)
        loader.finish(checkpoint, task)
    _summarize(model, info)
    model.lorakit_load = info
    return model.eval()


def streamed_load_peak_bytes(nf4_bytes: int, other_bytes: int, largest_target_bytes: int,
                             baseline_bytes: int = 0) -> int:
    """The load-phase peak of `load_quantized_model` (module docstring): the final weights (`StreamedLoad`'s
    nf4_bytes + other_bytes), the reused read buffer (the largest target weight as stored in the checkpoint)
    and one chunk of quantization temporaries, on top of the process's own `baseline_bytes`."""
    return baseline_bytes + nf4_bytes + other_bytes + largest_target_bytes + 20 * QUANT_CHUNK


def checkpoint_dir(path_or_dir: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; a hub id downloaded (config and safetensors files only) into the HF cache."""
    path = Path(path_or_dir)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_dir), revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 -- offline, gated, not found: all end in the same advice
        raise ModelLoadError(
            f"base_model {str(path_or_dir)!r} is not a local directory and could not be downloaded from the hub "
            f"({type(e).__name__}: {e}). Check the name, log in with `hf auth login` for gated models, or pass a "
            "local directory."
        ) from None


def empty_model(directory: Path, task: str, num_labels: int | None, dtype: torch.dtype) -> nn.Module:
    """The model of `directory/config.json` with parameters on meta and buffers real (CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"num_labels": num_labels} if task == "seq_cls" and num_labels else {}
    try:
        config = AutoConfig.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{directory}: could not read config.json ({e})") from None
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    with _parameters_on_meta():
        model = cls.from_config(config, dtype=dtype)
    if task == "seq_cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside goes to the meta device; buffers are left alone.

    Why not `with torch.device("meta")`: buffers computed in __init__ (rotary inv_freq, position ids)
    would be meta too, and they are not in the checkpoint. A parameter is made with torch.empty first,
    whose pages are never touched, so it costs no resident memory before it moves to meta.
    NOTE: patches nn.Module.register_parameter for the duration (as accelerate's init_empty_weights).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass
class _Plan:
    """Checkpoint key -> the model tensors it fills (tied parameters: several names)."""

    sources: dict[str, list[str]]  # checkpoint key -> model names (parameters and persistent buffers)
    expected: dict[str, tuple[int, ...]]  # model name -> shape
    groups: dict[str, list[str]]  # first name of a parameter -> every name it has (ties)
    targets: set[str]  # module names to quantize
    ignored: list[str]

    @classmethod
    def make(cls, model: nn.Module, checkpoint: CheckpointFiles, targets: set[str]) -> _Plan:
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        by_first = {names[0]: names for names in groups.values()}
        alias = {n: names[0] for names in groups.values() for n in names}
        expected = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        expected |= {n: tuple(b.shape) for n, b in _persistent_buffers(model)}
        rename = _renamer(model)
        sources: dict[str, list[str]] = {}
        claimed: set[str] = set()  # first names of the tensors some checkpoint key fills
        ignored = []
        for key in checkpoint.tensors:
            name = rename(key, expected)
            first = None if name is None else alias.get(name, name)
            if first is None or first in claimed:  # unknown, or a tied tensor saved twice (lm_head + embed)
                ignored.append(key)
                continue
            claimed.add(first)
            sources[key] = by_first.get(first, [first])
        return cls(sources, expected, by_first, targets, ignored)


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buf


def _renamer(model: nn.Module):
    """f(checkpoint key, model names) -> model name or None: transformers' plain renames for the model
    type, the legacy LayerNorm gamma/beta, and the base-model prefix added or removed."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    model_type = getattr(model.config, "model_type", "")
    renames = list(LEGACY_RENAMES)
    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        if type(transform).__name__ != "WeightRenaming":
            raise ModelLoadError(
                f"model type {model_type!r}: its checkpoints need transformers' weight conversion "
                f"({type(transform).__name__}: {transform.source_patterns} -> {transform.target_patterns}), which "
                "streamed 4-bit loading does not do. Load it without streaming (load_model + quantize_model)."
            )
        renames += list(zip(transform.source_patterns, transform.target_patterns, strict=True))
    prefix = getattr(model, "base_model_prefix", "")

    def rename(key: str, names: dict[str, Any]) -> str | None:
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        if prefix and key not in names:
            if f"{prefix}.{key}" in names:
                return f"{prefix}.{key}"
            if key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
                return key[len(prefix) + 1:]
        return key if key in names else None

    return rename


class _Loader:
    """Puts each streamed tensor in its place; see the module docstring for the rules."""

    def __init__(self, model, plan, quant_config, compute_dtype, device, storage_dtype, info, matmul_dtype):
        self.model, self.plan, self.qc, self.matmul = model, plan, quant_config, matmul_dtype
        self.compute, self.device, self.storage, self.info = compute_dtype, device, storage_dtype, info
        self.pending_bias: dict[str, torch.Tensor] = {}  # target module -> its bias, read before the weight
        self.read_buffer = torch.empty(0, dtype=torch.uint8)  # reused for every target weight (see place)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.narrow_modules = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding) or m is head}

    def stream(self, checkpoint: CheckpointFiles, progress: bool) -> None:
        from tqdm.auto import tqdm

        keys = [k for k in checkpoint.tensors if k in self.plan.sources]
        for key in tqdm(keys, desc="loading to nf4", unit="tensor", disable=not progress, leave=False):
            tensor_info = checkpoint.tensors[key]
            self.info.largest_tensor_bytes = max(self.info.largest_tensor_bytes, tensor_info.nbytes)
            names = self.plan.sources[key]
            want = self.plan.expected[names[0]]
            if tensor_info.shape != want:
                raise CheckpointError(
                    f"{tensor_info.file}: tensor {key!r} has shape {list(tensor_info.shape)}, but the model built "
                    f"from {checkpoint.directory / 'config.json'} expects {list(want)} for {names[0]!r}. The config "
                    "and the weights do not belong together; download the model again."
                )
            self.place(names, tensor_info)

    def place(self, names: list[str], tensor_info: TensorInfo) -> None:
        """Read one tensor and put it in place. A target weight is read into one buffer reused for all of
        them (freeing a weight-sized block per layer would leave glibc's heap fragmented and resident);
        anything else is read into memory of its own, which it keeps."""
        module_name, _, leaf = names[0].rpartition(".")
        if module_name in self.plan.targets and leaf == "weight":
            if self.read_buffer.numel() < tensor_info.nbytes:
                self.read_buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
                self.read_buffer = torch.empty(tensor_info.nbytes, dtype=torch.uint8)
            self.quantize(module_name, read_tensor(tensor_info, self.read_buffer))
            return
        tensor = read_tensor(tensor_info)
        if module_name in self.plan.targets and leaf == "bias":
            self.set_target_bias(module_name, tensor.to(self.device, self.compute))
            return
        narrow = module_name in self.narrow_modules and tensor.is_floating_point()
        dtype = (self.storage or tensor.dtype) if narrow else self.compute
        value = tensor.to(device=self.device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        _set_tensor(self.model, names, value)

    def quantize(self, module_name: str, weight: torch.Tensor) -> None:
        from transformers.pytorch_utils import Conv1D

        old = self.model.get_submodule(module_name)
        conv1d = isinstance(old, Conv1D)
        # As load-then-quantize sees it: rounded to the compute dtype if that is narrower; an exact upcast
        # (bf16/fp16 -> fp32) is left to quantize_nf4, which upcasts chunk by chunk (no fp32 copy of W).
        exact = self.compute == torch.float32 or weight.dtype == self.compute
        weight = weight.to(self.device, weight.dtype if exact else self.compute)
        state = quantize_nf4(weight.T if conv1d else weight, self.qc.blocksize, self.qc.double_quant)
        del weight
        layer = NF4Linear(state, None, self.matmul, conv1d=conv1d)
        if old.bias is not None:
            layer.bias = old.bias  # still meta unless read already; set_target_bias fills it
        bias = self.pending_bias.pop(module_name, None)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, layer)
        self.info.quantized.append(module_name)

    def set_target_bias(self, module_name: str, bias: torch.Tensor) -> None:
        layer = self.model.get_submodule(module_name)
        if isinstance(layer, NF4Linear):
            layer.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.pending_bias[module_name] = bias

    def finish(self, checkpoint: CheckpointFiles, task: str) -> None:
        """Heads new to the task initialized, missing tensors refused, head/embedding casts set up."""
        self._init_new_task_heads(task)
        missing = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise CheckpointError(
                f"{checkpoint.where(missing[0])}: the checkpoint has no tensor {missing[0]!r}"
                + (f" (nor {len(missing) - 1} others, e.g. {missing[1:4]})" if len(missing) > 1 else "")
                + f", which the model built from {checkpoint.directory / 'config.json'} needs. The download is "
                "incomplete or the config does not belong to these weights; download the model again."
            )
        self.model.to(self.device)  # the buffers built on the CPU (parameters are there already)
        self._cast_at_use()

    def _init_new_task_heads(self, task: str) -> None:
        """A classification head on a causal-LM checkpoint is new: initialized as transformers does."""
        prefix = getattr(self.model, "base_model_prefix", "")
        if task == "causal_lm" or not prefix:
            return
        for name, module in self.model.named_modules():
            params = list(module.parameters(recurse=False))
            if params and not name.startswith(prefix) and all(p.device.type == "meta" for p in params):
                module.to_empty(device=self.device, recurse=False)
                module.to(self.compute)
                self.model._init_weights(module)

    def _cast_at_use(self) -> None:
        """Embeddings stored narrower than the compute dtype give their output in the compute dtype;
        such a head becomes a CastLinear (same parameters, so ties survive)."""
        for name in sorted(self.narrow_modules):
            module = self.model.get_submodule(name)
            weight = getattr(module, "weight", None)
            if weight is None or weight.dtype == self.compute or not weight.is_floating_point():
                continue
            self.info.storage[f"{name}.weight"] = str(weight.dtype).removeprefix("torch.")
            if isinstance(module, nn.Embedding):
                module.register_forward_hook(functools.partial(_output_to, dtype=self.compute))
            elif type(module) is nn.Linear:
                module.__class__ = CastLinear  # NOTE: same object, parameters and ties; only forward changes
            else:
                raise ModelLoadError(f"{name} ({type(module).__name__}) cannot compute in {self.compute} from "
                                     f"{weight.dtype} storage; pass storage_dtype={self.compute}")


def _output_to(module: nn.Module, args: Any, output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return output.to(dtype)


def _set_tensor(model: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Put `value` under every name of one tensor: one nn.Parameter shared by all (ties stay ties)."""
    module_name, _, leaf = names[0].rpartition(".")
    old = model.get_submodule(module_name)._parameters.get(leaf)
    value = value if old is None else nn.Parameter(value, requires_grad=old.requires_grad)
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        (module._parameters if old is not None else module._buffers)[leaf] = value


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_report(model: nn.Module) -> str | None:
    """One line on where a 4-bit model keeps what, or None without NF4 layers: the NF4 layers, their
    footprint and matmul dtype, and the weights kept in another dtype than the rest (a streamed load's
    bf16 embeddings and head beside an fp32 model)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not layers:
        return None
    nf4 = sum(t.numel() * t.element_size() for m in layers for t in m.buffers())  # codes and scales
    matmul = ", ".join(sorted({_name(m.compute_dtype) for m in layers}))
    stored = getattr(getattr(model, "lorakit_load", None), "storage", {})  # parameter name -> dtype
    rest = {_name(p.dtype) for n, p in model.named_parameters() if p.is_floating_point() and n not in stored}
    kept = "; kept as stored: " + ", ".join(f"{k} {v}" for k, v in sorted(stored.items())) if stored else ""
    return (f"4-bit base: {len(layers)} NF4 layers, {nf4 / 2**30:.2f} GiB, matmuls in {matmul}{kept}; "
            f"everything else in {', '.join(sorted(rest)) or matmul}")


def _summarize(model: nn.Module, info: StreamedLoad) -> None:
    seen: set[int] = set()
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            if isinstance(module, NF4Linear) and t is not module.bias:
                info.nf4_bytes += nbytes
            else:
                info.other_bytes += nbytes
