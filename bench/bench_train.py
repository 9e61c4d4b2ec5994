"""Training throughput and peak memory: lorakit versus transformers + PEFT (+ bitsandbytes), side by side.

Each measurement runs in a fresh subprocess (peak RSS is per process), the two stacks alternate
within one invocation, and every figure is quoted as a ratio against the other stack measured in
the same run, and as a fraction of this machine's measured fp32 matmul ceiling.

    python bench/bench_train.py --model small --repeats 2          # 21M Llama, quick
    python bench/bench_train.py --model 100m --repeats 2           # the issue's ~100M config

FLOPs per trained token (N = parameters in the linear layers incl. lm_head, frozen or not):
forward 2N, input-gradient backward 2N, weight-gradient 2N only for trained weights (full FT),
+ 2N recompute under gradient checkpointing; attention score/value matmuls add 4·T·d per layer
forward and twice that backward. LoRA's own matmuls are counted too (tiny at r=16).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODELS = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8000),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
}


# --------------------------------------------------------------------------- worker (one measurement)


def build_model(name: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**MODELS[name], max_position_embeddings=1024, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(config).float()


def prepare(stack: str, method: str, model, rank: int):
    """Apply `method` with `stack`; returns the model to train."""
    import torch

    if stack == "lorakit":
        from lorakit import LoraConfig, QuantConfig, inject_lora, quantize_model

        if method == "full":
            return model.requires_grad_(True)
        if method == "qlora":
            quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
        inject_lora(model, LoraConfig(r=rank, alpha=2 * rank, dropout=0.0, target_modules="all-linear"))
        return model
    import peft

    if method == "full":
        return model.requires_grad_(True)
    if method == "qlora":
        _bnb_quantize(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))


def _bnb_quantize(model) -> None:
    """Swap linear layers (not lm_head) for bitsandbytes Linear4bit, NF4 + double quant, fp32 compute."""
    import bitsandbytes as bnb
    import torch

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            q.weight = q.weight._quantize("cpu") if hasattr(q.weight, "_quantize") else q.weight
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    model.requires_grad_(False)


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    model = prepare(args.stack, args.method, build_model(args.model), args.rank)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, MODELS[args.model]["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    return {
        "stack": args.stack, "method": args.method, "checkpointing": args.checkpointing, "model": args.model,
        "step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "flops_per_token": flops_per_token(model_shapes(args.model), args.seq, args.method, args.checkpointing, args.rank),
        "trainable": sum(p.numel() for p in params), "loss": float(loss),
    }


# --------------------------------------------------------------------------- flops and ceiling


def model_shapes(name: str) -> dict:
    return MODELS[name]


def flops_per_token(m: dict, seq: int, method: str, checkpointing: bool, rank: int) -> float:
    d, i, layers, v = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    kv = d * m["num_key_value_heads"] // m["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * i  # q,o + k,v + gate,up,down
    n_linear = layers * per_layer + d * v  # + lm_head
    attn = layers * 4 * seq * d / 2  # causal: half the score/value matmul work on average
    forward = 2 * n_linear + attn
    backward_input = 2 * n_linear + 2 * attn
    weight_grad = 2 * n_linear if method == "full" else 0.0
    lora = 0.0 if method == "full" else layers * 6 * rank * (4 * d + 2 * kv + 2 * i + i + d) / 1  # fwd+bwd of A,B
    recompute = forward if checkpointing else 0.0
    return forward + backward_input + weight_grad + lora + recompute


def matmul_ceiling(seconds: float = 3.0) -> float:
    """Best sustained fp32 GEMM rate (FLOP/s) on shapes like the training matmuls."""
    import torch

    best = 0.0
    for m, k, n in ((1024, 768, 2048), (1024, 2048, 768), (1024, 768, 768), (1024, 512, 1376)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 4:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start))
    return best


# --------------------------------------------------------------------------- driver


def run_one(model: str, stack: str, method: str, checkpointing: bool, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--stack", stack, "--method", method,
           "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--rank", str(a.rank)] + (["--checkpointing"] if checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"stack": stack, "method": method, "checkpointing": checkpointing, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", default="lorakit")
    p.add_argument("--method", default="lora")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--configs", default="lora,lora+gc,qlora,full", help="comma list of method[+gc]")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    ceiling = matmul_ceiling()
    print(f"# fp32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s  ({platform.processor() or platform.machine()})", flush=True)
    results = []
    for repeat in range(a.repeats):
        for entry in a.configs.split(","):
            method, _, gc = entry.partition("+")
            for stack in (("lorakit", "peft") if repeat % 2 == 0 else ("peft", "lorakit")):
                r = run_one(a.model, stack, method, gc == "gc", a)
                r["repeat"] = repeat
                results.append(r)
                print(json.dumps(r), flush=True)
    print(render(results, ceiling, a))
    if a.out:
        a.out.write_text(json.dumps({"ceiling_flops": ceiling, "results": results}, indent=2))


def render(results: list[dict], ceiling: float, a) -> str:
    lines = [f"| config | stack | tokens/s | ratio vs PEFT | peak RSS GiB | RSS vs PEFT | % of fp32 ceiling |",
             "|---|---|---|---|---|---|---|"]
    for entry in a.configs.split(","):
        method, _, gc = entry.partition("+")
        rows = {s: [r for r in results if r.get("method") == method and r.get("checkpointing") == (gc == "gc")
                    and r["stack"] == s and "error" not in r] for s in ("lorakit", "peft")}
        best = {s: max(rs, key=lambda r: r["tokens_per_s"]) if rs else None for s, rs in rows.items()}
        for stack in ("lorakit", "peft"):
            r, ref = best[stack], best["peft"]
            if r is None:
                lines.append(f"| {entry} | {stack} | failed | | | | |")
                continue
            frac = r["tokens_per_s"] * r["flops_per_token"] / ceiling
            ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
            mem = r["peak_rss_bytes"] / ref["peak_rss_bytes"] if ref else float("nan")
            lines.append(f"| {entry} | {stack} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | {r['peak_rss_bytes'] / 2**30:.2f} "
                         f"| {mem:.2f}x | {100 * frac:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
