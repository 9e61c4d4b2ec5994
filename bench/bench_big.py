"""Big models on a CPU: streamed QLoRA loading, batch-1 steps, shard-streamed merge (issue #21).

    python bench/bench_big.py make --model 1b --dir /work/bench-models          # 1.9 GB, bf16, 5 shards
    python bench/bench_big.py make --model 8b --dir /work/bench-models          # 16 GB, bf16, 4 GB shards
    python bench/bench_big.py run --model 1b --dir /work/bench-models --repeats 2 --json bench/results/big-1b.json
    python bench/bench_big.py run --model 8b --dir /work/bench-models --json bench/results/big-8b.json
    python bench/bench_big.py render bench/results/big-1b.json bench/results/big-8b.json --results bench/RESULTS.md

`make` writes a random-init Llama (bf16) shard by shard: each tensor is generated, appended to the
current shard, and the shard is saved and dropped when full, so the model never exists in memory.

`run` measures, each in a fresh process (`worker`), with the 1-minute load average beside each figure:
  load        peak RSS (VmHWM) of `lorakit.quant.load_quantized_model` against the issue's goal
              1.2 x (NF4 bytes + unquantized bytes) + 0.6 GiB, and of transformers + bitsandbytes
              (`from_pretrained(quantization_config=NF4, double quant, fp32 compute)`, 1b only)
  step        batch 1 x seq (64, 512; 256 for 8b) with gradient checkpointing, LoRA r=16 on all
              linear layers, AdamW: lorakit QLoRA (streamed base), lorakit fp32 LoRA, PEFT + bnb QLoRA;
              the no-grad forward of the same model at 1 x 64 in the seq-64 processes
  micro       one 2048 -> 5632 layer at 1 and 64 rows: fp32 matmul, NF4 whole-weight, NF4 tiled
  merge       `lorakit.export.merge_adapter_streaming` of a random r=16 adapter (peak, time), and a
              check that transformers loads the output with logits equal to the in-memory merge
Stacks run in alternating order within each repetition; figures are medians over repetitions
(steps: over every timed step), peaks the highest seen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GiB = 2**30
MODELS = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, shard_bytes=400 * 2**20),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, shard_bytes=4 * GiB),
}
SECTION = "## Big models: streamed QLoRA (CPU)"
STACKS = {  # step processes: LoRA r=16 on every linear layer, AdamW, gradient checkpointing, batch 1
    "lorakit-qlora": "lorakit QLoRA as `lorakit train` runs it (fp32 model, NF4 matmuls in quant.compute_dtype auto)",
    "lorakit-lora": "lorakit LoRA, fp32 base",
    "peft-qlora": "transformers + PEFT + bitsandbytes QLoRA, compute fp32",
    "lorakit-qlora-fp32": "lorakit QLoRA with quant.compute_dtype: float32",
    "peft-qlora-bf16": "transformers + PEFT + bitsandbytes QLoRA, compute bf16",
}
LORA = dict(r=16, alpha=32)


# --------------------------------------------------------------------------- model on disk


def make_model(name: str, root: Path) -> Path:
    """Write the `name` Llama (random, bf16) under root/name, one shard in memory at a time."""
    import transformers as tf
    from safetensors.torch import save_file

    spec = dict(MODELS[name])
    shard_bytes = spec.pop("shard_bytes")
    config = tf.LlamaConfig(**spec, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
                            rope_theta=500000.0 if name == "8b" else 10000.0)
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    with torch.device("meta"):
        shapes = [(k, tuple(v.shape)) for k, v in tf.LlamaForCausalLM(config).state_dict().items()]
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []

    def flush() -> None:
        files.append(list(shard))
        save_file(shard, path / f"part-{len(files)}.safetensors", metadata={"format": "pt"})
        shard.clear()

    for key, shape in shapes:
        if "norm" in key:
            value = torch.ones(shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if shard and sum(t.numel() * 2 for t in shard.values()) + value.numel() * 2 > shard_bytes:
            flush()
        shard[key] = value
    flush()
    weight_map = {}
    for i, keys in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (path / f"part-{i}.safetensors").rename(path / final)
        weight_map |= dict.fromkeys(keys, final)
    total = sum(math.prod(s) * 2 for _, s in shapes)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    return path


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A random r=16 PEFT adapter on every linear layer (no model needed: shapes from the index)."""
    from safetensors.torch import save_file

    from lorakit.quant.safetensors_io import CheckpointFiles

    g = torch.Generator().manual_seed(5)
    tensors = {}
    for key, info in CheckpointFiles.open(model_dir).tensors.items():
        if key.endswith("proj.weight"):
            module = key.removesuffix(".weight")
            out_f, in_f = info.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(LORA["r"], in_f, generator=g) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, LORA["r"], generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA["r"], "lora_alpha": LORA["alpha"],
              "lora_dropout": 0.0, "target_modules": sorted({k.split(".")[-3] for k in tensors}),
              "bias": "none", "fan_in_fan_out": False}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


# --------------------------------------------------------------------------- workers (one per process)


def vm_hwm() -> int:
    from lorakit.runtime.devices import proc_kib

    return proc_kib("/proc/self/status", "VmHWM") or 0


def load_1min() -> float:
    return os.getloadavg()[0]


def worker_load(spec: dict) -> dict:
    t0 = time.perf_counter()
    if spec["stack"] == "lorakit":
        from lorakit.quant import load_quantized_model

        model = load_quantized_model(spec["model_dir"], compute_dtype=torch.float32)
        info = model.lorakit_load
        extra = {"nf4_bytes": info.nf4_bytes, "other_bytes": info.other_bytes,
                 "largest_tensor_bytes": info.largest_tensor_bytes}
    else:
        model, extra = _peft_qlora(spec["model_dir"]), {}
    return {"load_s": time.perf_counter() - t0, "peak_rss": vm_hwm(), **extra}


def _peft_qlora(model_dir: str, compute: torch.dtype = torch.float32):
    import transformers as tf

    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
    return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config,
                                                   device_map="cpu")


def _trainer(spec: dict):
    """(model, loss_fn(ids) -> mean CE) for spec['stack'] in STACKS."""
    from lorakit.config import LoraConfig, QuantConfig

    stack = spec["stack"]
    if stack.startswith("peft"):
        import peft

        if spec.get("device", "cpu") != "cpu":
            raise SystemExit("the PEFT + bitsandbytes stacks run on the CPU here (bench_big's --device is for lorakit's)")

        compute = torch.bfloat16 if stack.endswith("bf16") else torch.float32
        base = _peft_qlora(spec["model_dir"], compute)
        model = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                           target_modules="all-linear"))

        def loss_fn(ids):
            return model(input_ids=ids, labels=ids).loss
    else:
        from lorakit.lora import inject_lora
        from lorakit.loss import causal_lm_loss_sum
        from lorakit.models import load_model
        from lorakit.quant import load_quantized_model
        from lorakit.runtime.devices import pick_dtype, pick_matmul_dtype

        device = spec.get("device", "cpu")
        dtype = pick_dtype("auto", device)  # train.dtype auto: fp32 on a CPU, bf16 on CUDA
        if stack == "lorakit-lora":
            model = load_model(spec["model_dir"], dtype=dtype, device=device)
        else:  # as `lorakit train` (models.load_base) loads it: the model in train.dtype, NF4 matmuls in quant.compute_dtype
            quant = QuantConfig(compute_dtype="float32" if stack.endswith("fp32") else "auto")
            matmul = pick_matmul_dtype(quant.compute_dtype, device, dtype)  # auto: bf16 where bf16 is fast
            model = load_quantized_model(spec["model_dir"], quant_config=quant, compute_dtype=dtype, device=device,
                                         matmul_dtype=matmul)
        inject_lora(model, LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, target_modules="all-linear"))

        def loss_fn(ids):
            return causal_lm_loss_sum(model, {"input_ids": ids}, ids) / (ids.numel() - ids.shape[0])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train(), loss_fn


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> int:
    """Peak bytes so far: RSS on a CPU, the allocator's peak on CUDA."""
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else vm_hwm()


def worker_step(spec: dict) -> dict:
    """One load, then for each seq in spec["seqs"]: warmup + timed steps; the no-grad forward at 1 x 64."""
    torch.manual_seed(0)
    device = spec.get("device", "cpu")
    t0 = time.perf_counter()
    model, loss_fn = _trainer(spec)
    load_s, load_peak = time.perf_counter() - t0, _peak(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    out: dict = {"load_s": load_s, "load_peak_rss": load_peak, "per_seq": {}}
    for seq in spec["seqs"]:
        times, loads = [], []
        for i in range(spec["warmup"] + spec["steps"][str(seq)]):
            ids = torch.randint(3, spec["vocab"], (1, seq), generator=g).to(device)  # (1, T)
            _sync(device)
            start = time.perf_counter()
            loss = loss_fn(ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - start)
                loads.append(load_1min())
        out["per_seq"][str(seq)] = {"step_times": times, "step_s": statistics.median(times), "peak_rss": _peak(device),
                                    "loss": float(loss), "step_load_1min": loads}
    if spec.get("forward"):
        model.eval()
        ids = torch.randint(3, spec["vocab"], (1, 64), generator=g).to(device)
        fwd = []
        with torch.no_grad():
            for _ in range(3):
                _sync(device)
                start = time.perf_counter()
                model(input_ids=ids)
                _sync(device)
                fwd.append(time.perf_counter() - start)
        out["forward_times"], out["forward_s"] = fwd, statistics.median(fwd[1:])
        if not spec["stack"].startswith("peft"):
            out["eval40_s"] = eval_40_rows(model, loss_fn, spec["vocab"], g, device)
    return out


def eval_40_rows(model, loss_fn, vocab: int, g: torch.Generator, device: str = "cpu") -> float:
    """Seconds for the eval loss of 40 short rows (32 tokens) as lorakit's eval runs it: no grad, batches of
    RunConfig.eval_batch_rows() rows (16 at max_seq_len 64 and micro-batch 1), so 3 forwards, not 40."""
    from lorakit.config import DataConfig, RunConfig, TrainConfig

    rows = RunConfig(data=DataConfig(max_seq_len=64), train=TrainConfig(micro_batch_size=1)).eval_batch_rows()
    ids = torch.randint(3, vocab, (40, 32), generator=g).to(device)  # (40, T)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), rows):
            loss_fn(ids[i:i + rows])
    _sync(device)
    return time.perf_counter() - start


def worker_micro(spec: dict) -> dict:
    """One 2048 -> 5632 layer: fp32 dense, NF4 whole-weight, NF4 tiled, forward and input-gradient."""
    import lorakit.quant.linear as ql
    from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

    torch.manual_seed(0)
    out_f, in_f = 5632, 2048
    state = quantize_nf4(torch.randn(out_f, in_f) * 0.02)
    dense = dequantize_nf4(state)
    limit = ql.TILED_MAX_ROWS
    results: dict[str, list[float]] = {}

    def clock(name: str, fn) -> None:
        fn()
        for _ in range(spec["micro_repeats"]):
            start = time.perf_counter()
            fn()
            results.setdefault(name, []).append((time.perf_counter() - start) * 1e3)

    for rows in (1, 64):
        x, g = torch.randn(rows, in_f), torch.randn(rows, out_f)
        for _ in range(2):  # alternate the three, twice
            clock(f"{rows} fp32 fwd", lambda x=x: torch.mm(x, dense.t()))
            clock(f"{rows} fp32 bwd", lambda g=g: torch.mm(g, dense))
            for mode, rows_limit in (("plain", 0), ("tiled", 10**9)):
                ql.TILED_MAX_ROWS = rows_limit
                clock(f"{rows} nf4 {mode} fwd", lambda x=x: ql.nf4_linear(x, state, torch.float32))
                clock(f"{rows} nf4 {mode} bwd", lambda g=g: ql.nf4_grad_input(g, state, torch.float32))
            ql.TILED_MAX_ROWS = limit
    return {"micro_ms": {k: statistics.median(v) for k, v in results.items()}, "micro_all": results}


def worker_merge(spec: dict) -> dict:
    from lorakit.export.merge_stream import merge_adapter_streaming

    t0 = time.perf_counter()
    merge_adapter_streaming(spec["model_dir"], spec["adapter_dir"], spec["out_dir"])
    return {"merge_s": time.perf_counter() - t0, "peak_rss": vm_hwm()}


def worker_merge_check(spec: dict) -> dict:
    """transformers loads the streamed merge; its logits equal the in-memory merge's (both bf16)."""
    import transformers as tf

    from lorakit.adapters import load_lora_adapter
    from lorakit.lora import merge_lora_weights
    from lorakit.models import load_model

    ids = torch.randint(3, spec["vocab"], (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        streamed = tf.AutoModelForCausalLM.from_pretrained(spec["out_dir"], dtype=torch.bfloat16).eval()
        want_streamed = streamed(input_ids=ids).logits
        del streamed
        model = load_model(spec["model_dir"], dtype=torch.bfloat16)
        load_lora_adapter(model, spec["adapter_dir"], check_base=False)
        merged = merge_lora_weights(model, remove_wrappers=True)
        want = merged(input_ids=ids).logits
    return {"logits_equal": bool(torch.equal(want, want_streamed)),
            "max_abs_diff": float((want.float() - want_streamed.float()).abs().max())}


WORKERS = {"load": worker_load, "step": worker_step, "micro": worker_micro, "merge": worker_merge,
           "merge_check": worker_merge_check}


# --------------------------------------------------------------------------- driver


def run_worker(spec: dict, timeout: float = 3600) -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    before = load_1min()
    try:
        out = subprocess.run([sys.executable, __file__, "worker", json.dumps(spec)], capture_output=True, text=True,
                             env=env, timeout=timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if out.returncode == 0 and lines else {"error": out.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout} s"}
    result = {**{k: spec[k] for k in ("kind", "stack") if k in spec}, **result,
              "load_1min": [before, load_1min()]}
    print(json.dumps({k: v for k, v in result.items() if k not in ("micro_all", "step_load_1min")}),
          file=sys.stderr, flush=True)
    return result


def plan(args: argparse.Namespace) -> list[list[dict]]:
    """Groups of measurements; within a group the stacks alternate in order from one repetition to the next.
    A step process loads once and runs every seq (the loads dominate on a busy 2-core machine)."""
    steps = {str(seq): (args.steps if seq <= 64 else args.steps_long) for seq in args.seqs}
    if args.model == "8b":  # the load peak is the step process's VmHWM before its first step
        return [[{"kind": "step", "stack": "lorakit-qlora", "seqs": [256], "steps": {"256": args.steps_8b},
                  "warmup": 1}]]
    stacks = args.stacks or list(STACKS)
    groups = [[{"kind": "step", "stack": s, "seqs": args.seqs, "steps": steps, "warmup": 1, "forward": True}
               for s in stacks]]
    if args.loads:
        groups.insert(0, [{"kind": "load", "stack": s} for s in ("lorakit", "peft")])
    return groups + [[{"kind": "micro", "micro_repeats": 5}]]


def split_steps(result: dict) -> list[dict]:
    """One row per seq from a multi-seq step process (kind, stack, seq, step_times, ...)."""
    if result.get("kind") != "step" or "per_seq" not in result:
        return [result]
    base = {k: v for k, v in result.items() if k != "per_seq"}
    return [{**base, "seq": int(seq), **fig, "forward_s": base.get("forward_s") if int(seq) == 64 else None}
            for seq, fig in result["per_seq"].items()]


def run(args: argparse.Namespace) -> dict:
    model_dir = args.dir / args.model
    if not (model_dir / "model.safetensors.index.json").is_file():
        make_model(args.model, args.dir)
    base = {"model_dir": str(model_dir), "vocab": MODELS[args.model]["vocab_size"], "threads": args.threads,
            "device": args.device}
    out = {"model": args.model, "config": MODELS[args.model], "command": command_line(), "machine": machine(args.threads),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0, "results": []}
    started = time.time()

    def record(result: dict, repeat: int) -> None:  # written after every process: a cut-short run keeps its rows
        out["results"] += [{**r, "repeat": repeat} for r in split_steps(result)]
        out["wall_s"] = time.time() - started
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))

    for repeat in range(args.repeats):
        for group in plan(args):
            for item in group if repeat % 2 == 0 else group[::-1]:
                record(run_worker({**base, **item}), repeat)
    if args.model == "1b" and args.merge:
        adapter = make_adapter(model_dir, args.dir / "adapter-1b")
        spec = {**base, "adapter_dir": str(adapter), "out_dir": str(args.dir / "merged-1b")}
        for repeat in range(args.repeats):
            record(run_worker({**spec, "kind": "merge"}), repeat)
        record(run_worker({**spec, "kind": "merge_check"}), 0)
    return out


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def machine(threads: int | None = None) -> str:
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (f"{os.cpu_count()} CPU cores ({names[0] if names else '?'}), {mem:.0f} GiB RAM, torch {torch.__version__}, "
            f"{threads or torch.get_num_threads()} thread(s) per worker, shared with other jobs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    make = sub.add_parser("make")
    make.add_argument("--model", choices=sorted(MODELS), required=True)
    make.add_argument("--dir", type=Path, default=Path("/work/bench-models"))
    r = sub.add_parser("run")
    r.add_argument("--model", choices=sorted(MODELS), required=True)
    r.add_argument("--dir", type=Path, default=Path("/work/bench-models"))
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--seqs", type=int, nargs="+", default=[64, 512])
    r.add_argument("--steps", type=int, default=2, help="timed steps at seq <= 64 per process (after one warmup)")
    r.add_argument("--steps-long", type=int, default=1, help="timed steps at longer seqs")
    r.add_argument("--steps-8b", type=int, default=2)
    r.add_argument("--loads", action=argparse.BooleanOptionalAction, default=True, help="the load-only processes")
    r.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--threads", type=int, help="torch threads per worker (default: torch's); 1 on a shared machine, "
                   "where a 2-thread op waits for a descheduled thread at every parallel region")
    r.add_argument("--stacks", nargs="+", choices=list(STACKS), help="step processes to run (default: all)")
    r.add_argument("--device", default="cpu", help="where lorakit's step processes run (cuda: peaks are the "
                   "allocator's, the model in bf16 as train.dtype auto picks; PEFT + bnb stacks stay CPU-only)")
    r.add_argument("--json", type=Path, required=True)
    rd = sub.add_parser("render")
    rd.add_argument("runs", type=Path, nargs="+")
    rd.add_argument("--results", type=Path)
    rd.add_argument("--notes", type=Path)
    w = sub.add_parser("worker")
    w.add_argument("spec")
    args = p.parse_args()
    if args.cmd == "make":
        print(make_model(args.model, args.dir))
    elif args.cmd == "worker":
        spec = json.loads(args.spec)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        print("RESULT " + json.dumps(WORKERS[spec["kind"]](spec)), flush=True)
    elif args.cmd == "run":
        run(args)
    else:
        sys.path.insert(0, str(HERE))
        from big_report import render
        from report import upsert_section

        section = render(SECTION, [json.loads(p.read_text()) for p in args.runs],
                         args.notes.read_text() if args.notes else "")
        print(section)
        if args.results:
            upsert_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
