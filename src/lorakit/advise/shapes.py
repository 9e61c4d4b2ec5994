"""A model's shapes, read from its config.json alone: the linear layers of one decoder layer, the
embedding and head, norms, attention kind and checkpoint dtype -- everything the memory and time models
need, from a one-layer model on the `meta` device (no weights, no memory)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.advise.families import FAMILIES, SIZES, family_config, family_key
from lorakit.errors import AdviceError
from lorakit.lora import OUTPUT_HEADS, linear_module_names

TYPICAL = "typical shapes of "
"""How ModelShape.source begins when the shapes are a named family's, not the model's own config.json."""

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
    """Shapes of `source`: a local directory, a hub id (config.json only), a named family ('llama-3-8b')
    or a bare size ('8B' -> a named family's typical shapes). An entry point that knows other names for
    a model (a built-in example) turns them into its directory before asking."""
    hf_config, where = _hf_config(source, revision)
    return _shape_from_config(hf_config, task, name=source, source=where)


def _hf_config(source: str, revision: str | None) -> tuple[Any, str]:
    from transformers import AutoConfig

    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise AdviceError(f"model directory {source} has no config.json; pass a transformers model directory")
        return AutoConfig.from_pretrained(source), f"{source}/config.json"
    key = family_key(source)
    try:  # an exact config from the local hub cache wins over a family's typical shapes
        return AutoConfig.from_pretrained(source, revision=revision, local_files_only=True), f"{source} (hub cache)"
    except (OSError, ValueError):
        pass
    if key is not None:
        return family_config(key), f"{TYPICAL}{key}"
    try:
        return AutoConfig.from_pretrained(source, revision=revision), f"{source} (hub config.json)"
    except (OSError, ValueError) as e:
        raise AdviceError(
            f"model {source!r}: no local directory, no cached hub config and no known family ({e}). Pass a model "
            f"directory, a hub id reachable online, a family ({', '.join(FAMILIES)}) or a size "
            f"({', '.join(s.upper() for s in SIZES)})."
        ) from None



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

