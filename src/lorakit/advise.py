"""Advisor: what to run, whether it fits, and how long it takes -- before any weight is loaded.

Three parts, all from the model's shapes (config.json only; a `meta`-device model, no weights):

1. **Recommendations**, each with its reason, from the published decision tables (method by memory
   ratio, rank by task, alpha = 2r, targets, learning rate by method, dropout by dataset size,
   micro-batch × accumulation for an effective batch of 16–64), ending in a ready-to-run YAML config.

2. **Memory**: the peak over the phases of a run (load, forward, backward, optimizer step, eval, save)
   of these terms, each in bytes (N = B·T tokens per micro-batch, N' = B·(T-1), b = compute-dtype bytes,
   a = adapter bytes: 4, lorakit's LoRA factors are fp32):

       weights        Σ storage: fp32/bf16 = 4/2 bytes per weight; NF4 = n/2 + 4·⌈n/64⌉ (absmax) or with
                      double quant n/2 + ⌈n/64⌉ + 4·⌈n/64/256⌉ + 4; embeddings, norms, lm_head unquantized
       trainable      LoRA A, B: r·(in+out) per target, in a bytes, or all weights (full)
       gradients      one per trainable parameter, in its dtype
       AdamW states   exp_avg + exp_avg_sq: 2 per trainable parameter, in its dtype (8-bit: 1 byte each)
       activations    L · N · s_layer + N · (final norm 4d + 4; full: + x̂, the head's input, ids), what
                      autograd saves; the first layer's input needs no gradient under LoRA (its norm and
                      dropout masks save nothing); with gradient checkpointing L · N · b·d (each layer's
                      input) plus one layer's s_layer, recomputed in backward
       loss           lorakit.loss (Llama-like heads): no logits at all, (2·b·d + 8)·N' for the rows of h
                      and ∂L/∂h + 2 × a 32 MiB chunk of fp32 logits (+ ∂L/∂W when the head trains); the
                      plain logits path: b·V·N logits + 4·V·N' fp32 copy + 4·V·N' log-softmax, then 12·V·N'
                      in backward -- the usual surprise
       overhead       CPU: interpreter + torch + transformers + this code path's first step, measured here,
                      and glibc heap slack (CPU_HEAP_SLACK); GPU: CUDA context + caching-allocator slack

   s_layer, per token, for a Llama block with fused SDPA attention (checked tensor by tensor with
   `saved_tensors_hooks` in tests/test_advise.py):

       2 RMSNorms       2·(4d + 4)          fp32 input (RMSNorm upcasts) + rsqrt;  + 2·b·d when norms train
       attention        b·(2·dq + 2·dkv) + 4·h    q, k, v, output, logsumexp (flash / memory-efficient
                                            kernels save no T×T matrix); with a padding/packing mask K and
                                            V are expanded to all heads (dkv -> dq) and the bool mask is
                                            converted to a float mask per layer: + b·T
       gated MLP        3·b·i               act(gate) input, its output, up (the product's operands)
       linear inputs    full: b·in per distinct input (attention output already counted);
                        LoRA: per target a·in (x in the adapter's dtype; one tensor per input site when
                        b = a), with dropout 2a·in on CPU (noise + output) or (1 + a)·in on CUDA (bool
                        mask + output); + a·r (A's output, saved by B)

3. **Time**: FLOPs per token over measured rates. Forward 2·P over the matmul weights P (decoder
   linears + lm_head) + 4·T·dq per layer for attention scores and values; backward 2·P for input
   gradients (frozen weights too) + 2·P weight gradients when training in full, attention ×2.5 (flash
   backward recomputes the scores); + the forward again under checkpointing; LoRA 6·r·(in+out) per
   target; QLoRA adds two (three with checkpointing) dequantizations of every 4-bit weight per
   micro-batch. Matmuls use the calibrated GEMM rate at their smaller dimension, attention the calibrated
   SDPA rate; elementwise work by memory traffic; the loss, dropout masks, dequantization, AdamW and op
   dispatch by their calibrated per-element costs. The calibration (`calibrate`, a few seconds) is measured once
   per device, dtype and torch version and cached in ~/.cache/lorakit/calibration.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorakit.config import LoraConfig, QuantConfig, RunConfig, load_run_config
from lorakit.errors import AdviceError

log = logging.getLogger(__name__)

GiB, MiB = 2**30, 2**20

# --------------------------------------------------------------------------- constants (measured or assumed)

CPU_BASELINE_BYTES = 360 * MiB
"""Peak RSS of lorakit's training path with a negligible model (the 'nano' model of
bench/advisor_calibration.py: hidden 32, 1 layer, 8 tokens), measured on this machine (torch 2.13,
transformers 5.23, Python 3.11, 2 cores): interpreter + torch + transformers imports ~228 MiB,
from_pretrained/tokenizer machinery +121 MiB, first training steps (thread pools, kernel code pages)
+11 MiB. Every model-dependent term is added to this."""

CPU_PLOT_BYTES = 32 * MiB
"""matplotlib import + one figure (loss.png at the end of a run), measured: the CPU 'save' phase."""

CPU_HEAP_SLACK = 0.9
"""glibc keeps freed heap pages. After the first free of a large block it raises its mmap threshold (up
to GLIBC_MMAP_MAX), so from the second step on every tensor below it lives in the heap, and the
fragmented free space a step leaves is not returned. Peak RSS exceeds the live-tensor peak by about
this share of the bytes one forward allocates in such tensors (`_heap_churn`: the activations it
would save without checkpointing -- checkpointing still allocates them, layer by layer -- and the
logits-path loss buffers). Least-squares fits on the batch-4 h256 rows of bench/advisor_calibration.py
gave 0.81-0.92 (two loss implementations); the live-tensor peaks, measured separately with
MALLOC_MMAP_THRESHOLD_ set, agree with the model within -8%..+1%. Linux/glibc only."""

GLIBC_MMAP_MAX = 32 * MiB
"""glibc's largest dynamic mmap threshold (64-bit): blocks above it are always mmapped, returned on free."""

CUDA_CONTEXT_BYTES = 500 * MiB
"""CUDA context + cuBLAS/cuDNN workspaces: device memory outside torch.cuda.max_memory_allocated."""

CUDA_ALLOCATOR_SLACK = 0.08
"""The caching allocator's reserved-minus-allocated at the peak (block rounding, fragmentation)."""

GPUS: dict[str, tuple[float, float, float]] = {
    # name: (memory bytes, dense bf16 tensor FLOP/s, memory bandwidth B/s) -- datasheet peaks
    "RTX 4090": (24 * GiB, 165e12, 1008e9),
    "RTX 3090": (24 * GiB, 71e12, 936e9),
    "RTX A6000": (48 * GiB, 155e12, 768e9),
    "L4": (24 * GiB, 121e12, 300e9),
    "A10G": (24 * GiB, 70e12, 600e9),
    "T4": (16 * GiB, 65e12, 320e9),
    "L40S": (48 * GiB, 362e12, 864e9),
    "A100-40GB": (40 * GiB, 312e12, 1555e9),
    "A100-80GB": (80 * GiB, 312e12, 2039e9),
    "H100": (80 * GiB, 989e12, 3350e9),
}
GPU_MATMUL_EFFICIENCY = 0.55
"""Share of a datasheet peak that eager-mode training matmuls reach, used only for a GPU that is not on
this machine (a GPU that is gets measured)."""




# --------------------------------------------------------------------------- units


def parse_bytes(text: int | float | str) -> int:
    """'24GB' -> 24·10⁹, '24GiB' -> 24·2³⁰, '512MiB', '1.5TB', or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m or not m.group(1).replace(".", "", 1).isdigit():
        raise AdviceError(f"memory {text!r} is not a size; write e.g. 24GB, 24GiB, 512MiB or a byte count")
    power = " kmgt".index(m.group(2) or " ")
    value = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if value <= 0:
        raise AdviceError(f"memory {text!r} must be more than 0 bytes; write e.g. 24GB")
    return value


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 2 else f"{n / MiB:.1f} MiB"


def fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def available_memory(device: str) -> int:
    """GPU total memory on cuda, else MemAvailable (what a new process can use without swapping)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AdviceError("no CUDA device here: pass memory (e.g. memory='24GB') or gpu (e.g. gpu='RTX 4090')")
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    from lorakit.runtime.devices import proc_kib

    available = proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# --------------------------------------------------------------------------- model shapes

# Typical shapes of named families: (model_type, hidden, intermediate, layers, heads, kv_heads, vocab,
# tied embeddings, head_dim or None). From the models' published config.json files.
FAMILIES: dict[str, tuple[str, int, int, int, int, int, int, bool, int | None]] = {
    "llama-2-7b": ("llama", 4096, 11008, 32, 32, 32, 32000, False, None),
    "llama-2-13b": ("llama", 5120, 13824, 40, 40, 40, 32000, False, None),
    "llama-3-8b": ("llama", 4096, 14336, 32, 32, 8, 128256, False, None),
    "llama-3-70b": ("llama", 8192, 28672, 80, 64, 8, 128256, False, None),
    "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 128256, True, 64),
    "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128256, True, 128),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, True, None),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True, None),
    "qwen2.5-3b": ("qwen2", 2048, 11008, 36, 16, 2, 151936, True, None),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False, None),
    "qwen2.5-14b": ("qwen2", 5120, 13824, 48, 40, 8, 152064, False, None),
    "qwen2.5-32b": ("qwen2", 5120, 27648, 64, 40, 8, 152064, False, None),
    "qwen2.5-72b": ("qwen2", 8192, 29568, 80, 64, 8, 152064, False, None),
    "mistral-7b": ("mistral", 4096, 14336, 32, 32, 8, 32768, False, None),
    "phi-3-mini": ("phi3", 3072, 8192, 32, 32, 32, 32064, False, None),
    "gemma-2-2b": ("gemma2", 2304, 9216, 26, 8, 4, 256000, True, 256),
    "gemma-2-9b": ("gemma2", 3584, 14336, 42, 16, 8, 256000, True, 256),
    "gemma-2-27b": ("gemma2", 4608, 36864, 46, 32, 16, 256000, True, 128),
}
SIZES = {
    "0.5b": "qwen2.5-0.5b", "1b": "llama-3.2-1b", "1.5b": "qwen2.5-1.5b", "2b": "gemma-2-2b",
    "3b": "llama-3.2-3b", "3.8b": "phi-3-mini", "7b": "mistral-7b", "8b": "llama-3-8b", "9b": "gemma-2-9b",
    "13b": "llama-2-13b", "14b": "qwen2.5-14b", "27b": "gemma-2-27b", "32b": "qwen2.5-32b", "70b": "llama-3-70b", "72b": "qwen2.5-72b",
}
HUB_IDS = {  # a representative hub id per family: what a recommended config names as base_model
    "llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3-8b": "meta-llama/Llama-3.1-8B", "llama-3-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    **{f"qwen2.5-{s}": f"Qwen/Qwen2.5-{s.upper()}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")},
    "mistral-7b": "mistralai/Mistral-7B-v0.3", "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "gemma-2-2b": "google/gemma-2-2b", "gemma-2-9b": "google/gemma-2-9b", "gemma-2-27b": "google/gemma-2-27b",
}
_NAME_PATTERNS = [  # normalized hub ids -> family key
    (r"llama-?2-(7|13)b", lambda m: f"llama-2-{m.group(1)}b"),
    (r"llama-?3(?:\.\d)?-(1|3|8|70)b", lambda m: {"1": "llama-3.2-1b", "3": "llama-3.2-3b", "8": "llama-3-8b",
                                                   "70": "llama-3-70b"}[m.group(1)]),
    (r"qwen2(?:\.5)?-(0\.5|1\.5|3|7|14|32|72)b", lambda m: f"qwen2.5-{m.group(1)}b"),
    (r"mistral-7b", lambda m: "mistral-7b"),
    (r"phi-?3(?:\.5)?-mini", lambda m: "phi-3-mini"),
    (r"gemma-?2-(2|9|27)b", lambda m: f"gemma-2-{m.group(1)}b"),
]

# Which input a linear layer reads, by name suffix: that decides what autograd saves for it.
SITES = {
    "attn_in": ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value", "query_key_value"),
    "attn_out": ("o_proj", "attn.c_proj", "attention.output.dense", "attention.dense", "self_attn.dense"),
    "mlp_in": ("gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "dense_h_to_4h", "intermediate.dense"),
    "mlp_mid": ("down_proj", "mlp.c_proj", "fc2", "dense_4h_to_h", "output.dense"),
}


@dataclass(frozen=True)
class Linear:
    """One linear layer: full name, (in, out) features, and which activation it reads."""

    name: str
    in_features: int
    out_features: int
    site: str

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the memory and time models need to know about a model, read from its config only.

    `layer_linears` are the linear layers of ONE decoder layer (all layers are alike); `head` is the
    output projection (None when tied to the embedding, whose matmul still runs: `head_matmul`)."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layer_linears: tuple[Linear, ...]
    layer_other_params: int  # norms and biases of one layer
    embed_params: int
    head: Linear | None
    other_params: int  # final norm etc.
    checkpoint_dtype: str | None  # what config.json says the weights are stored as
    attn_impl: str  # sdpa | eager
    norms_per_layer: int
    gated_mlp: bool
    source: str
    hf_config: Any = field(default=None, repr=False, compare=False)
    meta: Any = field(default=None, repr=False, compare=False)  # the 1-layer meta model the shapes came from

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        return sum(lin.numel for lin in self.layer_linears)

    @property
    def n_params(self) -> int:
        head = self.head.numel if self.head else 0
        per_layer = self.layer_linear_params + self.layer_other_params
        return self.embed_params + head + self.other_params + self.layers * per_layer

    @property
    def head_matmul(self) -> int:
        """Weights of the output projection, tied to the embedding or not."""
        return self.head.numel if self.head else self.vocab * self.hidden

    @property
    def matmul_params(self) -> int:
        """Weights that multiply every token: decoder linears + the output projection."""
        return self.layers * self.layer_linear_params + self.head_matmul


def model_shape(source: str, task: str = "causal_lm", revision: str | None = None) -> ModelShape:
    """Shapes of `source`: 'demo', a local directory, a hub id (config.json only), a named family
    ('llama-3-8b') or a bare size ('8B' -> a named family's typical shapes)."""
    hf_config, where = _hf_config(source, revision)
    return _shape_from_config(hf_config, task, name=source, source=where)


def _hf_config(source: str, revision: str | None) -> tuple[Any, str]:
    from transformers import AutoConfig

    if source == "demo":
        return _demo_config()
    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise AdviceError(f"model directory {source} has no config.json; pass a transformers model directory")
        return AutoConfig.from_pretrained(source), f"{source}/config.json"
    key = _family_key(source)
    try:  # an exact config from the local hub cache wins over a family's typical shapes
        return AutoConfig.from_pretrained(source, revision=revision, local_files_only=True), f"{source} (hub cache)"
    except (OSError, ValueError):
        pass
    if key is not None:
        return family_config(key), f"typical shapes of {key}"
    try:
        return AutoConfig.from_pretrained(source, revision=revision), f"{source} (hub config.json)"
    except (OSError, ValueError) as e:
        raise AdviceError(
            f"model {source!r}: no local directory, no cached hub config and no known family ({e}). Pass a model "
            f"directory, a hub id reachable online, a family ({', '.join(FAMILIES)}) or a size "
            f"({', '.join(s.upper() for s in SIZES)})."
        ) from None


def _family_key(source: str) -> str | None:
    name = source.strip().lower().replace("_", "-")
    if re.fullmatch(r"[\d.]+b", name):
        if name in SIZES:
            return SIZES[name]
        size = float(name[:-1])
        nearest = min(SIZES, key=lambda s: abs(math.log(float(s[:-1]) / size)))
        if abs(math.log(float(nearest[:-1]) / size)) > math.log(1.5):
            raise AdviceError(f"no named family near {source}; known sizes: {', '.join(s.upper() for s in SIZES)}")
        log.info("size %s: using the typical shapes of %s", source, SIZES[nearest])
        return SIZES[nearest]
    if name in FAMILIES:
        return name
    for pattern, key in _NAME_PATTERNS:
        m = re.search(pattern, name)
        if m:
            return key(m)
    return None


def family_config(key: str) -> Any:
    """A transformers config with a named family's shapes."""
    from transformers import AutoConfig

    model_type, d, i, layers, heads, kv, vocab, tied, head_dim = FAMILIES[key]
    kwargs = dict(hidden_size=d, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, dtype="bfloat16")
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    return AutoConfig.for_model(model_type, **kwargs)


def _demo_config() -> tuple[Any, str]:
    from transformers import AutoConfig, LlamaConfig

    from lorakit.demo import DEMO_SPEC, default_cache_dir

    path = default_cache_dir() / DEMO_SPEC.cache_name()
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path)), f"{path}/config.json"
    s = DEMO_SPEC
    cfg = LlamaConfig(vocab_size=s.vocab_size + 3, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                      max_position_embeddings=s.max_seq_len, tie_word_embeddings=True, dtype="float32")
    return cfg, "demo spec (not built yet)"


def meta_model(hf_config: Any, task: str = "causal_lm", layers: int | None = 1) -> Any:
    """The model on the `meta` device (shapes, no memory); `layers` decoder layers (None = all)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = copy.deepcopy(hf_config)
    if layers is not None:
        cfg.num_hidden_layers = layers
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:layers]
    if task == "seq_cls" and getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = 0
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return cls.from_config(cfg)


def _site(name: str) -> str:
    for site, suffixes in SITES.items():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return site
    return "mlp_in"


def _shape_from_config(hf_config: Any, task: str, name: str, source: str) -> ModelShape:
    from lorakit.lora import OUTPUT_HEADS, linear_module_names

    model = meta_model(hf_config, task)
    layer0 = re.compile(r"(^|\.)0\.")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings().weight
    linears, head = [], None
    for full in linear_module_names(model):
        module = model.get_submodule(full)
        lin = Linear(full, module.in_features, module.out_features, _site(full))
        if layer0.search(full):
            linears.append(lin)
        elif module is out or full.rsplit(".", 1)[-1] in OUTPUT_HEADS:
            head = lin
    tied = out is not None and out.weight is embed
    head = None if tied else head
    params = dict(model.named_parameters())  # tied weights appear once
    in_layer = {f"{lin.name}.weight" for lin in linears}
    layer_other = sum(p.numel() for n, p in params.items() if layer0.search(n) and n not in in_layer)
    outside = {f"{head.name}.weight"} if head else set()
    other = sum(p.numel() for n, p in params.items()
                if not layer0.search(n) and n not in outside and p is not embed)
    text_cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    d, heads = text_cfg.hidden_size, text_cfg.num_attention_heads
    norms = sum(1 for n, m in model.named_modules() if layer0.search(n) and "norm" in type(m).__name__.lower())
    dtype = getattr(text_cfg, "dtype", None) or getattr(text_cfg, "torch_dtype", None)
    return ModelShape(
        name=name, model_type=text_cfg.model_type, hidden=d,
        intermediate=getattr(text_cfg, "intermediate_size", None) or 4 * d,
        layers=text_cfg.num_hidden_layers, heads=heads,
        kv_heads=getattr(text_cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(text_cfg, "head_dim", None) or d // heads,
        vocab=text_cfg.vocab_size, tied=tied, layer_linears=tuple(linears), layer_other_params=layer_other,
        embed_params=embed.numel(), head=head, other_params=other,
        checkpoint_dtype=str(dtype).removeprefix("torch.") if dtype else None,
        attn_impl=getattr(model.config, "_attn_implementation", None) or "sdpa", norms_per_layer=max(norms, 1),
        gated_mlp=any(lin.name.endswith(("gate_proj", "gate_up_proj")) for lin in linears),
        source=source, hf_config=hf_config, meta=model,
    )


# --------------------------------------------------------------------------- the run being predicted


@dataclass(frozen=True)
class Workload:
    """One run resolved to the numbers the models need (device, dtypes, tokens, adapters)."""

    method: Literal["lora", "qlora", "full"]
    device: str  # cpu | cuda
    compute_bytes: int  # b: the dtype activations and frozen weights compute in
    load_bytes: int  # dtype the base weights are loaded (and kept, unless quantized) in
    micro_batch: int
    seq_len: int
    grad_accum: int
    checkpointing: bool
    lora: LoraConfig
    quant: QuantConfig
    optimizer: str
    masked: bool  # padding or packing: transformers materializes a (B,1,T,T) mask
    task: str
    eval_enabled: bool
    lora_targets: tuple[Linear, ...]  # targets in one decoder layer
    extra_targets: tuple[Linear, ...]  # targets outside the layers (e.g. an explicitly named lm_head)
    mmap_checkpoint: bool  # CPU load maps the safetensors file without a copy (same dtype)
    # How lorakit trains; bench/advisor_calibration.py changes these to predict other frameworks' published runs.
    adapter_bytes: int = 4  # LoRA A and B are fp32 (nn.Linear's default dtype), whatever the base's dtype
    # linear_ce: lorakit.loss's head + cross-entropy in 32 MiB row chunks, no (B, T, V) logits (plain heads of
    # the architectures in lorakit.loss.FUSED_MODEL_TYPES); logits: HF logits + F.cross_entropy (in
    # loss_chunks chunks); compiled: logits, but the loss saves them, not an fp32 log-softmax (torch.compile)
    loss: Literal["linear_ce", "logits", "compiled"] = "logits"
    loss_chunks: int = 1

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def resolve_workload(config: RunConfig, shape: ModelShape, device: str | None = None, masked: bool = True) -> Workload:
    """Device, dtypes and LoRA targets of `config` as lorakit.train would run it."""
    from lorakit.lora import find_target_modules
    from lorakit.runtime.devices import cpu_has_fast_bf16

    tc = config.train
    dev = (device or _auto_device(tc.device)).split(":")[0]
    if tc.dtype != "auto":
        compute = {"float32": 4, "bfloat16": 2, "float16": 2}[tc.dtype]
    else:
        compute = 2 if dev == "cuda" or (dev == "cpu" and device is None and cpu_has_fast_bf16()) else 4
    load = 4 if config.method == "full" and compute != 4 and dev == "cpu" else compute
    if config.method == "full":
        compute = load  # the whole model is in the load dtype; it computes in it
    targets, extra = (), ()
    if config.method != "full":
        meta = shape.meta if shape.meta is not None else meta_model(shape.hf_config, config.task)
        names = set(find_target_modules(meta, config.lora.target_modules))
        targets = tuple(lin for lin in shape.layer_linears if lin.name in names)
        extra = (shape.head,) if shape.head is not None and shape.head.name in names else ()
    stored = {"float32": 4, "bfloat16": 2, "float16": 2}.get(shape.checkpoint_dtype or "", 0)
    return Workload(
        loss="linear_ce" if _fused_loss(config, shape, extra) else "logits",
        method=config.method, device=dev, compute_bytes=compute, load_bytes=load,
        micro_batch=tc.micro_batch_size, seq_len=config.data.max_seq_len, grad_accum=tc.grad_accum,
        checkpointing=tc.gradient_checkpointing, lora=config.lora, quant=config.quant, optimizer=tc.optimizer,
        masked=masked, task=config.task, eval_enabled=True, lora_targets=targets, extra_targets=extra,
        mmap_checkpoint=dev == "cpu" and stored == load and Path(config.base_model).is_dir(),
    )


def _fused_loss(config: RunConfig, shape: ModelShape, extra_targets: tuple[Linear, ...]) -> bool:
    """Whether lorakit.train computes the loss with lorakit.loss's chunked linear cross-entropy: a
    causal LM of a listed architecture whose head stays a plain nn.Linear (no adapter on it)."""
    try:
        from lorakit.loss import FUSED_MODEL_TYPES
    except ImportError:  # an older lorakit: logits + F.cross_entropy
        return False
    return config.task == "causal_lm" and shape.model_type in FUSED_MODEL_TYPES and not extra_targets


def _auto_device(name: str) -> str:
    if name != "auto":
        return name
    from lorakit.runtime.devices import pick_device

    return pick_device("auto").type


# --------------------------------------------------------------------------- memory: the terms


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Storage of one NF4 weight: packed codes + absmax (fp32, or 8-bit + fp32 per 256 blocks + offset)."""
    blocks = math.ceil(numel / blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales


def lora_parameter_count(w: Workload, shape: ModelShape) -> int:
    """r·(in + out) per target: A is (r, in), B is (out, r)."""
    r = w.lora.r
    return shape.layers * sum(r * (t.in_features + t.out_features) for t in w.lora_targets) + sum(
        r * (t.in_features + t.out_features) for t in w.extra_targets)


def trainable_parameter_count(w: Workload, shape: ModelShape) -> int:
    return shape.n_params if w.method == "full" else lora_parameter_count(w, shape)


def weight_bytes(w: Workload, shape: ModelShape) -> tuple[int, str]:
    """Base weights by storage (the LoRA factors are a separate term)."""
    if w.method != "qlora":
        what = "fp32" if w.load_bytes == 4 else "bf16/fp16"
        return shape.n_params * w.load_bytes, f"{shape.n_params / 1e6:,.1f}M weights × {w.load_bytes} B ({what})"
    q = w.quant
    quantized = [lin for lin in shape.layer_linears if not any(lin.name.endswith(s) for s in q.skip_modules)]
    nf4 = shape.layers * sum(nf4_bytes(lin.numel, q.blocksize, q.double_quant) for lin in quantized)
    n_q = shape.layers * sum(lin.numel for lin in quantized)
    kept = shape.n_params - n_q
    dq = "double-quantized absmax" if q.double_quant else "fp32 absmax"
    return nf4 + kept * w.load_bytes, (
        f"{n_q / 1e6:,.1f}M weights in NF4 ({nf4 / n_q:.3f} B/weight: 4-bit codes + {dq} per {q.blocksize}) + "
        f"{kept / 1e6:,.1f}M embeddings/norms/head/biases kept at {w.load_bytes} B")


def layer_activation_bytes(w: Workload, shape: ModelShape) -> int:
    """Bytes autograd saves per token in one decoder layer (see the module docstring for each part)."""
    return sum(layer_saved_tensors(w, shape))


def layer_saved_tensors(w: Workload, shape: ModelShape) -> list[int]:
    """Per-token bytes of each tensor one decoder layer saves for backward (a tensor holds N times that):
    the sizes matter on CPU, where glibc treats blocks above GLIBC_MMAP_MAX differently."""
    b, d, i = w.compute_bytes, shape.hidden, shape.intermediate
    dq, dkv, full = shape.q_dim, shape.kv_dim, w.method == "full"
    saved = shape.norms_per_layer * ([4 * d, 4] + ([b * d] if full else []))  # fp32 input, rsqrt (+ x̂)
    kv = dq if (w.masked and shape.kv_heads < shape.heads) else dkv
    saved += [b * dq, b * kv, b * kv, b * dq, 4 * shape.heads]  # q, k, v, output, logsumexp
    if w.masked:
        saved.append(b * w.seq_len)  # the (B,1,T,T) bool mask, converted to the compute dtype per layer
    if shape.attn_impl == "eager":
        saved += [b * shape.heads * w.seq_len] * 2  # softmax probabilities (+ their dropout/softcap input)
    saved += [b * i] * (3 if shape.gated_mlp else 1)
    return saved + linear_inputs_saved(w, shape)


def linear_input_bytes(w: Workload, shape: ModelShape) -> int:
    """Inputs saved for the weight gradient (full) or by the LoRA path, per token per layer."""
    return sum(linear_inputs_saved(w, shape))


def linear_inputs_saved(w: Workload, shape: ModelShape) -> list[int]:
    """Per-token bytes of each linear-layer input saved (full: for the weight gradient; LoRA: by the adapter)."""
    width = {"attn_in": shape.hidden, "attn_out": shape.q_dim, "mlp_in": shape.hidden, "mlp_mid": shape.intermediate}
    if w.method == "full":  # each distinct input once; the attention output is SDPA's, already saved
        sites = {lin.site for lin in shape.layer_linears} - {"attn_out"}
        return [w.compute_bytes * width[s] for s in sorted(sites)]
    a, saved, shared = w.adapter_bytes, [], set()
    for t in w.lora_targets:
        saved.append(a * w.lora.r)  # A's output, saved by B
        if w.lora.dropout > 0:  # the mask (CPU: a float noise tensor, CUDA: bool) and the dropped x
            saved += [a * t.in_features] * 2 if w.device == "cpu" else [t.in_features, a * t.in_features]
        elif w.compute_bytes == a:  # x.to(a) is x itself: one saved tensor per input site
            if t.site not in shared and t.site != "attn_out":
                saved.append(a * width[t.site])
            shared.add(t.site)
        else:  # each target makes its own copy of x in the adapter's dtype
            saved.append(a * t.in_features)
    return saved


def head_activation_bytes(w: Workload, shape: ModelShape) -> int:
    """Saved outside the layers, per token: the final norm's fp32 input and rsqrt; full fine-tuning adds
    the normalized x (for the norm's weight gradient), the head's input and the embedding's int64 ids."""
    b, d = w.compute_bytes, shape.hidden
    # NOTE: with lorakit.loss the trainable head runs on an empty view of its input, which still holds
    # the whole (B, T, d) storage: the same bytes as saving the input.
    return 4 * d + 4 + (2 * b * d + 8 if w.method == "full" else 0)


def first_layer_savings(w: Workload, shape: ModelShape) -> int:
    """LoRA/QLoRA without checkpointing, per token: the first layer reads the frozen embedding's output,
    which needs no gradient, so its first norm saves nothing (4d + 4) and a dropout on its attention
    inputs keeps only its output, not the mask (4·in on CPU, 1·in on CUDA, per such target)."""
    if w.method == "full" or w.checkpointing:
        return 0
    saved = 4 * shape.hidden + 4
    if w.lora.dropout > 0:
        mask = w.adapter_bytes if w.device == "cpu" else 1
        saved += sum(mask * t.in_features for t in w.lora_targets if t.site == "attn_in")
    return saved


def activation_bytes(w: Workload, shape: ModelShape) -> int:
    """Everything the forward leaves for backward, all layers (without logits and loss)."""
    n = w.tokens
    rope = 2 * w.compute_bytes * shape.head_dim * w.seq_len
    mask = w.micro_batch * w.seq_len**2 if w.masked else 0  # the bool mask all layers share
    if w.checkpointing:
        per_layer = w.compute_bytes * shape.hidden  # only each layer's input survives the forward
    else:
        per_layer = layer_activation_bytes(w, shape)
    outside = head_activation_bytes(w, shape) - first_layer_savings(w, shape)
    return shape.layers * per_layer * n + outside * n + rope + mask


def logits_bytes(w: Workload, shape: ModelShape) -> tuple[int, int]:
    """(forward, backward) bytes of the loss. N' = B·(T-1) shifted positions, C = loss_chunks.

    linear_ce  forward: the supervised rows of h and ∂L/∂h, (2·b·d + 8)·N', one fp32 chunk of logits (32 MiB,
               turned into its gradient in place) and logsumexp's temporary of the same size, and, when
               the head trains, ∂L/∂W (V·d); backward:
               ∂L/∂h twice (saved, scaled) and ∂L/∂W once more. No (N, V) tensor at all.
    logits     forward: b·V·N logits + the fp32 copy of the shifted logits 4·V·N'/C + log-softmax
               4·V·N' (saved); backward: the saved log-softmax + its gradient and the input gradient
               8·V·N'/C. C = 1: b·V·N + 8·V·N' forward, 12·V·N' backward.
    compiled   saves the logits (and a log-sum-exp per row): b·V·N + 4·V·N'/C forward, 2·b·V·N' +
               8·V·N'/C backward."""
    if w.task != "causal_lm":
        return 0, 0
    v, n, c, b, d = shape.vocab, w.tokens, w.loss_chunks, w.compute_bytes, shape.hidden
    n_shift = w.micro_batch * (w.seq_len - 1)
    if w.loss == "linear_ce":
        from lorakit.loss import ROW_CHUNK_BYTES

        rows_per_chunk = min(max(1, ROW_CHUNK_BYTES // (4 * v)), n_shift)
        # the fp32 chunk of logits, logsumexp's temporary of the same size (+ the gradient cast to b)
        chunk = rows_per_chunk * v * (8 + (b if b < 4 else 0))
        head_grad = v * d * w.load_bytes if w.method == "full" else 0
        rows = (2 * b * d + 8) * n_shift  # h's supervised rows, ∂L/∂h and the int64 row index
        return rows + chunk + head_grad, rows + head_grad
    chunk = 4 * v * n_shift // c
    if w.loss == "compiled":
        return b * v * n + chunk, 2 * b * v * n_shift + 2 * chunk
    return b * v * n + 4 * v * n_shift + chunk, 4 * v * n_shift + 2 * chunk


def backward_transient_bytes(w: Workload, shape: ModelShape) -> int:
    """Gradients in flight inside one layer's backward: the residual stream, the MLP's three
    intermediate gradients, and (LoRA) the fp32 gradient of the widest adapter input."""
    b, d, i = w.compute_bytes, shape.hidden, shape.intermediate
    lora = w.adapter_bytes * max((t.in_features for t in w.lora_targets), default=0)
    return w.tokens * (b * (3 * i + 3 * d) + lora)


def dequant_transient_bytes(w: Workload, shape: ModelShape) -> int:
    """The largest 4-bit layer being dequantized: int32 codes 2n + fp32 values 4n (then + the compute-dtype
    copy b·n when b < 4): about 6n bytes, transient, once per layer per forward/backward."""
    if w.method != "qlora" or not shape.layer_linears:
        return 0
    return 6 * max(lin.numel for lin in shape.layer_linears)


def optimizer_state_bytes(w: Workload, shape: ModelShape) -> tuple[int, int]:
    """(gradient bytes, AdamW state bytes) of the trainable parameters."""
    n = trainable_parameter_count(w, shape)
    p_bytes = w.load_bytes if w.method == "full" else w.adapter_bytes
    states = 2 * n * (1 if "8bit" in w.optimizer else p_bytes)
    return n * p_bytes, states


# --------------------------------------------------------------------------- memory: the phases


@dataclass
class MemoryTerm:
    name: str
    bytes: int
    explanation: str


@dataclass
class MemoryBreakdown:
    """Each term, each phase's total, and the peak: what `check_fits` compares with the machine."""

    terms: list[MemoryTerm]
    phases: dict[str, int]
    peak_phase: str
    peak_bytes: int
    peak_allocated_bytes: int  # tensors only, at the peak phase (GPU: compare with max_memory_allocated)

    def term(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)


def memory_model(w: Workload, shape: ModelShape) -> MemoryBreakdown:
    """Every term in bytes and the peak over the phases of one training run."""
    weights, weights_how = weight_bytes(w, shape)
    n_lora = lora_parameter_count(w, shape) if w.method != "full" else 0
    grads, states = optimizer_state_bytes(w, shape)
    acts = activation_bytes(w, shape)
    recompute = layer_activation_bytes(w, shape) * w.tokens if w.checkpointing else 0
    logits_fwd, logits_bwd = logits_bytes(w, shape)
    bwd = backward_transient_bytes(w, shape)
    dequant = dequant_transient_bytes(w, shape)
    opt_tmp = _optimizer_transient(w, shape, grads)
    head_grad = shape.vocab * shape.hidden * w.load_bytes if w.method == "full" else 0
    mmap = _mmap_pages(w, shape)
    terms = [
        MemoryTerm("weights", weights, weights_how),
        MemoryTerm("lora_params", w.adapter_bytes * n_lora,
                   f"{n_lora:,} LoRA parameters (r={w.lora.r}) × {w.adapter_bytes} B"),
        MemoryTerm("gradients", grads, "one gradient per trainable parameter"),
        MemoryTerm("optimizer_states", states, f"{w.optimizer}: exp_avg + exp_avg_sq per trainable parameter"),
        MemoryTerm("activations", acts, _activation_how(w, shape)),
        MemoryTerm("recompute", recompute, "one layer's activations rebuilt in backward (gradient checkpointing)"),
        MemoryTerm("logits_loss", max(logits_fwd, logits_bwd),
                   "lorakit.loss: rows of h and ∂L/∂h + a 32 MiB chunk of logits (×2 in logsumexp), no (N, V) tensor"
                   if w.loss == "linear_ce" else
                   f"vocab {shape.vocab:,} × {w.tokens:,} tokens: logits + fp32 upcast + log-softmax, then its gradients"),
        MemoryTerm("backward_transient", bwd, "gradients in flight inside one layer's backward"),
        MemoryTerm("dequant_transient", dequant, "the largest NF4 weight dequantized for its matmul (int32 codes + fp32)"),
        MemoryTerm("optimizer_transient", opt_tmp, "AdamW step temporaries (foreach on CUDA: a copy of the states)"),
        MemoryTerm("checkpoint_pages", mmap, "CPU: the memory-mapped fp checkpoint stays resident after NF4 quantization"),
    ]
    resident = weights + w.adapter_bytes * n_lora + states + mmap
    grads_held = grads if w.grad_accum > 1 else 0  # earlier micro-batches' gradients wait for the step
    # checkpointed: the recomputed layer is freed as fast as its gradients appear; else gradients in flight
    layer_work = (recompute if w.checkpointing else bwd) + dequant
    phases = {
        "load": _load_bytes(w, shape),
        # checkpointed layers run (each one's activations, then freed) before the loss starts
        "forward": resident + grads_held + acts + max(logits_fwd, dequant + recompute),
        "backward": resident + max(acts + logits_bwd + grads_held + head_grad,
                                   acts + grads_held + head_grad + layer_work, grads + layer_work + head_grad),
        "optimizer_step": resident + grads + opt_tmp,
        "eval": resident + _eval_bytes(w, shape) + dequant if w.eval_enabled else 0,
        "save": resident,
    }
    overhead, slack = _overhead(w, shape, phases, terms)
    totals = {k: v + overhead + slack.get(k, 0) for k, v in phases.items()}
    if w.device == "cpu":
        totals["save"] += CPU_PLOT_BYTES
    peak_phase = max(totals, key=totals.get)
    return MemoryBreakdown(terms, totals, peak_phase, totals[peak_phase], phases[peak_phase])


def _activation_how(w: Workload, shape: ModelShape) -> str:
    if w.checkpointing:
        return f"checkpointed: each of {shape.layers} layers keeps its input ({w.compute_bytes}·d B/token)"
    per = layer_activation_bytes(w, shape)
    return f"{per / 1024:.1f} KiB/token/layer × {shape.layers} layers × {w.tokens:,} tokens"


def _optimizer_transient(w: Workload, shape: ModelShape, grads: int) -> int:
    if w.device == "cuda":
        return grads  # foreach AdamW: _foreach_sqrt(exp_avg_sq) materializes a copy of the states
    largest = shape.vocab * shape.hidden if w.method == "full" else max(
        (w.lora.r * max(t.in_features, t.out_features) for t in w.lora_targets), default=0)
    return 2 * largest * (w.load_bytes if w.method == "full" else w.adapter_bytes)


def _mmap_pages(w: Workload, shape: ModelShape) -> int:
    if w.method != "qlora" or not w.mmap_checkpoint:
        return 0
    return shape.layers * shape.layer_linear_params * w.load_bytes


def _load_bytes(w: Workload, shape: ModelShape) -> int:
    """QLoRA loads the whole model in the compute dtype, then quantizes layer by layer (~12n B each)."""
    full_precision = shape.n_params * w.load_bytes
    if w.method != "qlora":
        return full_precision
    largest = max((lin.numel for lin in shape.layer_linears), default=0)
    return full_precision + 12 * largest


def _eval_bytes(w: Workload, shape: ModelShape) -> int:
    """No-grad forward: the logits b·V·N + one row's fp32 upcast and log-softmax, one layer's temporaries."""
    b = w.compute_bytes
    logits = b * shape.vocab * w.tokens + 8 * shape.vocab * w.seq_len if w.task == "causal_lm" else 0
    return logits + w.tokens * b * (3 * shape.intermediate + 2 * shape.hidden)


def _overhead(w: Workload, shape: ModelShape, phases: dict[str, int],
              terms: list[MemoryTerm]) -> tuple[int, dict[str, int]]:
    """(fixed overhead, allocator slack per phase): CPU heap slack in the training phases, CUDA
    caching-allocator slack in every phase."""
    if w.device == "cpu":
        heap = int(CPU_HEAP_SLACK * _heap_churn(w, shape))
        terms.append(MemoryTerm("framework_overhead", CPU_BASELINE_BYTES,
                                "interpreter + torch + transformers + first step, measured on this machine"))
        terms.append(MemoryTerm("allocator_slack", heap, f"glibc heap keeps freed pages: {CPU_HEAP_SLACK:.0%} of "
                                "the bytes a forward allocates in blocks below the 32 MiB mmap threshold"))
        return CPU_BASELINE_BYTES, {"forward": heap, "backward": heap}
    peak = max(phases.values())
    slack = int(CUDA_ALLOCATOR_SLACK * peak)
    terms.append(MemoryTerm("framework_overhead", CUDA_CONTEXT_BYTES, "CUDA context and library workspaces"))
    terms.append(MemoryTerm("allocator_slack", slack, f"caching allocator: {CUDA_ALLOCATOR_SLACK:.0%} of the peak"))
    return CUDA_CONTEXT_BYTES, {k: int(CUDA_ALLOCATOR_SLACK * v) for k, v in phases.items()}


def _heap_churn(w: Workload, shape: ModelShape) -> int:
    """Bytes one forward allocates in tensors below GLIBC_MMAP_MAX: the activations it would save without
    checkpointing (tensor by tensor) and, with the logits loss, the loss buffers (~ 4·V·N each)."""
    n = w.tokens
    per_layer = sum(n * t for t in layer_saved_tensors(dataclasses.replace(w, checkpointing=False), shape)
                    if n * t < GLIBC_MMAP_MAX)
    churn = shape.layers * per_layer
    if w.loss != "linear_ce" and 4 * shape.vocab * n < GLIBC_MMAP_MAX:
        churn += logits_bytes(w, shape)[0]
    return churn


# --------------------------------------------------------------------------- time: calibration


def _cache_path() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit") / "calibration.json"


def _device_key(device: str, dtype: str) -> str:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_name() + f" x{torch.get_num_threads()} threads"
    return f"{device}|{name}|{dtype}|torch {torch.__version__.split('+')[0]}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MATMUL_SIZES = (32, 128, 512, 2048)


def calibrate(device: str = "cpu", dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """Measured rates of this machine, cached per (device, dtype, torch version):

    matmul_flops   {k: FLOP/s of (1024×k)@(k×k)} (×8 rows and k on CUDA) -- interpolated in log k
    attention_flops  FLOP/s of scaled_dot_product_attention forward + backward with a float mask
    lora_flops     FLOP/s of a rank-16 adapter's skinny matmuls, forward + backward
    bandwidth      B/s of an elementwise multiply over 64 MiB tensors (read 2, write 1)
    bernoulli_s    seconds per element of a dropout mask (CPU draws random numbers one by one)
    softmax_s      seconds per logit of the loss: fp32 upcast, log-softmax, nll and their backward
    dequant_s      seconds per weight of lorakit's NF4 dequantization
    adamw_s        seconds per parameter of torch's AdamW step (+ gradient clipping)
    op_s           seconds per small autograd op (dispatch overhead)
    """
    key = _device_key(device, dtype)
    path = _cache_path()
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache and not force:
        return cache[key]
    busy = _OtherLoad()
    result = _measure(device, dtype)
    result["other_load"] = busy.share()
    if result["other_load"] > 0.1:
        log.warning("calibrated while other processes used %.0f%% of the CPUs: the rates (and so the time "
                    "predictions) are low; calibrate again on a quiet machine", 100 * result["other_load"])
    cache[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=2))
    tmp.replace(path)
    return result


class _OtherLoad:
    """Share of this machine's CPU time that other processes use from construction to `share()`
    (Linux /proc/stat; 0.0 elsewhere): a busy machine makes every measured rate too low."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        mine = resource.getrusage(resource.RUSAGE_SELF)
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        return busy, mine.ru_utime + mine.ru_stime, time.monotonic()

    def share(self) -> float:
        end = self._now()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return 0.0
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return round(max(0.0, others / ((end[2] - self.start[2]) * (os.cpu_count() or 1))), 3)


def _timed(fn, budget: float = 0.1, sync=lambda: None, rounds: int = 3) -> float:
    """Seconds per call of `fn`: the median over a small time budget (after one warm-up call), the best
    of `rounds` such medians. The median, not the best call, because training sustains typical rates;
    the best of a few medians so that a burst of other work on the machine does not become the rate."""
    fn()
    sync()
    medians = []
    for _ in range(rounds):
        times: list[float] = []
        while sum(times) < budget or len(times) < 3:
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        medians.append(sorted(times)[len(times) // 2])
    return min(medians)


def _measure(device: str, dtype: str) -> dict[str, Any]:
    import torch

    from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    scale = 8 if device == "cuda" else 1
    rates = {}
    for k in MATMUL_SIZES:
        a = torch.randn(1024 * scale, k * scale, device=device, dtype=dt)
        b = torch.randn(k * scale, k * scale, device=device, dtype=dt)
        rates[str(k * scale)] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / _timed(lambda a=a, b=b: a @ b, sync=sync)
    x = torch.randn(64 * MiB // 4, device=device)  # 2×64 MiB: larger than a CPU's last-level cache
    y = torch.empty_like(x)
    bandwidth = 3 * x.numel() * 4 / _timed(lambda: torch.mul(x, x, out=y), sync=sync)
    mask = torch.empty(1024 * 1024, device=device)
    bernoulli = _timed(lambda: mask.bernoulli_(0.95), sync=sync) / mask.numel()
    state = quantize_nf4(torch.randn(1024, 1024, device=device))
    dequant = _timed(lambda: dequantize_nf4(state, dt), sync=sync) / (1024 * 1024)
    p = torch.nn.Parameter(torch.randn(1024, 1024, device=device))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4)

    def adam():
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        opt.step()

    adamw = _timed(adam, sync=sync) / p.numel()
    logits = torch.randn(1024, 8000, device=device, dtype=dt, requires_grad=True)
    labels = torch.randint(0, 8000, (1024,), device=device)

    def loss():
        torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").backward()

    softmax = _timed(loss, sync=sync) / logits.numel()
    s = torch.randn(8, 8, device=device, requires_grad=True)
    op = _timed(lambda: (s * 2).sum().backward(), sync=sync) / 4  # 2 ops forward, 2 backward
    return {"matmul_flops": rates, "attention_flops": _attention_rate(device, dt, sync),
            "lora_flops": _lora_rate(device, dt, sync), "bandwidth": bandwidth,
            "dequant_s": dequant, "adamw_s": adamw, "op_s": op, "bernoulli_s": bernoulli, "softmax_s": softmax,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def _lora_rate(device: str, dt: Any, sync) -> float:
    """FLOP/s of a rank-16 adapter path forward + backward, x (M, 512) -> A (16, 512) -> B (512, 16):
    skinny matmuls, bound by reading x rather than by arithmetic. 6·r·(in + out) FLOPs per row."""
    import torch

    rows = 8192 if device == "cuda" else 2048
    x = torch.randn(rows, 512, device=device, dtype=dt, requires_grad=True)
    a = torch.randn(16, 512, device=device, dtype=dt, requires_grad=True)
    b = torch.randn(512, 16, device=device, dtype=dt, requires_grad=True)

    def lora():
        torch.nn.functional.linear(torch.nn.functional.linear(x, a), b).sum().backward()

    return 6 * rows * 16 * (512 + 512) / _timed(lora, sync=sync)


def _attention_rate(device: str, dt: Any, sync) -> float:
    """FLOP/s of SDPA forward + backward with a float mask (as with padded or packed rows): 4·T²·hd per
    head forward, ×2.5 backward. Head dim 64 (128 on CUDA), T = 256 (1024 on CUDA)."""
    import torch

    hd, t = (128, 1024) if device == "cuda" else (64, 256)
    q, k, v = (torch.randn(2, 8, t, hd, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, t, t, device=device, dtype=dt)

    def attention():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    return 2 * 8 * 4 * t * t * hd * 3.5 / _timed(attention, sync=sync)


def assumed_gpu_rates(gpu: str) -> dict[str, Any]:
    """Rates of a GPU that is not on this machine: datasheet peaks × GPU_MATMUL_EFFICIENCY (assumed)."""
    _, flops, bw = GPUS[gpu]
    rate = flops * GPU_MATMUL_EFFICIENCY
    return {"matmul_flops": {"256": rate / 4, "1024": rate * 0.8, "4096": rate, "16384": rate},
            "attention_flops": 0.5 * rate,  # memory-efficient/flash kernels with a mask: about half the GEMM rate
            "lora_flops": 8 * 0.8 * bw,  # rank 16, fp32 adapters: bound by memory, 6r FLOPs per 12 bytes moved
            "bandwidth": 0.8 * bw, "dequant_s": 24 / (0.8 * bw), "adamw_s": 64 / (0.8 * bw), "op_s": 8e-6,
            "bernoulli_s": 9 / (0.8 * bw), "softmax_s": 40 / (0.8 * bw),
            "measured": f"assumed: {gpu} datasheet × {GPU_MATMUL_EFFICIENCY}"}


def matmul_rate(rates: dict[str, Any], k: float) -> float:
    """FLOP/s for a matmul whose smaller weight dimension is k: log-linear between calibrated sizes."""
    table = sorted((int(s), r) for s, r in rates["matmul_flops"].items())
    if k <= table[0][0]:
        return table[0][1] * k / table[0][0]  # below the smallest size: proportionally slower
    for (k0, r0), (k1, r1) in zip(table, table[1:], strict=False):
        if k <= k1:
            t = math.log(k / k0) / math.log(k1 / k0)
            return r0 + t * (r1 - r0)
    return table[-1][1]


# --------------------------------------------------------------------------- time: the model


@dataclass
class TimeModel:
    flops_per_token: float
    step_time_s: float
    parts: dict[str, float]  # seconds per optimizer step, by cause
    tokens_per_step: int
    rates_source: str


def time_model(w: Workload, shape: ModelShape, rates: dict[str, Any]) -> TimeModel:
    """Seconds per optimizer step = grad_accum × (matmuls + attention + elementwise + dequant + dispatch)
    + AdamW; see the module docstring for the FLOP counts."""
    n, r, gc = w.tokens, w.lora.r, w.checkpointing
    passes_frozen = 2 + (1 if gc else 0) if w.method != "full" else 3 + (1 if gc else 0)  # fwd, bwd-x(, bwd-w), recompute
    mm = 0.0
    flops = 0.0
    for lin in shape.layer_linears:
        f = 2 * n * lin.numel * passes_frozen * shape.layers
        mm += f / matmul_rate(rates, min(lin.in_features, lin.out_features))
        flops += f
    head_passes = 3 if w.method == "full" else 2
    f_head = 2 * n * shape.head_matmul * head_passes
    mm += f_head / matmul_rate(rates, shape.hidden)
    flops += f_head
    lora_f = shape.layers * sum(2 * n * r * (t.in_features + t.out_features) for t in w.lora_targets)
    lora_f *= 3 + (1 if gc else 0)
    mm += lora_f / (rates.get("lora_flops") or matmul_rate(rates, max(r, 32)))
    flops += lora_f
    causal = 1.0 if w.masked else 0.5
    attn_f = shape.layers * 4 * n * w.seq_len * shape.q_dim * causal * (1 + 2.5 + (1 if gc else 0))
    attn = attn_f / (rates.get("attention_flops") or matmul_rate(rates, shape.head_dim))
    flops += attn_f
    elementwise = _elementwise_bytes(w, shape) / rates["bandwidth"]
    loss = shape.vocab * w.tokens * rates.get("softmax_s", 0.0) if w.task == "causal_lm" else 0.0
    dequant = 0.0
    if w.method == "qlora":
        n_q = shape.layers * shape.layer_linear_params
        dequant = n_q * rates["dequant_s"] * (2 + (1 if gc else 0))
    ops = shape.layers * (60 + 14 * len(w.lora_targets)) * (1.5 if gc else 1.0)
    dispatch = ops * rates["op_s"]
    dropout = 0.0
    if w.method != "full" and w.lora.dropout > 0:  # one mask per target input, redrawn in the recompute
        masks = shape.layers * sum(t.in_features for t in w.lora_targets) * n * (2 if gc else 1)
        dropout = masks * rates.get("bernoulli_s", 0.0)
    micro = mm + attn + elementwise + loss + dequant + dispatch + dropout
    opt = trainable_parameter_count(w, shape) * rates["adamw_s"]
    parts = {"matmul": mm * w.grad_accum, "attention": attn * w.grad_accum, "elementwise": elementwise * w.grad_accum,
             "loss": loss * w.grad_accum,
             "dequantize": dequant * w.grad_accum, "dropout_masks": dropout * w.grad_accum,
             "dispatch": dispatch * w.grad_accum, "optimizer": opt}
    return TimeModel(flops / n, micro * w.grad_accum + opt, parts, n * w.grad_accum, rates.get("measured", ""))


ELEMENTWISE_PASSES = 4.0
"""Times each saved activation byte crosses memory in the non-matmul ops of forward + backward (norms,
RoPE, activation, residual adds, dtype copies, their gradients); +50% under checkpointing."""


def _elementwise_bytes(w: Workload, shape: ModelShape) -> float:
    """Memory traffic of the elementwise work per micro-batch, ~ELEMENTWISE_PASSES × saved activations."""
    per_layer = layer_activation_bytes(w, shape) * w.tokens
    return shape.layers * per_layer * ELEMENTWISE_PASSES * (1.5 if w.checkpointing else 1.0)


# --------------------------------------------------------------------------- recommendations


RANK_BY_TASK = {
    "classification": 4, "sentiment": 4, "seq_cls": 4,
    "qa": 8, "summarization": 8, "translation": 8, "extraction": 8,
    "chat": 16, "instruction": 16, "causal_lm": 16,
    "code": 32, "reasoning": 32, "math": 32,
}
LR_BY_METHOD = {"full": (1e-5, 5e-5, 2e-5), "lora": (5e-5, 2e-4, 1e-4), "qlora": (1e-4, 3e-4, 2e-4)}


@dataclass
class Recommendation:
    key: str  # the YAML key it sets (or a topic)
    value: Any
    reason: str


def method_by_memory(memory: int, n_params: int) -> tuple[str, str]:
    """Full at >= 2× the fp16 model size, LoRA at >= 1×, QLoRA at >= 1/4, else a smaller model/offload."""
    fp16 = 2 * n_params
    ratio = memory / fp16
    sizes = f"{fmt_bytes(memory)} available = {ratio:.2f}× the fp16 model ({fmt_bytes(fp16)})"
    if ratio >= 2:
        return "full", f"{sizes} >= 2×: full fine-tuning fits the table"
    if ratio >= 1:
        return "lora", f"{sizes}: 1–2× -> LoRA on a 16-bit base"
    if ratio >= 0.25:
        return "qlora", f"{sizes}: 1/4–1× -> QLoRA (4-bit base)"
    return "none", f"{sizes} < 1/4: use a smaller model or CPU offloading"


def rank_by_task(task: str | None) -> tuple[int, str]:
    t = (task or "chat").lower()
    r = RANK_BY_TASK.get(t)
    if r is None:
        raise AdviceError(f"task {task!r} is not one of: {', '.join(sorted(RANK_BY_TASK))}")
    return r, (f"task {t}: rank {r} (4 classification, 8 single-domain QA/summarization/translation, 16 chat/"
               "instruction, 32 code/reasoning; 64 only after an ablation shows 32 underfits)")


def dropout_by_examples(examples: int | None) -> tuple[float, str]:
    if examples is None:
        return 0.05, "dataset size unknown: 0.05 (0.1 below 5K examples, 0.0 above 100K)"
    if examples < 5_000:
        return 0.1, f"{examples:,} examples < 5K: dropout 0.1 regularizes a small dataset"
    if examples <= 100_000:
        return 0.05, f"{examples:,} examples in 5K–100K: dropout 0.05"
    return 0.0, f"{examples:,} examples > 100K: no dropout needed"


def target_effective_batch(examples: int | None) -> int:
    if examples is None or examples < 5_000:
        return 16
    return 32 if examples <= 100_000 else 64


def epochs_by_examples(examples: int | None) -> float:
    if examples is None or examples < 5_000:
        return 3
    return 2 if examples <= 100_000 else 1


# --------------------------------------------------------------------------- data


@dataclass
class DataStats:
    examples: int
    mean_tokens: float | None  # estimated at 4 characters per token
    p95_tokens: int | None


def data_stats(path: str | Path) -> DataStats:
    """Count examples in a .jsonl/.json/.csv/.parquet file (or a directory of them) and estimate their
    token lengths at ~4 characters per token (NOTE: no tokenizer is loaded; ±30% by language)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".csv", ".parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise AdviceError(f"data {path} is not a .jsonl/.json/.csv/.parquet file or a directory of them")
    lengths: list[int] = []
    for f in files:
        lengths += _row_lengths(f)
    if not lengths:
        return DataStats(0, None, None)
    tokens = sorted(max(1, n // 4) for n in lengths)
    return DataStats(len(tokens), sum(tokens) / len(tokens), tokens[min(len(tokens) - 1, int(0.95 * len(tokens)))])


def _row_lengths(f: Path) -> list[int]:
    if f.suffix == ".jsonl":
        with open(f, encoding="utf-8") as fh:
            return [len(line) for line in fh if line.strip()]
    if f.suffix == ".json":
        rows = json.loads(f.read_text(encoding="utf-8"))
        rows = rows if isinstance(rows, list) else rows.get("data", [])
        return [len(json.dumps(r)) for r in rows]
    if f.suffix == ".csv":
        import csv

        with open(f, encoding="utf-8", newline="") as fh:
            return [sum(len(c) for c in row) for row in list(csv.reader(fh))[1:]]
    import pyarrow.parquet as pq

    return [len(json.dumps(r, default=str)) for r in pq.read_table(f).to_pylist()]


# --------------------------------------------------------------------------- the advice


@dataclass
class Advice:
    """Everything `lorakit advise` prints: recommendations, the config, memory and time predictions."""

    model: ModelShape
    config: RunConfig
    device: str
    memory_available: int
    memory: MemoryBreakdown
    time: TimeModel
    recommendations: list[Recommendation]
    notes: list[str]
    examples: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    price_per_hour: float | None

    @property
    def peak_memory_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def step_time_s(self) -> float:
        return self.time.step_time_s

    @property
    def fits(self) -> bool:
        return self.memory.peak_bytes <= self.memory_available

    @property
    def epoch_time_s(self) -> float | None:
        return None if self.steps_per_epoch is None else self.steps_per_epoch * self.step_time_s

    @property
    def total_time_s(self) -> float | None:
        return None if self.total_steps is None else self.total_steps * self.step_time_s

    @property
    def cost(self) -> float | None:
        if self.price_per_hour is None or self.total_time_s is None:
            return None
        return self.total_time_s / 3600 * self.price_per_hour

    def yaml(self) -> str:
        import yaml

        return yaml.safe_dump(dataclasses.asdict(self.config), sort_keys=False)

    def to_json(self) -> dict[str, Any]:
        m, t = self.memory, self.time
        return {
            "model": {"name": self.model.name, "source": self.model.source, "params": self.model.n_params,
                      "hidden": self.model.hidden, "intermediate": self.model.intermediate, "layers": self.model.layers,
                      "heads": self.model.heads, "kv_heads": self.model.kv_heads, "vocab": self.model.vocab},
            "device": self.device,
            "memory_available_bytes": self.memory_available,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_allocated_bytes": m.peak_allocated_bytes,
            "peak_phase": m.peak_phase,
            "fits": self.fits,
            "memory_terms": {x.name: {"bytes": x.bytes, "explanation": x.explanation} for x in m.terms},
            "phases_bytes": m.phases,
            "step_time_s": self.step_time_s,
            "flops_per_token": t.flops_per_token,
            "tokens_per_step": t.tokens_per_step,
            "step_time_parts_s": t.parts,
            "rates": t.rates_source,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_time_s": self.epoch_time_s,
            "total_steps": self.total_steps,
            "total_time_s": self.total_time_s,
            "cost": self.cost,
            "recommendations": [dataclasses.asdict(r) for r in self.recommendations],
            "notes": self.notes,
            "config_yaml": self.yaml(),
        }

    def render(self) -> str:
        return _render(self)


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
    if isinstance(config, (str, Path)):
        config = load_run_config(config)
    config = copy.deepcopy(config) if given else RunConfig()
    if model is not None:
        config.base_model = model
    if not given and model is None:
        raise AdviceError("pass a run config or a model (hub id, directory, family like llama-3-8b, or size like 8B)")
    if seq_len is not None:
        config.data.max_seq_len = seq_len
    if data is not None:
        config.data.train = str(data)
    if gpu is not None and gpu not in GPUS:
        raise AdviceError(f"gpu {gpu!r} is not one of: {', '.join(GPUS)}")
    dev = device or ("cuda" if gpu else _auto_device(config.train.device).split(":")[0])
    available = parse_bytes(memory) if memory is not None else (GPUS[gpu][0] if gpu else available_memory(dev))
    shape = model_shape(config.base_model, config.task, config.revision)
    stats = _stats(config, data, examples)
    n_examples = examples if examples is not None else (stats.examples if stats else None)
    notes: list[str] = []
    family = shape.source.removeprefix("typical shapes of ")
    if not given and family in HUB_IDS and "/" not in config.base_model:
        config.base_model = HUB_IDS[family]
        notes.append(f"base_model {config.base_model}: a representative {family} checkpoint for {model!r}; "
                     "put the one you mean in the config")
    if not given and seq_len is None and stats and stats.p95_tokens:
        config.data.max_seq_len = max(64, min(8192, 2 ** math.ceil(math.log2(stats.p95_tokens))))
        notes.append(f"data.max_seq_len {config.data.max_seq_len}: the next power of two above the 95th-percentile "
                     f"length (~{stats.p95_tokens} tokens at 4 characters/token)")
    rates = _rates(dev, config, gpu, calibrate_now)
    recs = _recommend(config, shape, available, dev, task, n_examples, serving, given, rates, notes)
    w = resolve_workload(config, shape, dev)
    mem = memory_model(w, shape)
    tm = time_model(w, shape, rates)
    steps_per_epoch, total = _steps(config, n_examples, stats)
    notes += _notes(w, shape, mem, available, dev)
    if rates.get("other_load", 0) > 0.1:
        notes.append(f"the time calibration ran while other processes used {rates['other_load']:.0%} of the CPUs: "
                     "step times are overestimated; rerun lorakit.advise.calibrate(force=True) on a quiet machine")
    return Advice(shape, config, dev, available, mem, tm, recs, notes, n_examples, steps_per_epoch, total, price_per_hour)


def _stats(config: RunConfig, data: str | Path | None, examples: int | None) -> DataStats | None:
    path = data or config.data.train
    if path is None or examples is not None or not Path(path).exists():
        return None
    return data_stats(path)


def _rates(dev: str, config: RunConfig, gpu: str | None, calibrate_now: bool) -> dict[str, Any]:
    import torch

    on_machine = dev == "cpu" or (gpu is None and torch.cuda.is_available())
    if not on_machine:
        return assumed_gpu_rates(gpu or "A100-80GB")
    dtype = config.train.dtype
    if dtype == "auto":
        from lorakit.runtime.devices import pick_dtype

        dtype = str(pick_dtype("auto", dev)).removeprefix("torch.")
    if config.method == "full" and dev == "cpu":
        dtype = "float32"
    key = _device_key(dev, dtype)
    path = _cache_path()
    cached = json.loads(path.read_text()).get(key) if path.is_file() else None
    if cached or calibrate_now:
        return cached or calibrate(dev, dtype)
    return assumed_gpu_rates("A100-80GB") if dev == "cuda" else {
        "matmul_flops": {"32": 2e9, "128": 2e10, "512": 5e10, "2048": 6e10}, "bandwidth": 1e10,
        "dequant_s": 5e-9, "adamw_s": 5e-9, "op_s": 1e-5, "bernoulli_s": 6e-9, "softmax_s": 3e-9, "measured": "assumed (no calibration yet)"}


def _steps(config: RunConfig, examples: int | None, stats: DataStats | None) -> tuple[int | None, int | None]:
    tc = config.train
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


# --------------------------------------------------------------------------- recommending


def _recommend(config: RunConfig, shape: ModelShape, available: int, dev: str, task: str | None,
               examples: int | None, serving: str, given: bool, rates: dict[str, Any],
               notes: list[str]) -> list[Recommendation]:
    """Fill `config` from the decision tables (only the keys a given config leaves to us: none; it is
    predicted as is and the recommendations are advice), then make the memory model agree."""
    recs = []
    method, why = method_by_memory(available, shape.n_params)
    task_name = task or ("seq_cls" if config.task == "seq_cls" else None)
    r, r_why = rank_by_task(task_name)
    dropout, d_why = dropout_by_examples(examples)
    target_batch = target_effective_batch(examples)
    if method == "none":
        notes.append(f"method: {why}")
        method = "qlora"
    recs.append(Recommendation("method", method, why))
    if not given:
        config.method = method
        config.lora = LoraConfig(r=r, alpha=2 * r, dropout=dropout, target_modules="all-linear")
        config.train.lr = LR_BY_METHOD[method][2]
        config.train.epochs = epochs_by_examples(examples)
        config.train.device = dev
        if task_name == "seq_cls":
            config.task = "seq_cls"
    recs.append(Recommendation("lora.r", r, r_why))
    recs.append(Recommendation("lora.alpha", 2 * r, "alpha = 2r: scaling 2 keeps the update's size stable across ranks"))
    recs.append(Recommendation("lora.dropout", dropout, d_why))
    lo, hi, pick = LR_BY_METHOD[config.method]
    recs.append(Recommendation("train.lr", pick, f"{config.method}: {lo:g}–{hi:g} (full 1e-5–5e-5, LoRA 5e-5–2e-4, "
                                                 "QLoRA 1e-4–3e-4); higher with small effective batches"))
    if given:
        recs += _check_given(config, r, dropout)
        fit = _fit_batch(config, shape, available, dev, target_batch, change=False)
    else:
        fit = _fit_batch(config, shape, available, dev, target_batch, change=True)
    recs += fit
    recs.append(Recommendation("train.epochs", epochs_by_examples(examples),
                               "3 epochs below 5K examples, 2 up to 100K, 1 above: more overfits small adapters"))
    recs.append(_serving_rec(serving, config.method))
    return recs


def _check_given(config: RunConfig, r: int, dropout: float) -> list[Recommendation]:
    out = []
    lo, hi, _ = LR_BY_METHOD[config.method]
    if not lo <= config.train.lr <= hi:
        out.append(Recommendation("train.lr (yours)", config.train.lr, f"outside {lo:g}–{hi:g} for {config.method}"))
    if config.method != "full" and config.lora.alpha != 2 * config.lora.r:
        out.append(Recommendation("lora.alpha (yours)", config.lora.alpha, f"alpha = 2r = {2 * config.lora.r} is the usual choice"))
    return out


def _fit_batch(config: RunConfig, shape: ModelShape, available: int, dev: str, target: int,
               change: bool) -> list[Recommendation]:
    """Largest micro-batch (≤ target) that fits with 10% headroom, checkpointing only when needed; then
    the targets and method step down (all-linear -> attention -> minimal, LoRA -> QLoRA) until it fits."""
    budget = 0.9 * available
    trial = copy.deepcopy(config)
    for method in _methods_from(config.method):
        trial.method = method
        for targets in ("all-linear", "attention", "minimal") if method != "full" else ("all-linear",):
            trial.lora.target_modules = targets if change else config.lora.target_modules
            for gc in (False, True):
                trial.train.gradient_checkpointing = gc
                for micro in (16, 8, 4, 2, 1):
                    if micro > target:
                        continue
                    trial.train.micro_batch_size, trial.train.grad_accum = micro, max(1, target // micro)
                    peak = memory_model(resolve_workload(trial, shape, dev), shape).peak_bytes
                    if peak <= budget:
                        return _batch_recs(config, trial, peak, available, target, change)
            if not change:
                break
        if not change:
            break
    if change:  # nothing fits: keep the table's method, at the least memory it can take
        tc = config.train
        tc.micro_batch_size, tc.grad_accum, tc.gradient_checkpointing = 1, target, True
    return [Recommendation("fit", None, f"nothing fits {fmt_bytes(available)}, not even micro-batch 1 with checkpointing "
                                         f"and QLoRA at seq {config.data.max_seq_len}: shorten data.max_seq_len, use a "
                                         "smaller model or a machine with more memory")]


def _methods_from(method: str) -> list[str]:
    order = ["full", "lora", "qlora"]
    return order[order.index(method):]


def _batch_recs(config: RunConfig, trial: RunConfig, peak: int, available: int, target: int,
                change: bool) -> list[Recommendation]:
    tc = trial.train
    fits = f"predicted peak {fmt_bytes(peak)} of {fmt_bytes(available)}"
    recs = [
        Recommendation("train.micro_batch_size", tc.micro_batch_size, f"the largest that fits with 10% headroom ({fits})"),
        Recommendation("train.grad_accum", tc.grad_accum,
                       f"effective batch {tc.micro_batch_size * tc.grad_accum} (16 below 5K examples, 32 to 100K, 64 above)"),
        Recommendation("train.gradient_checkpointing", tc.gradient_checkpointing,
                       "needed to fit" if tc.gradient_checkpointing else "fits without: ~25–35% faster steps"),
    ]
    if trial.method != "full":
        recs.append(Recommendation("lora.target_modules", trial.lora.target_modules,
                                   "all-linear trains best (QLoRA paper); attention/minimal only to save memory"))
    if trial.method != config.method:
        recs.insert(0, Recommendation("method (fit)", trial.method, f"{config.method} does not fit; {trial.method} does"))
    if change:
        config.method = trial.method
        config.lora.target_modules = trial.lora.target_modules
        config.train.micro_batch_size, config.train.grad_accum = tc.micro_batch_size, tc.grad_accum
        config.train.gradient_checkpointing = tc.gradient_checkpointing
        config.train.lr = LR_BY_METHOD[trial.method][2]
    return recs


def _serving_rec(serving: str, method: str) -> Recommendation:
    if serving == "multi":
        return Recommendation("serving", "multi", "keep adapters separate (one base, many adapters batched per row); "
                                                  "use one rank and target set for all of them")
    merged = " (QLoRA merges into a full-precision base: plan 2 B/weight to serve)" if method == "qlora" else ""
    return Recommendation("serving", "single", f"merge the adapter into the base for zero adapter overhead{merged}")


def _notes(w: Workload, shape: ModelShape, mem: MemoryBreakdown, available: int, dev: str) -> list[str]:
    notes = []
    if mem.peak_phase == "load" and w.method == "qlora":
        notes.append("the peak is the load: lorakit loads the whole model in the compute dtype before quantizing it "
                     f"({fmt_bytes(mem.phases['load'])}); the training steps need {fmt_bytes(max(mem.phases['forward'], mem.phases['backward']))}")
    logits = mem.term("logits_loss")
    if logits > 0.25 * mem.peak_bytes:
        notes.append(f"the loss buffers (vocab {shape.vocab:,} × tokens) are {fmt_bytes(logits)} of the peak: "
                     "a shorter sequence or smaller micro-batch shrinks them linearly")
    if shape.attn_impl == "eager":
        notes.append(f"{shape.model_type} uses eager attention: its T×T probabilities are saved per layer")
    if mem.peak_bytes > available:
        notes.append(f"does NOT fit: predicted {fmt_bytes(mem.peak_bytes)} > {fmt_bytes(available)} available")
    if dev == "cpu":
        notes.append("CPU peak is resident memory (RSS): glibc heap slack and the measured baseline are included")
    return notes


# --------------------------------------------------------------------------- check before training


def check_fits(config: RunConfig, available_bytes: int) -> str | None:
    """None when the predicted peak fits in `available_bytes`; otherwise the message with what to change
    (each alternative predicted). Reads config.json only; returns None (and logs) when the shapes cannot
    be read, so an advisor limitation never blocks training."""
    try:
        shape = model_shape(config.base_model, config.task, config.revision)
        w = resolve_workload(config, shape)
    except (AdviceError, OSError, ValueError) as e:
        log.warning("memory check skipped: %s", e)
        return None
    mem = memory_model(w, shape)
    if mem.peak_bytes <= available_bytes:
        return None
    lines = [f"predicted peak memory {fmt_bytes(mem.peak_bytes)} ({mem.peak_phase}) exceeds the "
             f"{fmt_bytes(available_bytes)} available on {w.device}. Largest terms: " + ", ".join(
                 f"{t.name} {fmt_bytes(t.bytes)}" for t in sorted(mem.terms, key=lambda t: -t.bytes)[:4])]
    for label, change in _alternatives(config):
        trial = copy.deepcopy(config)
        change(trial)
        peak = memory_model(resolve_workload(trial, shape, w.device), shape).peak_bytes
        mark = "fits" if peak <= available_bytes else "still too big"
        lines.append(f"  - {label}: {fmt_bytes(peak)} ({mark})")
    lines.append("`lorakit advise --config ...` shows every term; --no-memory-check overrides.")
    return "\n".join(lines)


def _alternatives(config: RunConfig) -> list[tuple[str, Any]]:
    tc = config.train
    alts = []
    if not tc.gradient_checkpointing:
        alts.append(("train.gradient_checkpointing: true", lambda c: setattr(c.train, "gradient_checkpointing", True)))
    if tc.micro_batch_size > 1:
        half = max(1, tc.micro_batch_size // 2)

        def halve(c: RunConfig) -> None:
            c.train.micro_batch_size, c.train.grad_accum = half, c.train.grad_accum * 2

        alts.append((f"train.micro_batch_size {tc.micro_batch_size} -> {half}, grad_accum ×2", halve))
    if config.method != "qlora":
        alts.append(("method: qlora", lambda c: setattr(c, "method", "qlora")))
    alts.append((f"data.max_seq_len {config.data.max_seq_len} -> {config.data.max_seq_len // 2}",
                 lambda c: setattr(c.data, "max_seq_len", max(8, c.data.max_seq_len // 2))))
    return alts


# --------------------------------------------------------------------------- report


def _render(a: Advice) -> str:
    m, s = a.memory, a.model
    lines = [f"model: {s.name} ({s.source}) {s.n_params / 1e9:.2f}B params, hidden {s.hidden}, "
             f"{s.layers} layers, {s.heads}/{s.kv_heads} heads, vocab {s.vocab:,}",
             f"device: {a.device}, memory available {fmt_bytes(a.memory_available)}", "", "Recommendations:"]
    lines += [f"  {r.key:30s} {r.value!s:12s} {r.reason}" for r in a.recommendations]
    lines += ["", f"Memory (peak {fmt_bytes(m.peak_bytes)} in {m.peak_phase}, "
                  f"{'fits' if a.fits else 'DOES NOT FIT'}):"]
    lines += [f"  {t.name:20s} {fmt_bytes(t.bytes):>12s}  {t.explanation}" for t in m.terms if t.bytes]
    lines.append("  phases: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m.phases.items()))
    t = a.time
    lines += ["", f"Time: {fmt_seconds(a.step_time_s)}/step ({t.tokens_per_step:,} tokens, "
                  f"{t.flops_per_token / 1e9:.2f} GFLOP/token; rates: {t.rates_source})",
              "  " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in t.parts.items() if v)]
    if a.epoch_time_s is not None:
        lines.append(f"  epoch: {a.steps_per_epoch} steps, {fmt_seconds(a.epoch_time_s)}")
    if a.total_time_s is not None:
        cost = f", cost {a.cost:.2f} at {a.price_per_hour}/h" if a.cost is not None else ""
        lines.append(f"  total: {a.total_steps} steps, {fmt_seconds(a.total_time_s)}{cost}")
    if a.notes:
        lines += ["", "Notes:"] + [f"  - {n}" for n in a.notes]
    lines += ["", "Config (lorakit train config.yaml):", a.yaml()]
    return "\n".join(lines)
