"""Advisor check: predicted vs measured peak memory and step time on small CPU runs.

Each configuration trains in a FRESH subprocess (peak RSS is per process) through lorakit's own
code path -- `lorakit.train.prepare_model` (from_pretrained of a local model directory, NF4
quantization for QLoRA, LoRA injection, gradient checkpointing), `build_optimizer`, and the loop
body of `Loop.step` (token-weighted `loss_sum`, backward, clipping, AdamW, zero_grad) -- on
synthetic rows of exactly `seq` tokens, the last row padded by 8 tokens (so the attention mask is
materialized, as with real padded or packed data). The prediction comes from `lorakit.advise` given
the same RunConfig.

    python bench/advisor_calibration.py                    # the 22-configuration table (~10 min on 2 idle cores)
    python bench/advisor_calibration.py --quick            # 2 configurations
    python bench/advisor_calibration.py --live             # RSS ~ live tensors (glibc mmap threshold fixed)
    python bench/advisor_calibration.py --published        # predictions for published GPU measurements
    python bench/advisor_calibration.py --markdown out.md  # also write the table as markdown

Measured step time is the median of the steps after the first (the first pays one-time costs:
optimizer-state allocation, allocator growth); memory is the peak RSS of the worker process (VmHWM;
see `peak_rss`). Timings need an otherwise idle machine: before each run the driver waits until other
processes use < 10% of the CPUs, records the share they used during the run ('other load'), and
repeats a run measured under more than 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "nano": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=256),  # negligible: measures CPU_BASELINE_BYTES
    # hidden 256 / 4 layers with grouped-query attention (4 query heads share 2 KV heads)
    "h256": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8000),
    # hidden 512 / 4 layers, multi-head attention
    "h512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=8000),
}

# (model, method, gradient checkpointing, batch, seq len); LoRA r=16 all-linear, dropout 0.05
CONFIGS = [
    (model, method, gc, 4, seq)
    for model in ("h256", "h512")
    for method in ("lora", "qlora", "full")
    for gc in (False, True)
    for seq in ((128, 256) if (method == "lora" or not gc) else (256,))
] + [
    # larger micro-batches: the loss buffers (and, at 8×1024, the activations) exceed glibc's 32 MiB mmap
    # threshold, so they are mmapped and returned on free instead of fragmenting the heap
    ("h256", "lora", False, 8, 512), ("h512", "lora", True, 8, 1024),
]
QUICK = [("h256", "lora", False, 4, 128), ("h256", "qlora", True, 4, 256)]


# --------------------------------------------------------------------------- model directory


def make_model_dir(name: str, root: Path) -> Path:
    """A randomly initialized Llama of shape MODELS[name] + a word-level tokenizer, saved like a hub model."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = root / name
    if (path / "config.json").is_file():
        return path
    words = [f"w{i}" for i in range(200)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<|endoftext|>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = tf.LlamaConfig(**MODELS[name], max_position_embeddings=1024, tie_word_embeddings=False,
                            pad_token_id=0, eos_token_id=2)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def run_config(model_dir: Path, method: str, gc: bool, seq: int, batch: int, steps: int, out_dir: Path):
    from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig

    return RunConfig(
        base_model=str(model_dir), method=method,
        lora=LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear"),
        data=DataConfig(max_seq_len=seq, packing=False),
        train=TrainConfig(micro_batch_size=batch, grad_accum=1, max_steps=steps, gradient_checkpointing=gc,
                          eval_every=None, save_every=None, device="cpu", dtype="float32"),
        output_dir=str(out_dir),
    )


# --------------------------------------------------------------------------- worker (one fresh process)


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def proc_status(key: str) -> int:
    """A byte count from /proc/self/status: VmHWM (peak RSS of this process image), RssFile (file-backed
    resident pages, e.g. a memory-mapped safetensors file)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def peak_rss() -> int:
    """Peak RSS since exec. NOT ru_maxrss: the kernel carries the parent's high-water mark into a child
    started with vfork/fork+exec (Python's subprocess does), so ru_maxrss of a worker launched by this
    driver reads at least the driver's own peak (~800 MiB after calibration). VmHWM belongs to the new
    address space only."""
    return proc_status("VmHWM")


def worker(a: argparse.Namespace) -> dict:
    import torch

    from lorakit.runtime.devices import pick_device, pick_dtype
    from lorakit.train import build_optimizer, loss_sum, prepare_model

    phases = {"imports": rss_now()}
    config = run_config(Path(a.model_dir), a.method, a.gc, a.seq, a.batch, a.steps, Path(a.out))
    device = pick_device(config.train.device)
    dtype = pick_dtype(config.train.dtype, device)
    torch.manual_seed(0)
    model, _ = prepare_model(config, device, dtype)
    phases["loaded"] = rss_now()
    phases["loaded_max"] = peak_rss()
    phases["loaded_file"] = proc_status("RssFile")
    optimizer = build_optimizer(model, config)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (a.batch, a.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -8:] = 0  # one padded row: the mask is materialized, as with real (padded) batches
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    n_tokens = int((labels[:, 1:] != -100).sum())
    model.train()
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        loss = loss_sum(model, batch) / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        phases.setdefault("after_step1", rss_now())
    phases["end_file"] = proc_status("RssFile")
    later = sorted(times[1:]) or times
    return {"step_s": later[len(later) // 2], "first_step_s": times[0], "loss": float(loss),
            "peak_rss_bytes": peak_rss(), "phases": phases}


# --------------------------------------------------------------------------- driver


def cpu_busy_seconds() -> float:
    """CPU-seconds all processes on this machine have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Block until other processes use < `threshold` of the CPUs for 3 s in a row (timings taken while
    someone else computes on a 2-core machine measure them, not us); returns the busy share last seen."""
    ncpu, deadline, quiet, share = os.cpu_count() or 1, time.monotonic() + max_wait, 0, 1.0
    while time.monotonic() < deadline:
        before = cpu_busy_seconds()
        time.sleep(1.0)
        share = (cpu_busy_seconds() - before) / ncpu
        quiet = quiet + 1 if share < threshold else 0
        if quiet >= 3:
            return share
    print(f"# machine still busy ({share:.0%} of the CPUs) after {max_wait:.0f} s; measuring anyway", flush=True)
    return share


def measure(model_dir: Path, method: str, gc: bool, batch: int, seq: int, a: argparse.Namespace, out: Path) -> dict:
    """Run one worker; `contention` is the share of the machine's CPU time that other processes used
    while it ran (0 on a quiet machine). A row measured under contention > 10% is retried."""
    cmd = [sys.executable, __file__, "--worker", "--model-dir", str(model_dir), "--method", method,
           "--seq", str(seq), "--batch", str(batch), "--steps", str(a.steps), "--out", str(out)]
    cmd += ["--gc"] if gc else []
    env = dict(os.environ)
    if a.live:  # every large block mmapped and returned on free: RSS follows the live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    for attempt in range(a.retries + 1):
        wait_until_quiet(a.max_wait)
        ours0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_busy_seconds(), time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        ours1, busy1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_busy_seconds(), time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"worker failed for {method} gc={gc} seq={seq}:\n{done.stderr[-3000:]}")
        mine = (ours1.ru_utime + ours1.ru_stime) - (ours0.ru_utime + ours0.ru_stime)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["contention"] = max(0.0, (busy1 - busy0 - mine) / (wall * (os.cpu_count() or 1)))
        result["attempts"] = attempt + 1
        if result["contention"] <= 0.1:
            break
        print(f"# {method} gc={gc} seq={seq}: other processes used {result['contention']:.0%} of the CPUs; "
              "measuring again", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--method", default="lora")
    p.add_argument("--gc", action="store_true")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="two configurations only")
    p.add_argument("--markdown", type=Path, help="write the comparison table here")
    p.add_argument("--json", type=Path, help="write the raw rows here")
    p.add_argument("--live", action="store_true",
                   help="run workers with a fixed glibc mmap threshold (RSS ~ live tensors; slower steps)")
    p.add_argument("--only", help="comma list of config indices to run")
    p.add_argument("--published", action="store_true", help="only the predictions for published GPU measurements")
    p.add_argument("--max-wait", type=float, default=900, help="seconds to wait for a quiet machine before each run")
    p.add_argument("--retries", type=int, default=2, help="re-runs of a configuration measured under contention")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.published:
        print(render_published(published_predictions()))
        return
    from lorakit.advise import advise, calibrate

    wait_until_quiet(a.max_wait)
    rate = calibrate(device="cpu", dtype="float32", force=True)
    print(f"# calibration: {json.dumps(rate)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        configs = QUICK if a.quick else CONFIGS
        if a.only:
            configs = [configs[int(i)] for i in a.only.split(",")]
        for name, method, gc, batch, seq in configs:
            model_dir = make_model_dir(name, root)
            config = run_config(model_dir, method, gc, seq, batch, a.steps, root / "run")
            advice = advise(config)
            measured = measure(model_dir, method, gc, batch, seq, a, root / "run")
            row = {"config": f"{name} {method}{' +gc' if gc else ''} {batch}x{seq}",
                   "pred_mem": advice.peak_memory_bytes, "meas_mem": measured["peak_rss_bytes"],
                   "pred_step": advice.step_time_s, "meas_step": measured["step_s"], "measured": measured,
                   "phases_pred": advice.memory.phases, "allocated_pred": advice.memory.peak_allocated_bytes,
                   "terms": {t.name: t.bytes for t in advice.memory.terms}, "time_parts": advice.time.parts}
            rows.append(row)
            print(format_row(row), flush=True)
    table = render(rows, a) + "\n\n" + render_published(published_predictions())
    print(table)
    if a.markdown:
        a.markdown.write_text(table + "\n")
    if a.json:
        a.json.write_text(json.dumps({"calibration": rate, "rows": rows}, indent=2))


def format_row(r: dict) -> str:
    return (f"| {r['config']} | {r['pred_mem'] / 2**20:.0f} | {r['meas_mem'] / 2**20:.0f} | "
            f"{r['pred_mem'] / r['meas_mem']:.2f} | {r['pred_step']:.3f} | {r['meas_step']:.3f} | "
            f"{r['pred_step'] / r['meas_step']:.2f} | {r['measured'].get('contention', 0):.0%} |")


def render(rows: list[dict], a: argparse.Namespace) -> str:
    head = ["| config (model method batch×seq) | predicted peak MiB | measured peak RSS MiB | ratio | "
            "predicted step s | measured step s | ratio | other load |", "|---|---|---|---|---|---|---|---|"]
    mem = [r["pred_mem"] / r["meas_mem"] for r in rows]
    step = [r["pred_step"] / r["meas_step"] for r in rows]
    foot = (f"\nmemory ratio range {min(mem):.2f}–{max(mem):.2f} ({sum(abs(x - 1) <= 0.15 for x in mem)}/{len(mem)} "
            f"within ±15%); step-time ratio range {min(step):.2f}–{max(step):.2f} "
            f"({sum(abs(x - 1) <= 0.30 for x in step)}/{len(step)} within ±30%)")
    return "\n".join(head + [format_row(r) for r in rows]) + foot


# --------------------------------------------------------------------------- published measurements

GB = 10**9
PUBLISHED = [
    # torchtune README ("Memory and training speed", Llama 3.1, Sept 2024): batch 2, packed to 2048, compile on.
    # Recipes llama3_1/8B_{lora,qlora}_single_device: r=8, alpha=16, no dropout, activation checkpointing,
    # bf16 (adapters too), 8-chunk cross-entropy. LoRA: q, v, output + MLP; QLoRA: q, k, v, output + MLP.
    dict(source="torchtune", label="Llama-3.1-8B LoRA, RTX 4090, 2×2048 packed", family="llama-3-8b",
         method="lora", targets=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=8,
         dropout=0.0, batch=2, seq=2048, gc=True, masked=True, gpu="RTX 4090", loss="compiled", chunks=8,
         memory=16.2 * 2**30, tokens_per_s=3083),
    dict(source="torchtune", label="Llama-3.1-8B QLoRA, RTX 4090, 2×2048 packed", family="llama-3-8b",
         method="qlora", targets="all-linear", r=8, dropout=0.0, batch=2, seq=2048, gc=True, masked=True,
         gpu="RTX 4090", loss="compiled", chunks=8, memory=7.4 * 2**30, tokens_per_s=2413),
    # LitGPT tutorials/resource-tables.md (Oct 2023, A100-40GB, bf16-true, finetune/lora.py): r=8, alpha=16,
    # dropout 0.05 on q and v only, no checkpointing, lm-head/loss chunked by 128 tokens, micro-batch of the
    # longest Alpaca example (1304 Llama-2 tokens, unpadded: plain causal attention). "Max GPU RAM" is
    # torch.cuda.max_memory_allocated() in GB.
    *[dict(source="LitGPT", label=f"Llama-2-{size} LoRA{q}, A100, micro-batch {mb}", family=f"llama-2-{size.lower()}",
           method="qlora" if q else "lora", double_quant=q == " nf4-dq", targets=["q_proj", "v_proj"], r=8,
           dropout=0.05, batch=mb, seq=1304, gc=False, masked=False, gpu="A100-40GB", loss="logits", chunks=11, memory=mem * GB)
      for size, q, mb, mem in [("7B", "", 1, 21.30), ("7B", " nf4", 1, 14.14), ("7B", " nf4-dq", 1, 13.84),
                               ("7B", "", 2, 29.07), ("13B", "", 1, 38.12), ("13B", " nf4", 1, 23.14),
                               ("13B", " nf4-dq", 1, 22.55)]],
]


def published_predictions() -> list[dict]:
    """The advisor's prediction for each published run, twice: lorakit running those settings (fp32
    adapters, one-shot loss), and with the framework's own documented choices (bf16 adapters, chunked
    loss; LitGPT's bitsandbytes 4-bit matmul also saves its input x for backward, lorakit's saves nothing).
    Both exclude the load phase: these frameworks quantize while loading. 'allocated' is tensors only
    (max_memory_allocated); the total adds the CUDA context and allocator slack."""
    import dataclasses

    from lorakit.advise import assumed_gpu_rates, memory_model, model_shape, resolve_workload, time_model
    from lorakit.config import DataConfig, LoraConfig, QuantConfig, RunConfig, TrainConfig

    out = []
    for p in PUBLISHED:
        config = RunConfig(base_model=p["family"], method=p["method"],
                           lora=LoraConfig(r=p["r"], alpha=2 * p["r"], dropout=p["dropout"], target_modules=p["targets"]),
                           quant=QuantConfig(double_quant=p.get("double_quant", True)),
                           data=DataConfig(max_seq_len=p["seq"]),
                           train=TrainConfig(micro_batch_size=p["batch"], grad_accum=1, gradient_checkpointing=p["gc"],
                                             device="cuda", dtype="bfloat16"))
        shape = model_shape(p["family"])
        ours = resolve_workload(config, shape, "cuda", masked=p["masked"])
        theirs = dataclasses.replace(ours, adapter_bytes=2, loss=p["loss"], loss_chunks=p["chunks"])
        row = dict(p, lorakit=_training_peak(memory_model(ours, shape)),
                   framework=_training_peak(memory_model(theirs, shape)))
        if p["source"] == "LitGPT" and p["method"] == "qlora":  # bnb's MatMul4Bit saves x: b·(d + d + i) per token
            extra = shape.layers * ours.tokens * 2 * (2 * shape.hidden + shape.intermediate)
            row["framework"] = {k: v + extra for k, v in row["framework"].items()}
        if "tokens_per_s" in p:
            step = time_model(theirs, shape, assumed_gpu_rates(p["gpu"])).step_time_s
            row["pred_tokens_per_s"] = ours.tokens / step
        out.append(row)
    return out


def _training_peak(mem) -> dict:
    """Peak over the training phases (not the load), tensors only and with the CUDA overheads."""
    from lorakit.advise import CUDA_ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES

    phases = {k: v for k, v in mem.phases.items() if k != "load"}
    total = max(phases.values())
    return {"total": total, "allocated": (total - CUDA_CONTEXT_BYTES) / (1 + CUDA_ALLOCATOR_SLACK)}


def render_published(rows: list[dict]) -> str:
    lines = ["| source | run | published peak | predicted, lorakit's choices (ratio) | "
             "predicted, framework's choices: allocated / +context+slack (ratios) | published tok/s | predicted tok/s (ratio) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pub = r["memory"]
        unit, scale = ("GiB", 2**30) if r["source"] == "torchtune" else ("GB", GB)
        ours, fw = r["lorakit"]["total"], r["framework"]
        speed = (f"{r['tokens_per_s']} | {r['pred_tokens_per_s']:.0f} ({r['pred_tokens_per_s'] / r['tokens_per_s']:.2f})"
                 if "tokens_per_s" in r else "– | –")
        lines.append(f"| {r['source']} | {r['label']} | {pub / scale:.2f} {unit} | {ours / scale:.2f} ({ours / pub:.2f}) | "
                     f"{fw['allocated'] / scale:.2f} / {fw['total'] / scale:.2f} "
                     f"({fw['allocated'] / pub:.2f} / {fw['total'] / pub:.2f}) | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
