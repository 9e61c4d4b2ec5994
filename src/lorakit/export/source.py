"""What an export reads: the base checkpoint, streamed tensor by tensor, and the adapter beside it.

    RUN_OR_ADAPTER is one of
      run dir       config.yaml + adapter/    LoRA/QLoRA run; the base is config.yaml's base_model
                    config.yaml + model/      full fine-tuning; model/ is exported as it is
      adapter dir   adapter_config.json + adapter_model.safetensors (+ lorakit.json naming the base)
      model dir     config.json + *.safetensors, exported as it is (a merged or a plain model)

The base is always read from its own checkpoint in its stored 16/32-bit dtype. A QLoRA adapter was
trained against NF4 codes of those weights, but it merges into the originals, W' = W + s·BA: merging
into dequantized 4-bit weights would bake the quantization error into a full-precision file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters import (
    CONFIG_FILE,
    META_FILE,
    AdapterError,
    base_fingerprint,
    read_adapter_config,
    read_adapter_tensors,
    read_chat_template,
    read_metadata,
    split_adapter_keys,
)
from lorakit.dora import merge_update
from lorakit.errors import ExportError

# --------------------------------------------------------------------------- the base checkpoint


class BaseCheckpoint:
    """The base model's tensors by name, read one at a time from its safetensors files.

    Each read copies one tensor from the file into fresh memory (plain reads, no mmap), so after it is
    written and dropped nothing of the checkpoint stays resident: the peak is one tensor, not the model
    (an mmap'd read leaves every page touched in the process's RSS until the kernel reclaims it).

    safetensors layout: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (offsets relative to the end of the header), then the data."""

    def __init__(self, model_dir: Path):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in model_dir.glob("*.bin"))
            hint = (f"it holds only {pickles} (pickles, which lorakit never loads): re-save it with "
                    "save_pretrained(dir, safe_serialization=True)") if pickles else "it holds no weights"
            raise ExportError(f"base model {model_dir}: no *.safetensors file; {hint}")
        self.dir = model_dir
        self._entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in files:
            start, header = _read_header(f)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._entries[name] = (f, start, entry)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def read(self, name: str) -> torch.Tensor:
        path, start, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ExportError(f"{path}: tensor {name} has dtype {entry['dtype']}; the export reads {sorted(_DTYPES)}")
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ExportError(f"{path} is truncated at tensor {name}; re-download or re-save the model")
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header JSON) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return 8 + n, json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is not a readable safetensors file ({e}); re-download or re-save the model") from None


def load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ExportError(f"base model {model_dir}: cannot read config.json ({e})") from None


# --------------------------------------------------------------------------- the adapter


@dataclass
class Adapter:
    """A LoRA adapter's factors, y = W x + s · B A x, with A: (r, in), B: (out, r)."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B), float32
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> tensor trained in full
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: module -> m (out,), float32

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (what lorakit and PEFT apply)."""
        alpha = float(self.config.get("lora_alpha", 8))
        return alpha / (math.sqrt(self.rank) if self.config.get("use_rslora") else self.rank)

    def delta(self, module: str, weight: torch.Tensor) -> torch.Tensor | None:
        """W' − W for an adapted module, (out, in) float32: s · B A, or for DoRA m/n ⊙ (W + s·BA) − W
        (lorakit.dora.merge_update on `weight` = W, (out, in) float32); None for a module without adapter."""
        if module not in self.factors:
            return None
        A, B = self.factors[module]
        if module in self.magnitudes:
            return merge_update(weight, A, B, self.magnitudes[module], self.scaling)[0]
        return (B @ A) * self.scaling


def read_adapter(adapter_dir: Path) -> Adapter:
    config = read_adapter_config(adapter_dir, allow_dora=True)  # merged GGUF applies DoRA; gguf-lora refuses it
    if config.get("task_type") == "SEQ_CLS":
        raise ExportError(f"{adapter_dir} is a sequence-classification adapter; GGUF export supports causal "
                          "language models (task: causal_lm) only")
    if config.get("bias", "none") != "none":
        raise ExportError(f"{adapter_dir}: bias={config['bias']!r} adapters are not supported by the GGUF export")
    lora, full = split_adapter_keys(read_adapter_tensors(adapter_dir), adapter_dir)
    factors = {m: (p["A"].float(), p["B"].float()) for m, p in lora.items()}
    magnitudes = {m: p["m"].float() for m, p in lora.items() if "m" in p}
    if bool(config.get("use_dora")) != bool(magnitudes) or (magnitudes and len(magnitudes) != len(factors)):
        raise ExportError(f"{adapter_dir}: use_dora is {bool(config.get('use_dora'))} but {len(magnitudes)} of "
                          f"{len(factors)} modules carry a lora_magnitude_vector; the files do not belong together")
    return Adapter(adapter_dir, config, factors, {k: v for k, v in full.items()}, magnitudes)


def check_adapter_fits(adapter: Adapter, base: BaseCheckpoint, config: Any, check_base: bool) -> None:
    """The adapter must be for this base: its fingerprint (lorakit.json), then every factor's shape."""
    if check_base:
        _check_fingerprint(adapter.path, config)
    problems = []
    for module, (A, B) in adapter.factors.items():
        name = _tied(f"{module}.weight", base)
        if name not in base:
            problems.append(f"{module}: no weight {name} in the base checkpoint")
            continue
        out_f, in_f = base.shape(name)
        if tuple(A.shape) != (A.shape[0], in_f) or tuple(B.shape) != (out_f, A.shape[0]):
            problems.append(f"{module}: base weight is ({out_f}, {in_f}) but lora_A is {tuple(A.shape)} "
                            f"and lora_B {tuple(B.shape)}")
    for name, tensor in adapter.full.items():
        name = _tied(name, base)
        if name not in base or base.shape(name) != tuple(tensor.shape):
            problems.append(f"{name}: trained in full with shape {tuple(tensor.shape)}, but the base has "
                            f"{base.shape(name) if name in base else 'no such tensor'}")
    if problems:
        raise ExportError(f"adapter {adapter.path} does not fit the base {base.dir} (trained for another base?):\n  - "
                          + "\n  - ".join(problems[:20]))


def _tied(name: str, base: BaseCheckpoint) -> str:
    """lm_head.weight of a checkpoint with tied embeddings is stored once, as the embedding matrix."""
    tied = name == "lm_head.weight" and name not in base and "model.embed_tokens.weight" in base
    return "model.embed_tokens.weight" if tied else name


def _check_fingerprint(adapter_dir: Path, config: Any) -> None:
    saved = read_metadata(adapter_dir).get("base_model") or {}
    if not saved.get("hash"):
        return  # a PEFT adapter: no fingerprint; shapes are still checked
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes and config only: no weights allocated
        model = AutoModelForCausalLM.from_config(config)
    here = base_fingerprint(model)["hash"]
    if here != saved["hash"]:
        raise ExportError(
            f"adapter {adapter_dir} was trained for base {saved.get('name')!r} (fingerprint {saved['hash']}), but "
            f"the base given has fingerprint {here}: a different model or revision. Pass the matching base with "
            "--base, or --no-check-base if you know they are compatible."
        )


# --------------------------------------------------------------------------- what to export


@dataclass
class ExportInputs:
    """A resolved RUN_OR_ADAPTER argument."""

    base_dir: Path
    adapter_dir: Path | None
    chat_template: str | None  # the template used in training (adapter's file), else the tokenizer's
    name: str  # a model name for general.name and the Ollama README


def resolve_inputs(path: str | Path, base: str | None = None) -> ExportInputs:
    """Which base directory and which adapter RUN_OR_ADAPTER means (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory; pass a run directory, an adapter directory or a model directory")
    if (path / "model" / "config.json").is_file() and not (path / "adapter").is_dir():
        return ExportInputs(path / "model", None, None, path.name)
    if (path / "config.json").is_file() and not (path / CONFIG_FILE).is_file():
        return ExportInputs(path, None, None, path.name)
    adapter_dir = path / "adapter" if (path / "adapter" / CONFIG_FILE).is_file() else path
    if not (adapter_dir / CONFIG_FILE).is_file():
        found = sorted(p.name for p in path.iterdir())[:12]
        raise ExportError(f"{path} is neither a run directory (config.yaml + adapter/ or model/), an adapter directory "
                          f"({CONFIG_FILE}) nor a model directory (config.json); found: {found}")
    base_name = base or _base_name(adapter_dir)
    template = read_chat_template(adapter_dir)
    name = (path if adapter_dir != path else adapter_dir).name
    return ExportInputs(local_model_dir(base_name), adapter_dir, template, name)


def _base_name(adapter_dir: Path) -> str:
    """The base named by the run's config.yaml, else by lorakit.json, else by PEFT's adapter_config.json."""
    run_config = adapter_dir.parent / "config.yaml"
    if run_config.is_file():
        import yaml

        value = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("base_model")
        if value:
            return str(value)
    try:
        name = (read_metadata(adapter_dir).get("base_model") or {}).get("name")
        name = name or json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (AdapterError, OSError, json.JSONDecodeError):
        name = None
    if not name:
        raise ExportError(f"{adapter_dir}: neither config.yaml, {META_FILE} nor {CONFIG_FILE} names the base model; "
                          "pass it with --base (hub id or directory)")
    return str(name)


def local_model_dir(base: str) -> Path:
    """A local directory for `base`: a directory or a hub id (downloaded once into the hub cache)."""
    resolved = Path(base)
    if resolved.is_dir():
        return resolved
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
        return Path(snapshot_download(base, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 -- any hub failure becomes one user-facing message
        raise ExportError(f"base model {base!r} is not a local directory and could not be downloaded ({e}); pass a "
                          "local directory with --base, or log in with `hf auth login` for gated models") from None
