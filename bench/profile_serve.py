"""The server's engine in-process, without HTTP: decode tokens/s per case, and one mixed decode step profiled.

    python bench/profile_serve.py --sizes 1024x4,512x6 --threads 1 --repeats 5 --profile

Builds the same models and adapters as bench/bench_serve.py (`build_world`), loads them the way the server
does (`load_serving_base`, `AdapterBank`), and drives an `Engine` by hand (its thread is not started):
submit --rows jobs, prefill them, then time --steps decode steps (`Engine._step`: forward, sampling,
detokenizing, events), in wall time and in this thread's CPU time (one torch thread: the work is on this
thread; CPU time is what other jobs on a shared machine disturb least), median and best run. Cases, measured alternately in every repetition (median reported):

    merged   adapter a1 merged into the base; every row on that model (no LoRA in the forward)
    single   base + adapters, every row on a1 (unmerged single-adapter decode)
    mixed    rows spread over base, a1..a4 (5 kinds per forward, as bench_serve's mixed case)
    mixed8   rows spread over a1..a8 (8 distinct adapters per forward)

`--reference` adds single/mixed/mixed8 on the reference per-adapter loop (`adapter_rows(..., grouped=False)`),
alternating with the rest. `--profile` prints torch.profiler's table (self CPU time) of --profile-steps mixed decode steps (divide by
it for one step; `--profile-reference`: on the reference path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakit.serve.engine as serve_engine  # noqa: E402
from bench_serve import build_world  # noqa: E402
from lorakit.config import GenerationConfig  # noqa: E402
from lorakit.lora import adapter_rows  # noqa: E402
from lorakit.serve import AdapterBank, Engine, Job, ServeSettings, load_serving_base  # noqa: E402

CASES = {"merged": None, "single": ["a1"], "mixed": [None, "a1", "a2", "a3", "a4"],
         "mixed8": ["a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8"]}


def engines(world: dict, max_batch: int) -> dict:
    """(engine, bank) for the merged model and for the base holding a1..a8."""
    out = {}
    for kind, base in (("merged", world["merged"]), ("lora", world["base"])):
        model, tokenizer = load_serving_base(ServeSettings(base=base, device="cpu", dtype="float32"))
        lock = threading.Lock()
        bank = AdapterBank(model, lock, base)
        if kind == "lora":
            for name in CASES["mixed8"]:
                bank.load(name, world["root"] / name, trusted=True)
        out[kind] = (Engine(model, tokenizer, lock, bank.release, max_batch=max_batch), bank)
    return out


def fill(engine: Engine, bank: AdapterBank, names: list, prompts: list[list[int]], rows: int, steps: int) -> float:
    """Submit and prefill `rows` jobs (row i on names[i % len]); returns the prefill seconds."""
    config = GenerationConfig(max_new_tokens=steps + 2)
    jobs = [Job(prompts[i % len(prompts)], None if names[i % len(names)] is None else
                bank.acquire(names[i % len(names)]), config, lambda e: None, index=i, ignore_eos=True)
            for i in range(rows)]
    engine.submit(jobs)
    admitted = engine._admissions()
    start = time.perf_counter()
    engine._prefill(admitted)
    return time.perf_counter() - start


def decode(engine: Engine, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) for `steps` decode steps. With one torch thread the
    work runs on this thread, so CPU time is the figure that neighbours on a shared machine disturb least."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        engine._step()
    return time.perf_counter() - wall, time.thread_time() - cpu


@contextlib.contextmanager
def reference_path(on: bool):
    """The engine's forwards on the reference per-adapter loop while `on`."""
    if on:
        serve_engine.adapter_rows = lambda model, names: adapter_rows(model, names, grouped=False)
    try:
        yield
    finally:
        serve_engine.adapter_rows = adapter_rows


def clear(engine: Engine) -> None:
    for job in engine.rows:
        engine._finish(job, "cancelled")
    engine._drop(lambda job: job.done)


def measure(world: dict, args: argparse.Namespace) -> dict:
    built = engines(world, args.rows)
    tok = built["lora"][0].tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in world["prompts"]]
    cases = {**CASES, **({f"{c}_ref": CASES[c] for c in ("single", "mixed", "mixed8")} if args.reference else {})}
    times: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    prefill: dict[str, list[float]] = {c: [] for c in cases}
    for rep in range(args.repeats + 1):  # the first round warms up
        for case, names in cases.items():
            engine, bank = built["merged" if case == "merged" else "lora"]
            with reference_path(case.endswith("_ref")):
                p = fill(engine, bank, names or [None], prompts, args.rows, args.steps)
                t, c = decode(engine, args.steps)
            clear(engine)
            if rep:
                times[case].append(args.rows * args.steps / t)
                cpu[case].append(args.rows * args.steps / c)
                prefill[case].append(p)
    result = {case: {"decode_tok_s": statistics.median(v), "runs": [round(x, 1) for x in v],
                     "decode_tok_cpu_s": statistics.median(cpu[case]), "cpu_runs": [round(x, 1) for x in cpu[case]],
                     "best_tok_cpu_s": max(cpu[case]), "prefill_s": statistics.median(prefill[case])}
              for case, v in times.items()}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        engine, bank = built["lora"]
        with reference_path(args.profile_reference):
            fill(engine, bank, CASES["mixed"], prompts, args.rows, args.steps)
            decode(engine, 2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):  # several steps: one alone is at the mercy of neighbours
                    engine._step()
        clear(engine)
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024x4,512x6")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time the reference per-adapter loop")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-reference", action="store_true", help="profile the reference path")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--profile-steps", type=int, default=5, help="decode steps profiled (the table sums them)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"loadavg_start": open("/proc/loadavg").read().split()[:3]}
    for size in args.sizes.split(","):
        hidden, layers = (int(v) for v in size.lower().split("x"))
        with tempfile.TemporaryDirectory(prefix="lorakit-profile-serve-") as tmp:
            world = build_world(Path(tmp), hidden, layers)
            res = measure(world, args)
        merged, merged_cpu, merged_best = (res["merged"][k] for k in ("decode_tok_s", "decode_tok_cpu_s", "best_tok_cpu_s"))
        print(f"-- h{hidden}x{layers}  load {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
        for case in [c for c in res if c != "profile"]:
            r = res[case]
            print(f"{case:7s} decode {r['decode_tok_s']:7.1f} tok/s wall (÷ merged {r['decode_tok_s'] / merged:.2f}), "
                  f"{r['decode_tok_cpu_s']:7.1f} tok/CPU-s (÷ merged {r['decode_tok_cpu_s'] / merged_cpu:.2f}), "
                  f"best {r['best_tok_cpu_s']:7.1f} (÷ merged {r['best_tok_cpu_s'] / merged_best:.2f})  "
                  f"prefill {r['prefill_s']:.3f} s", flush=True)
        if "profile" in res:
            print(res["profile"], flush=True)
        out[f"h{hidden}x{layers}"] = res
    out["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
