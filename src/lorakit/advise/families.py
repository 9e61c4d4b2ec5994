"""The table of named model families: typical shapes from each family's published config.json, the bare
sizes ('8B') that stand for a family, a representative hub id per family, and the name patterns that map
a hub id to its family. Used when a model's own config.json is not at hand."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from lorakit.errors import AdviceError

log = logging.getLogger(__name__)

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


def family_key(source: str) -> str | None:
    """'8B' (the nearest listed size, within 1.5×), 'llama-3-8b' or a hub id like 'meta-llama/Llama-3.1-8B'
    -> a key of FAMILIES; None when the name matches no family."""
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

