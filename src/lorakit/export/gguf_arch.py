"""What llama.cpp's loader expects of each supported model family: tensor names, hyperparameter keys,
rope settings and the row order of W_q and W_k.

Why Q and K are permuted for the `llama` architecture: Hugging Face rotates the pairs (i, i + d/2) of each
head ("rotate_half"), llama.cpp's normal rope rotates adjacent pairs (2i, 2i + 1). Reordering the output
rows of each head,

    W (heads · d, in) -> view (heads, 2, d/2, in) -> swap axes 1, 2 -> (heads, d/2, 2, in) -> (heads · d, in),

moves row i + j·d/2 to 2i + j, so llama.cpp's rotation of adjacent rows is Hugging Face's rotation of the
half-split ones; q·k is unchanged because q and k are permuted alike. A bias (or a LoRA B factor, whose
rows are W's output rows) is permuted the same way. K uses the KV head count (grouped-query attention).
Qwen2, Gemma and Phi-3 run with NEOX rope (rotate_half) in llama.cpp, so their weights go through unchanged.

Gemma's RMSNorm scales by (1 + w); llama.cpp's by w, so its converter stores w + 1, and so do we. Gemma's
embedding scale √hidden, its GeGLU (tanh GELU) and the tied output are the runtime's, not the file's.
Phi-3's fused projections stay fused: qkv_proj (Q rows, then K, then V) is `attn_qkv`, gate_up_proj (gate
rows, then up) is `ffn_up`, which llama.cpp's phi3 graph splits the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import ExportError


@dataclass(frozen=True)
class Family:
    """One Hugging Face model_type as llama.cpp knows it."""

    gguf_arch: str  # general.architecture, also the prefix of the hyperparameter keys
    permute_qk: bool  # llama.cpp's normal rope needs the Q/K rows reordered (see the module docstring)
    norm_plus_one: bool = False  # RMSNorm weights stored as 1 + w (Gemma)
    separate_output: bool = True  # llama.cpp loads an `output.weight` beside tied embeddings (Gemma's does not)
    rope_types: tuple[str, ...] = ("default", "linear", "yarn", "llama3")  # rope_parameters.rope_type exported


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),  # llama.cpp loads Mistral as `llama` (as its converter does)
    "qwen2": Family("qwen2", permute_qk=False),
    "gemma": Family("gemma", permute_qk=False, norm_plus_one=True, separate_output=False, rope_types=("default",)),
    "phi3": Family("phi3", permute_qk=False, rope_types=("default",)),
}

_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",  # Phi-3's fused projections
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_SKIPPED = re.compile(r".*rotary_emb\.inv_freq$")  # recomputed by llama.cpp, never stored in GGUF


def family_of(config: Any) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ExportError(
            f"model_type {model_type!r} ({', '.join(getattr(config, 'architectures', None) or ['?'])}) cannot be "
            f"exported to GGUF yet; supported: {', '.join(sorted(FAMILIES))}. For other families, export the merged "
            "model with `lorakit merge` and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    _check_activation(config, model_type)
    return FAMILIES[model_type]


def _check_activation(config: Any, model_type: str) -> None:
    """llama.cpp's graphs hard-code the activation: SiLU (SwiGLU), and tanh-GELU (GeGLU) for Gemma."""
    want = ("gelu_pytorch_tanh", "gelu") if model_type == "gemma" else ("silu", "swish")  # HF Gemma runs "gelu" as tanh
    for key in ("hidden_act", "hidden_activation"):  # transformers 4.x Gemma read hidden_activation first
        act = getattr(config, key, None)
        if act is not None and act not in want:
            raise ExportError(f"config.json {key} {act!r}: llama.cpp's {model_type} graph computes {want[0]}, so the "
                              "GGUF would compute another function; only checkpoints with that activation can be exported")


def gguf_name(hf_name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'; None for tensors GGUF omits."""
    if _SKIPPED.match(hf_name):
        return None
    module, _, kind = hf_name.rpartition(".")
    if module in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[module]}.{kind}"
    match = _LAYER.fullmatch(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    raise ExportError(f"tensor {hf_name!r} has no llama.cpp counterpart in this exporter (known: embed_tokens, norm, "
                      f"lm_head and per layer {', '.join(_LAYER_NAMES)}); this checkpoint is not a plain "
                      "Llama/Mistral/Qwen2/Gemma/Phi-3 layout")


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of one Q or K projection from Hugging Face's half-split rope order to llama.cpp's interleaved one.

    weight: (n_head · d, ...) -> same shape (see the module docstring)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])  # (heads, 2, d/2, ...)
            .swapaxes(1, 2)  # (heads, d/2, 2, ...)
            .reshape(weight.shape))


def qk_heads(gguf_tensor: str, hp: Hparams) -> int | None:
    """The head count to permute a tensor's rows with, or None when it is not a Q or K projection."""
    if ".attn_q." in gguf_tensor:
        return hp.n_head
    if ".attn_k." in gguf_tensor:
        return hp.n_head_kv
    return None


# --------------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class Hparams:
    """The hyperparameters llama.cpp reads, from a transformers config."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int  # rotated dimensions per head: head_dim · partial_rotary_factor
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any]  # rope_type and its parameters ({'rope_type': 'default'} when unscaled)
    tied: bool
    sliding_window: int | None  # Phi-3's attention window; None: full attention


def hparams_of(config: Any) -> Hparams:
    n_head = config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    return Hparams(
        n_vocab=config.vocab_size, n_embd=config.hidden_size, n_layer=config.num_hidden_layers,
        n_ff=config.intermediate_size, n_head=n_head, n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=head_dim, n_rot=int(head_dim * partial),
        n_ctx=config.max_position_embeddings, rms_eps=config.rms_norm_eps, rope_theta=float(theta), rope=rope,
        tied=bool(getattr(config, "tie_word_embeddings", False)), sliding_window=getattr(config, "sliding_window", None),
    )


def write_hparams(writer: Any, hp: Hparams, family: Family) -> None:
    """The `<arch>.*` keys of llama.cpp's loader (writer: a gguf.GGUFWriter created with the arch)."""
    writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.n_rot)
    if hp.head_dim * hp.n_head != hp.n_embd or family.gguf_arch == "gemma":  # an explicit head_dim (Mistral-Nemo, Gemma)
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if family.gguf_arch == "phi3":  # 0 = full attention, as llama.cpp's converter writes it
        writer.add_sliding_window(hp.sliding_window or 0)
    _write_rope_scaling(writer, hp, family)


def check_rope(hp: Hparams, family: Family) -> None:
    """Refuse a rope this exporter does not write for `family` (called before any weight is read)."""
    kind = hp.rope["rope_type"]
    if kind not in family.rope_types:
        raise ExportError(f"rope_type {kind!r} (config.json rope_parameters/rope_scaling) cannot be exported for "
                          f"{family.gguf_arch} yet; supported: {', '.join(family.rope_types)}"
                          + (". Phi-3's long-context rope (longrope/su: per-frequency long and short factors and an "
                             "attention factor) is not written by this exporter; convert the merged model (`lorakit "
                             "merge`) with llama.cpp's convert_hf_to_gguf.py" if kind in ("longrope", "su") else ""))


def _write_rope_scaling(writer: Any, hp: Hparams, family: Family) -> None:
    from gguf import RopeScalingType

    kind = hp.rope["rope_type"]
    check_rope(hp, family)
    if kind in ("default", "llama3"):  # llama3: per-frequency factors, written as the rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(hp.rope.get("original_max_position_embeddings", hp.n_ctx)))
    else:
        raise ExportError(f"rope_type {kind!r} (config.json rope_parameters/rope_scaling) cannot be exported yet; "
                          "supported: default, linear, yarn, llama3")


def rope_freq_factors(hp: Hparams) -> torch.Tensor | None:
    """Llama-3's rope scaling as llama.cpp's `rope_freqs.weight`: one divisor per frequency, (head_dim/2,).

    Hugging Face scales each inverse frequency f_i = theta^(-2i/d) by wavelength λ_i = 2π/f_i:
        λ_i < L/high  -> f_i             (factor 1)
        λ_i > L/low   -> f_i / factor    (factor `factor`)
        otherwise     -> (1 - s) f_i / factor + s f_i,  s = (L/λ_i - low) / (high - low)
    with L the original context; llama.cpp divides f_i by the factor, so the last case is 1/((1-s)/factor + s).
    """
    if hp.rope["rope_type"] != "llama3":
        return None
    r, d = hp.rope, hp.head_dim
    factor, low, high = float(r["factor"]), float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            s = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return torch.tensor(out, dtype=torch.float32)
