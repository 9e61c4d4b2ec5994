"""What `lorakit serve` takes: `ServeSettings` (every bad value reported before a weight loads) and the
`--adapter NAME=DIR` specs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorakit.config import _help
from lorakit.errors import ConfigError

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")

@dataclass
class ServeSettings:
    """Everything `lorakit serve` takes; `problems()` reports every bad value before a weight loads."""

    base: str = _help("Base model: hub id, local directory, or 'demo'. It is also the base's model name.")
    quant: Literal["none", "nf4"] = _help("Store the base in 4-bit NF4 (QLoRA) to save memory.", default="none")
    adapters: dict[str, str] = _help("Adapters loaded at start, name -> directory (trusted: no root check).",
                                     default_factory=dict)
    adapter_roots: list[str] = _help("Directories that runtime loads may read from; none = runtime loads off.",
                                     default_factory=list)
    host: str = _help("Interface to listen on; 127.0.0.1 keeps the server local.", default="127.0.0.1")
    port: int = _help("TCP port (0 = any free port).", default=8000)
    api_key: str | None = _help("When set, /v1/* needs `Authorization: Bearer KEY` (401 without it).", default=None)
    max_batch: int = _help("Most sequences decoded together in one forward.", default=16)
    max_tokens: int = _help("Largest max_tokens a request may ask for.", default=1024)
    max_prompt_tokens: int = _help("Longest prompt accepted, in tokens.", default=4096)
    max_body_bytes: int = _help("Largest request body accepted (413 above).", default=1_000_000)
    max_waiting: int = _help("Most sequences queued behind the running batch (503 above).", default=1024)
    device: str = _help("auto, cpu, cuda, cuda:1, mps.", default="auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Compute dtype; auto = bf16 on CUDA, fp32 on CPU unless bf16 is fast there.", default="auto")

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.base, str) or not self.base:
            out.append("serve.base must name a model (hub id, directory or 'demo'), got nothing")
        if self.quant not in ("none", "nf4"):
            out.append(f"serve.quant must be one of none, nf4; got {self.quant!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            out.append(f"serve.dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        for key, low in (("max_batch", 1), ("max_tokens", 1), ("max_prompt_tokens", 1), ("max_body_bytes", 1024),
                         ("max_waiting", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                out.append(f"serve.{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            out.append(f"serve.port must be in 0..65535, got {self.port!r}")
        if self.api_key is not None and not self.api_key.strip():
            out.append("serve.api_key is empty; give a real key or leave it unset")
        out += [f"serve.adapter_roots: {root!r} is not a directory; create it or fix the path"
                for root in self.adapter_roots if not Path(root).is_dir()]
        out += [f"serve.adapters: name {name!r} is not allowed; use letters, digits and . _ : / - (max 128)"
                for name in self.adapters if not ADAPTER_NAME.fullmatch(name)]
        out += [f"serve.adapters: adapter {name!r} has the base model's name; pick another name"
                for name in self.adapters if name == self.base]
        return out


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """`NAME=DIR` (or a bare `DIR`, named after its last folder) -> {name: dir}; repeated names refused."""
    out: dict[str, str] = {}
    problems = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            problems.append(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter support=runs/support/adapter")
        elif name in out:
            problems.append(f"--adapter {spec!r}: the name {name!r} is already used by {out[name]!r}")
        else:
            out[name] = path
    if problems:
        raise ConfigError(problems)
    return out

