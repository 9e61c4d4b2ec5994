"""Training throughput and memory, generation and quantization: lorakit versus transformers + PEFT (+ bitsandbytes).

    python bench/bench_train.py --model 100m --repeats 2 --json bench/results/train-100m-1.json   # ~15 min
    python bench/profile_train.py --model 100m --json bench/results/profile-100m.json
    python bench/bench_train.py --render bench/results/train-100m-[123].json \\
        --profile bench/results/profile-100m.json --notes bench/results/notes-100m.md --results bench/RESULTS.md
    python bench/bench_train.py --model small --repeats 2          # 21M Llama, a quick run (~6 min)

Every measurement runs in a fresh process (bench/workers.py), and in each repetition lorakit and the
reference stack run back to back in alternating order, so that a noisy neighbour hurts both alike;
ratios are taken within a repetition. The fp32 matmul ceiling (plain torch.mm on the training's own
shapes) is measured at the start of every repetition. The 1-minute load average is recorded with
every measurement.

FLOPs per trained token (the matmuls actually run; N = weights of the linear layers and the LM head):

    forward              2N + attention (QKᵀ and AV: 4·d·(T+1)/2 per layer, causal)
    input-gradient       2N + 2× attention; for LoRA the first layer's q,k,v,gate,up skip it (their
                         input comes from the frozen embedding, so no gradient is asked of it)
    weight-gradient      2N, full fine-tuning only
    LoRA factors         6·r·(in + out) per adapted layer (forward, input- and weight-gradients)
    recompute (GC)       the decoder layers' forward again (the head is not checkpointed)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODELS = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8000),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
}
STACKS = ("lorakit", "peft")
SECTION = "## Training throughput and memory (CPU, {model} model)"


# --------------------------------------------------------------------------- model on disk


def save_model(name: str, directory: Path) -> Path:
    """A random-init Llama (fp32, untied head) + a small tokenizer, as a local model directory."""
    import transformers as tf

    from lorakit.demo import build_tokenizer, pretraining_corpus

    torch.manual_seed(0)
    config = tf.LlamaConfig(**MODELS[name], max_position_embeddings=1024, tie_word_embeddings=False,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    build_tokenizer(pretraining_corpus(50, seed=1), vocab_size=300).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- FLOPs


def flops_per_token(m: dict, seq: int, method: str, gc: bool, rank: int) -> float:
    d, i, layers, v = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    kv = d * m["num_key_value_heads"] // m["num_attention_heads"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]  # (in, out): q k v o gate up down
    layer = sum(a * b for a, b in shapes)
    attn = 4 * d * (seq + 1) / 2  # QKᵀ + AV, each 2·d per key, (T+1)/2 keys on average
    forward_layers = layers * (2 * layer + attn)
    forward = forward_layers + 2 * d * v
    backward_input = layers * (2 * layer + 2 * attn) + 2 * d * v
    weight_grad, lora, recompute = 0.0, 0.0, forward_layers if gc else 0.0
    if method == "full":
        weight_grad = 2 * (layers * layer + d * v)
    else:
        skipped = [(a, b) for (a, b), name in zip(shapes, "qkvogud", strict=True) if name in "qkvgu"]
        backward_input -= 2 * sum(a * b for a, b in skipped)  # layer 0: input from the frozen embedding
        lora = layers * 6 * rank * sum(a + b for a, b in shapes)
        recompute += layers * 2 * rank * sum(a + b for a, b in shapes) if gc else 0.0
    return forward + backward_input + weight_grad + lora + recompute


# --------------------------------------------------------------------------- driver


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, str(HERE / "workers.py"), json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if out.returncode == 0 and lines else {"error": out.stderr[-3000:]}
    return {**{k: spec[k] for k in ("kind", "stack", "method", "gc", "merged") if k in spec}, **result}


def plan(args: argparse.Namespace) -> list[dict]:
    """(kind, settings) of one repetition, before the stacks are put in alternating order."""
    items = []
    for entry in args.configs.split(","):
        method, _, gc = entry.partition("+")
        items.append({"kind": "train", "method": method, "gc": gc == "gc"})
    if args.generate:
        items.append({"kind": "generate"})
    if args.quantize:
        items.append({"kind": "quantize"})
    return items


def run(args: argparse.Namespace) -> dict:
    m = MODELS[args.model]
    base = {"batch": args.batch, "seq": args.seq, "vocab": m["vocab_size"], "hidden": m["hidden_size"],
            "intermediate": m["intermediate_size"], "steps": args.steps, "warmup": args.warmup,
            "gen_batch": args.gen_batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "ceiling_s": 1.0}
    results, started = [], time.time()
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        base["model_dir"] = str(save_model(args.model, Path(tmp) / args.model))
        for repeat in range(args.repeats):
            r = run_worker({**base, "kind": "ceiling", "stack": "torch"})
            log(r, repeat)
            results.append({**r, "repeat": repeat})
            for item in plan(args):
                order = STACKS if repeat % 2 == 0 else STACKS[::-1]
                for stack in order:
                    r = {**run_worker({**base, **item, "stack": stack}), "repeat": repeat}
                    log(r, repeat)
                    results.append(r)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "render", "results")}
    return {"model": args.model, "config": m, "args": settings, "command": command_line(), "machine": machine(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "wall_s": time.time() - started, "results": results}


def log(r: dict, repeat: int) -> None:
    what = {k: r[k] for k in ("kind", "stack", "method", "gc", "merged") if k in r}
    figures = {k: r[k] for k in ("tokens_per_s", "step_s", "forward_s", "peak_rss", "kernel_s", "end_to_end_s",
                                 "unmerged_tokens_per_s", "merged_tokens_per_s", "flops", "load_1min", "error") if k in r}
    print(f"[rep {repeat}] {json.dumps(what)} {json.dumps(figures)}", file=sys.stderr, flush=True)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, fp32"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=4, help="micro-batch rows")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per measurement (median taken)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="repetitions, stacks alternating in order")
    p.add_argument("--configs", default="lora,lora+gc,qlora,qlora+gc,full", help="comma list of lora|qlora|full[+gc]")
    p.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True, help="merged vs unmerged decode")
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True, help="whole-model NF4 time")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--render", type=Path, nargs="+", help="render these JSON runs instead of measuring")
    p.add_argument("--results", type=Path, help=f"markdown file whose '{SECTION}' section to write (one per model)")
    p.add_argument("--profile", type=Path, help="JSON from bench/profile_train.py to include")
    p.add_argument("--notes", type=Path, help="markdown (findings, limits) to put after the goals")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from report import render, upsert_section

    runs = [json.loads(path.read_text()) for path in args.render] if args.render else [run(args)]
    if args.json and not args.render:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs[0], indent=1, default=str))
    profile = json.loads(args.profile.read_text()) if args.profile else None
    title = SECTION.format(model=runs[0]["model"])
    section = render(title, runs, flops_per_token, profile, args.notes.read_text() if args.notes else "")
    print(section)
    if args.results:
        upsert_section(args.results, title, section)


if __name__ == "__main__":
    main()
