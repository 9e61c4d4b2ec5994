"""Wall time and peak memory of `lorakit export` (GGUF) on a generated bf16 Llama checkpoint.

    python bench/bench_export.py --layers 16 --hidden 1024 --dtypes f16,q8_0 --results bench/RESULTS.md

What it does, all offline:
1. Writes a random bf16 Llama (hidden --hidden, --layers layers, GQA 2:1, SwiGLU 2.75x, 32k vocab, untied
   head) as sharded safetensors, one tensor generated at a time, with the demo's byte-level BPE tokenizer,
   and a random rank-16 all-linear PEFT adapter beside it.
2. For each dtype, runs `python -m lorakit export ADAPTER --base BASE --dtype D` in a fresh process and reads
   its peak RSS (VmHWM from /proc/self/status, written by the child at exit) and the wall time.
The claim checked: the export streams, so the peak is about one float32 tensor plus the adapter (plus the
interpreter and torch), not the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from report import upsert_section

GiB, MiB = 2**30, 2**20
CHILD = """
import runpy, sys, atexit
from lorakit.devices import proc_kib
atexit.register(lambda: print("VMHWM", proc_kib("/proc/self/status", "VmHWM"), file=sys.stderr))
sys.argv = ["lorakit"] + sys.argv[1:]
from lorakit.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def shapes(hidden: int, layers: int, vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    heads, kv = hidden // 64, hidden // 128
    ff = int(hidden * 2.75) // 256 * 256
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * 64, hidden), p + "self_attn.k_proj.weight": (kv * 64, hidden),
                p + "self_attn.v_proj.weight": (kv * 64, hidden), p + "self_attn.o_proj.weight": (hidden, heads * 64),
                p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden),
                p + "mlp.down_proj.weight": (hidden, ff)}
    return out


def write_checkpoint(root: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """A bf16 base (sharded safetensors, ~2 layers per shard) and a rank-16 adapter; returns paths, parameters."""
    import transformers as tf

    from lorakit.demo import build_tokenizer, pretraining_corpus

    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    table, g, n = shapes(hidden, layers), torch.Generator().manual_seed(0), 0
    shards: dict[str, list[str]] = {}
    for name in table:
        key = name.split(".")[2] if ".layers." in name else "misc"
        shards.setdefault(f"shard-{int(key) // 2 if key.isdigit() else 'x'}", []).append(name)
    index = {}
    for shard, names in shards.items():
        tensors = {nm: (torch.randn(table[nm], generator=g) * 0.02).bfloat16() for nm in names}
        save_file(tensors, str(base / f"{shard}.safetensors"), metadata={"format": "pt"})
        n += sum(t.numel() for t in tensors.values())
        index |= {nm: f"{shard}.safetensors" for nm in names}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    tf.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=table["model.layers.0.mlp.up_proj.weight"][0],
                   num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                   tie_word_embeddings=False, dtype="bfloat16").save_pretrained(base)
    build_tokenizer(pretraining_corpus(200), 512).save_pretrained(base)
    lora = {}
    for name, shape in table.items():
        if name.endswith("proj.weight"):
            module = "base_model.model." + name.removesuffix(".weight")
            lora[module + ".lora_A.weight"] = torch.randn(16, shape[1], generator=g) * 0.01
            lora[module + ".lora_B.weight"] = torch.randn(shape[0], 16, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}))
    return base, adapter, n


def run_export(base: Path, adapter: Path, out: Path, dtype: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-c", CHILD, "export", str(adapter), "--base", str(base), "--dtype", dtype,
           "--out", str(out), "--force", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"export failed:\n{proc.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VMHWM")))
    size = sum(f.stat().st_size for f in out.glob("*.gguf"))
    return {"dtype": dtype, "wall_s": wall, "peak_rss": peak, "gguf_bytes": size}


def baseline_rss() -> int:
    """VmHWM of a process that only imports what the export imports: the floor under every peak."""
    code = ("import torch, transformers, gguf, lorakit.export.gguf, lorakit.cli\n"
            "from lorakit.devices import proc_kib\nprint(proc_kib('/proc/self/status', 'VmHWM'))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)


def section(args: argparse.Namespace, n_params: int, ckpt_bytes: int, results: list[dict], floor: int) -> str:
    largest = max(v[0] * (v[1] if len(v) > 1 else 1) for v in shapes(args.hidden, args.layers).values()) * 4
    lines = [
        "## GGUF export (CPU)", "",
        f"`python bench/bench_export.py --layers {args.layers} --hidden {args.hidden} --dtypes {','.join(args.dtypes)}`"
        f" on {os.cpu_count()} CPU cores: a random bf16 Llama of {n_params / 1e6:.0f}M parameters "
        f"({ckpt_bytes / MiB:.0f} MiB of safetensors) with a rank-16 all-linear adapter merged while writing. "
        f"Peak RSS is the exporting process's VmHWM; a process that only imports torch, transformers, gguf and "
        f"lorakit peaks at {floor / MiB:.0f} MiB, and the largest tensor in float32 is {largest / MiB:.0f} MiB.", "",
        "| dtype | wall time | peak RSS | GGUF size |", "|---|---|---|---|",
    ]
    lines += [f"| {r['dtype']} | {r['wall_s']:.1f} s | {r['peak_rss'] / MiB:.0f} MiB | {r['gguf_bytes'] / MiB:.0f} MiB |"
              for r in results]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["f16", "q8_0"])
    parser.add_argument("--results", type=Path, help="write the '## GGUF export (CPU)' section of this markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter, n = write_checkpoint(root, args.hidden, args.layers)
        ckpt = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        results = [run_export(base, adapter, root / f"out-{d}", d) for d in args.dtypes]
    text = section(args, n, ckpt, results, baseline_rss())
    print(text)
    if args.results:
        upsert_section(args.results, "## GGUF export (CPU)", text)


if __name__ == "__main__":
    main()
