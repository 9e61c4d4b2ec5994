"""`lorakit export`: a run or adapter as GGUF for llama.cpp and Ollama, written with the `gguf` package.

    --format gguf       one file, the adapter merged:  W' = W + s · B A  (s = alpha/r, or alpha/√r with rsLoRA)
    --format gguf-lora  the base as GGUF plus the adapter alone as a GGUF LoRA, which llama.cpp applies as
                        y = W x + (alpha_gguf / r) · B A x, so alpha_gguf = s · r gives lorakit's scaling

The export streams: tensor shapes come from the safetensors headers, the GGUF header and tensor table are
written first, then each tensor is read (mmap), merged, permuted (see gguf_arch) and converted on its own.
Peak memory is about one float32 tensor plus the adapter. Everything lands in a temp directory renamed
into place, with a Modelfile and README beside the .gguf files (see ollama.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lorakit.export.gguf_arch import (
    Family,
    Hparams,
    check_rope,
    family_of,
    gguf_name,
    hparams_of,
    permute_rows,
    qk_heads,
    rope_freq_factors,
    write_hparams,
)
from lorakit.export.gguf_vocab import Vocab, build_vocab, load_tokenizer
from lorakit.export.ollama import ChatFamily, chat_family, write_ollama_files
from lorakit.export.source import (
    Adapter,
    BaseCheckpoint,
    ExportError,
    ExportInputs,
    check_adapter_fits,
    load_config,
    read_adapter,
    resolve_inputs,
)
from lorakit.runtime.atomic import atomic_directory

Dtype = Literal["f32", "f16", "bf16", "q8_0"]
Format = Literal["gguf", "gguf-lora"]
DTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
FORMATS: tuple[str, ...] = ("gguf", "gguf-lora")
Q8_BLOCK = 32  # values per Q8_0 block: a row length must be a multiple of it


@dataclass
class ExportResult:
    """What an export wrote."""

    out_dir: Path
    files: list[Path]  # the .gguf files, model first
    arch: str
    merged_modules: int  # adapted modules merged (gguf) or written as LoRA pairs (gguf-lora)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {f} ({_size(f.stat().st_size)})" for f in self.files]
        lines += [f"  {note}" for note in self.notes]
        lines.append(f"Modelfile and README.md are in {self.out_dir}. Next:")
        lines.append(f"  cd {self.out_dir} && ollama create NAME -f Modelfile && ollama run NAME")
        lora = f" --lora {self.files[1].name}" if len(self.files) > 1 else ""
        lines.append(f"  llama-cli -m {self.out_dir / self.files[0].name}{lora} -cnv --jinja")
        return "\n".join(lines)


def export_gguf(
    source: str | Path,
    out_dir: str | Path | None = None,
    fmt: Format = "gguf",
    dtype: Dtype = "f16",
    base: str | None = None,
    force: bool = False,
    check_base: bool = True,
    progress: bool = True,
) -> ExportResult:
    """Export RUN_OR_ADAPTER `source` (see source.py) to `out_dir` (default: beside it) as GGUF."""
    _check_choices(fmt, dtype)
    _require_gguf()
    inputs = resolve_inputs(source, base)
    out = Path(out_dir) if out_dir else default_out_dir(Path(source), fmt, dtype)
    _check_out_dir(out, force, inputs)
    if fmt == "gguf-lora":
        _refuse_inexpressible(inputs, dtype)
    ckpt, config = BaseCheckpoint(inputs.base_dir), load_config(inputs.base_dir)
    family, hp = family_of(config), hparams_of(config)
    check_rope(hp, family)
    adapter = read_adapter(inputs.adapter_dir) if inputs.adapter_dir else None
    if adapter is not None:
        check_adapter_fits(adapter, ckpt, config, check_base)
        if fmt == "gguf-lora":
            _refuse_inexpressible_tensors(adapter, ckpt, family)
    tokenizer = load_tokenizer(inputs.base_dir)
    chat = chat_family(inputs.chat_template or tokenizer.chat_template)
    vocab = build_vocab(tokenizer, hp.n_vocab, inputs.chat_template, chat.end_of_turn if chat else None)
    stem = _file_stem(inputs.name)
    with atomic_directory(out) as tmp:
        model_file = tmp / f"{stem}-{dtype}.gguf"
        merged = adapter if fmt == "gguf" else None
        write_model(model_file, ckpt, family, hp, vocab, merged, dtype, inputs.name, progress)
        lora_file = None
        if fmt == "gguf-lora":
            lora_file = tmp / f"{stem}-lora-{_lora_dtype(dtype)}.gguf"
            write_lora(lora_file, adapter, family, hp, _lora_dtype(dtype), inputs.name)
        write_ollama_files(tmp, inputs.name, model_file.name, lora_file.name if lora_file else None, chat,
                           tokenizer.eos_token, dtype)
    files = [out / model_file.name, *([out / lora_file.name] if lora_file else [])]
    notes = _notes(inputs, adapter, fmt, chat) + vocab.notes
    return ExportResult(out, files, family.gguf_arch, len(adapter.factors) if adapter else 0, notes)


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError("GGUF export needs the `gguf` package: pip install 'lorakit[export]'") from None


def _check_choices(fmt: str, dtype: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def default_out_dir(source: Path, fmt: str, dtype: str) -> Path:
    """<run>/gguf-f16 for a run or model directory; <adapter>-gguf-f16 beside a bare adapter directory."""
    if (source / "adapter_config.json").is_file():
        return source.with_name(f"{source.name}-{fmt}-{dtype}")
    return source / f"{fmt}-{dtype}"


def _check_out_dir(out: Path, force: bool, inputs: ExportInputs) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a directory")
    precious = [inputs.base_dir, *([inputs.adapter_dir] if inputs.adapter_dir else [])]
    for path in precious:
        if out.resolve() == path.resolve() or out.resolve() in path.resolve().parents:
            raise ExportError(f"--out {out} would replace {path}, which this export reads; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to replace it, or choose another --out")


def _notes(inputs: ExportInputs, adapter: Adapter | None, fmt: str, chat: ChatFamily | None) -> list[str]:
    notes = [f"base: {inputs.base_dir}"]
    if adapter is not None:
        how = "merged into the base's own weights" if fmt == "gguf" else "as a GGUF LoRA"
        notes.append(f"adapter: {adapter.path} ({len(adapter.factors)} modules, scaling {adapter.scaling:g}) {how}")
    notes.append(f"chat template: {chat.name}" if chat else "chat template: not ChatML/Llama-3/Mistral/Gemma/Phi-3; see the NOTE in Modelfile")
    return notes


# --------------------------------------------------------------------------- the merged (or plain) model


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where its values come from and how it is stored."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch order (out, in); GGUF stores it reversed
    qtype: Any  # gguf.GGMLQuantizationType
    values: Callable[[], torch.Tensor]  # float32 values, read only when written


def write_model(path: Path, ckpt: BaseCheckpoint, family: Family, hp: Hparams, vocab: Vocab,
                adapter: Adapter | None, dtype: Dtype, name: str, progress: bool) -> None:
    """The base (with `adapter` merged when given) as one GGUF model file, streamed tensor by tensor."""
    import gguf

    plan = plan_tensors(ckpt, family, hp, adapter, dtype)
    writer = gguf.GGUFWriter(str(path), family.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(_file_type(dtype))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, hp, family)
    vocab.write(writer)
    _stream(writer, plan, progress, f"{path.name}")


def plan_tensors(ckpt: BaseCheckpoint, family: Family, hp: Hparams, adapter: Adapter | None,
                 dtype: Dtype) -> list[PlannedTensor]:
    """Every GGUF tensor of the model, in a stable order, without reading any values."""
    import gguf

    plan = []
    factors = rope_freq_factors(hp)
    if factors is not None:
        plan.append(PlannedTensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32,
                                  lambda: factors))
    sources = {n: n for n in ckpt.names()}
    lm_head_trained = adapter is not None and ("lm_head" in adapter.factors or "lm_head.weight" in adapter.full)
    if "lm_head.weight" not in ckpt and lm_head_trained:  # tied embeddings whose output side was adapted
        sources["lm_head.weight"] = "model.embed_tokens.weight"
    if "lm_head.weight" in sources and not family.separate_output:
        _refuse_output(family, ckpt, adapter)
    for hf_name in sorted(sources, key=_layer_order):
        gname = gguf_name(hf_name)
        if gname is None:
            continue
        shape = ckpt.shape(sources[hf_name])
        fn = _merged_values(ckpt, hf_name, sources[hf_name], adapter, family, hp, gname)
        plan.append(PlannedTensor(gname, shape, _qtype(shape, dtype), fn))
    return plan


def _merged_values(ckpt: BaseCheckpoint, hf_name: str, read_name: str, adapter: Adapter | None, family: Family,
                   hp: Hparams, gname: str) -> Callable[[], torch.Tensor]:
    def values() -> torch.Tensor:
        if adapter is not None and hf_name in adapter.full:
            w = adapter.full[hf_name].float()  # a module trained in full replaces the base tensor
        else:
            w = ckpt.read(read_name).float()  # (out, in) or (n,), from its stored 16/32-bit dtype
        delta = adapter.delta(hf_name.removesuffix(".weight"), w) if adapter and hf_name.endswith(".weight") else None
        if delta is not None:
            w = w + delta  # W' = W + s·BA (DoRA: m/n ⊙ (W + s·BA)), in float32 as lorakit's own merge
        if family.norm_plus_one and gname.endswith("norm.weight"):
            w = w + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by the stored weight
        heads = qk_heads(gname, hp) if family.permute_qk else None
        return permute_rows(w, heads) if heads else w

    return values


def _refuse_output(family: Family, ckpt: BaseCheckpoint, adapter: Adapter | None) -> None:
    """llama.cpp's graph for `family` has no output tensor of its own: it always multiplies by token_embd."""
    if "lm_head.weight" in ckpt:
        raise ExportError(f"{ckpt.dir} has its own lm_head.weight, but llama.cpp's {family.gguf_arch} graph always "
                          "reads the output projection from the token embeddings (token_embd), so a separate one "
                          "cannot be written; only checkpoints with tied embeddings can be exported")
    raise ExportError(f"{adapter.path if adapter else ckpt.dir} adapts lm_head, but the model ties it to the "
                      f"embeddings and llama.cpp's {family.gguf_arch} graph always reads the output projection from "
                      "token_embd, so the adapted lm_head cannot be written. Train without lm_head in "
                      "lora.target_modules")


def _layer_order(hf_name: str) -> tuple[int, str]:
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), hf_name
    return (-1 if "embed" in hf_name else 1 << 30), hf_name


# --------------------------------------------------------------------------- the GGUF LoRA


def write_lora(path: Path, adapter: Adapter, family: Family, hp: Hparams, dtype: Dtype, name: str) -> None:
    """The adapter alone: `<tensor>.lora_a` = A (r, in), `<tensor>.lora_b` = B (out, r), Q/K rows of B permuted."""
    import gguf

    writer = gguf.GGUFWriter(str(path), family.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(f"{name} (LoRA)")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales by alpha / r with r = lora_b's row count: alpha = s · r reproduces s exactly.
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.scaling * adapter.rank)
    plan = []
    for module in sorted(adapter.factors, key=_layer_order):
        gname = gguf_name(f"{module}.weight")
        A, B = adapter.factors[module]
        heads = qk_heads(gname, hp) if family.permute_qk else None
        plan.append(PlannedTensor(f"{gname}.lora_a", tuple(A.shape), _qtype(A.shape, dtype), lambda A=A: A))
        plan.append(PlannedTensor(f"{gname}.lora_b", tuple(B.shape), _qtype(B.shape, dtype),
                                  lambda B=B, h=heads: permute_rows(B, h) if h else B))
    _stream(writer, plan, progress=False, desc=path.name)


def _lora_dtype(dtype: str) -> Dtype:
    return "f32" if dtype == "f32" else "f16"  # LoRA factors are small; f16 as llama.cpp's own converter


def _refuse_inexpressible(inputs: ExportInputs, dtype: str) -> None:
    """What a GGUF LoRA cannot hold, refused before any weight is read (adapter_config.json only)."""
    import json

    if inputs.adapter_dir is None:
        raise ExportError(f"{inputs.base_dir} is a model without an adapter; there is no LoRA to export: use --format gguf")
    config = json.loads((inputs.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    reasons = []
    if config.get("use_dora"):
        reasons.append("it is a DoRA adapter: GGUF LoRA has no magnitude vectors")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        reasons.append("it has per-module alpha/rank (alpha_pattern/rank_pattern): GGUF LoRA has one alpha per file")
    if config.get("modules_to_save"):
        reasons.append(f"modules {config['modules_to_save']} were trained in full (modules_to_save): GGUF LoRA holds "
                       "only low-rank pairs")
    if reasons:
        raise ExportError(f"{inputs.adapter_dir} cannot be written as a GGUF LoRA: " + "; ".join(reasons)
                          + ". Export it merged instead: --format gguf"
                          + (" (DoRA included: the merged GGUF applies m/‖W + s·BA‖)" if config.get("use_dora") else ""))


def _refuse_inexpressible_tensors(adapter: Adapter, ckpt: BaseCheckpoint, family: Family) -> None:
    if adapter.full:
        raise ExportError(f"{adapter.path} cannot be written as a GGUF LoRA: tensors {sorted(adapter.full)[:5]} were "
                          "trained in full, and GGUF LoRA holds only low-rank pairs. Export it merged: --format gguf")
    if "lm_head" in adapter.factors and "lm_head.weight" not in ckpt:
        if not family.separate_output:
            _refuse_output(family, ckpt, adapter)  # merged cannot hold it either
        raise ExportError(f"{adapter.path} adapts lm_head of a model with tied embeddings; llama.cpp's base GGUF has no "
                          "separate output tensor to apply it to. Export it merged: --format gguf")


# --------------------------------------------------------------------------- writing


def _stream(writer: Any, plan: list[PlannedTensor], progress: bool, desc: str) -> None:
    """Header and tensor table first, then each tensor's data as it is produced (one in memory at a time)."""
    from tqdm import tqdm

    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tqdm(plan, desc=desc, unit="tensor", file=sys.stderr, disable=not progress, leave=False):
        writer.write_tensor_data(_encode(t.values(), t.qtype))
    writer.close()


def _qtype(shape: tuple[int, ...] | torch.Size, dtype: Dtype) -> Any:
    """1-D tensors (norms, biases, rope factors) stay float32, as llama.cpp's converter keeps them; Q8_0 needs
    rows in whole blocks of 32 and falls back to f16 otherwise."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or dtype == "f32":
        return Q.F32
    if dtype == "q8_0":
        return Q.Q8_0 if shape[-1] % Q8_BLOCK == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[dtype]


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _encode(values: torch.Tensor, qtype: Any) -> np.ndarray:
    """float32 values -> the bytes of `qtype` (bf16 rounds to nearest even, as torch and ggml do)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    values = values.detach().float().contiguous()
    if qtype == Q.F32:
        return values.numpy()
    if qtype == Q.F16:
        return values.half().numpy()
    if qtype == Q.BF16:
        return values.bfloat16().view(torch.int16).numpy()
    return quants.quantize(values.numpy(), qtype)  # Q8_0: per block of 32, d = max|x|/127, q = round(x/d)


def _file_type(dtype: Dtype) -> int:
    """general.file_type: what most tensors are stored as."""
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "model"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
