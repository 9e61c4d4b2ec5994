"""Where a training step's time goes: one profiled optimizer step per stack, grouped by kind of op.

    python bench/profile_train.py --model 100m --json bench/results/profile-100m.json
    python bench/profile_train.py --model small --cases lorakit:lora,peft:lora --threads 1

Each case runs in a fresh process (bench/workers.py builds the model and step exactly as the benchmark
does): one warm-up step, then one step under torch.profiler. Self CPU time per op is summed into
matmul / attention / loss / NF4 dequantize / other (elementwise, copies, optimizer), and the matmul
rate is the step's matmul FLOPs (bench_train.flops_per_token, attention excluded) over matmul time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORIES = {  # op-name fragments, first match wins
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "loss": ("log_softmax", "nll_loss", "logsumexp", "exp_", "cross_entropy"),
    "NF4 dequantize": ("bitsandbytes::", "nf4 dequantize"),
}


def category(name: str) -> str:
    return next((cat for cat, keys in CATEGORIES.items() if any(k in name for k in keys)), "other")


def worker(spec: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    sys.path.insert(0, str(HERE))
    import workers

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["stack"] == "lorakit" and spec["method"] == "qlora":  # label lorakit's dequantize in the profile
        import lorakit.quant.linear as ql

        plain = ql.dequantize_scratch

        def labelled(*args, **kwargs):
            with record_function("nf4 dequantize"):
                return plain(*args, **kwargs)

        ql.dequantize_scratch = labelled
    build = workers.lorakit_trainer if spec["stack"] == "lorakit" else workers.peft_trainer
    model, optimizer, loss_fn = build(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = workers.token_batches(spec, 2)

    def step(batch):
        loss_fn(batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batches[1])
    times: dict[str, float] = {}
    dequant_total = 0.0
    for event in prof.key_averages():
        if event.key == "nf4 dequantize":  # a label: its ops' self time is counted here, not under "other"
            dequant_total = event.cpu_time_total / 1e6
            continue
        times[category(event.key)] = times.get(category(event.key), 0.0) + event.self_cpu_time_total / 1e6
    if dequant_total:  # the label's ops (gather, copies, multiplies) were all summed under "other"
        times["other"] -= dequant_total
        times["NF4 dequantize"] = times.get("NF4 dequantize", 0.0) + dequant_total
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"times": times, "total_s": sum(times.values()), "threads": torch.get_num_threads(),
            "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="small")
    p.add_argument("--cases", default="lorakit:lora,peft:lora,lorakit:qlora,peft:qlora")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return
    sys.path.insert(0, str(HERE))
    import tempfile

    from bench_train import MODELS, flops_per_token, save_model

    m = MODELS[a.model]
    out = {"model": a.model, "command": "python " + " ".join(sys.argv), "cases": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-profile-") as tmp:
        model_dir = save_model(a.model, Path(tmp) / a.model)
        for case in a.cases.split(","):
            stack, method = case.split(":")
            spec = {"model_dir": str(model_dir), "stack": stack, "method": method, "gc": False, "batch": 4,
                    "seq": 256, "vocab": m["vocab_size"], "threads": a.threads}
            run = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
            lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                print(run.stderr[-3000:], file=sys.stderr)
                continue
            r = json.loads(lines[-1][7:])
            attn = 4 * m["hidden_size"] * (256 + 1) / 2 * 3 * m["num_hidden_layers"]  # fwd + 2× bwd
            mm_flops = (flops_per_token(m, 256, method, False, 16) - attn) * 4 * 256
            r.update(stack=stack, method=method, matmul_gflops=mm_flops / r["times"]["matmul"] / 1e9)
            out["cases"].append(r)
            shares = ", ".join(f"{k} {100 * v / r['total_s']:.0f}%" for k, v in sorted(r["times"].items(), key=lambda kv: -kv[1]))
            print(f"{stack} {method}: {r['total_s']:.2f} s CPU; {shares}; matmul {r['matmul_gflops']:.0f} GFLOP/s", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
