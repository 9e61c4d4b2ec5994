"""The server's engine in-process, without HTTP: decode tokens/s per case, and decode steps profiled.

    python bench/profile_serve.py --sizes 1024x4,512x6 --threads 1 --repeats 5 --profile

Builds the same models and adapters as bench/bench_serve.py (`build_world`), loads them the way the server
does (`load_serving_base`, `AdapterBank`), and drives one `Engine` per case by hand (their threads are not
started): each repetition submits --rows jobs to every case's engine and prefills them, then takes --steps
decode steps (`Engine._step`: forward, sampling, detokenizing, events) round-robin over the cases -- one
step of each case in turn, the order rotating -- so that a change in the machine's load between cases falls
on all of them alike. Time is wall and this thread's CPU time (one torch thread: the work is on this thread;
CPU time is what other jobs on a shared machine disturb least), summed over a repetition's steps per case;
median and best repetition reported. Cases:

    merged   adapter a1 merged into the base; every row on that model (no LoRA in the forward)
    single   base + adapters, every row on a1 (unmerged single-adapter decode)
    mixed    rows spread over base, a1..a4 (5 kinds per forward, as bench_serve's mixed case)
    mixed8   rows spread over a1..a8 (8 distinct adapters per forward)

`--reference` adds single/mixed/mixed8 on the reference per-adapter loop (`adapter_rows(..., grouped=False)`),
alternating with the rest. `--profile` prints torch.profiler's table (self CPU time) of --profile-steps decode
steps of each of --profile-cases (default mixed; divide by --profile-steps for one step; `--profile-reference`:
on the reference path).
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


def engines(world: dict, max_batch: int, cases: list[str]) -> dict[str, tuple[Engine, AdapterBank]]:
    """(engine, bank) per case: the merged model for `merged`, the base holding a1..a8 for the others (one
    engine, and so one running batch, per case over the shared model)."""
    loaded = {}
    for kind, base in (("merged", world["merged"]), ("lora", world["base"])):
        model, tokenizer = load_serving_base(ServeSettings(base=base, device="cpu", dtype="float32"))
        lock = threading.Lock()
        bank = AdapterBank(model, lock, base)
        if kind == "lora":
            for name in CASES["mixed8"]:
                bank.load(name, world["root"] / name, trusted=True)
        loaded[kind] = (model, tokenizer, lock, bank)
    out = {}
    for case in cases:
        model, tokenizer, lock, bank = loaded["merged" if case == "merged" else "lora"]
        out[case] = (Engine(model, tokenizer, lock, bank.release, max_batch=max_batch), bank)
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


def step(engine: Engine) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) of one decode step. With one torch thread the work runs
    on this thread, so CPU time is the figure that neighbours on a shared machine disturb least."""
    wall, cpu = time.perf_counter(), time.thread_time()
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


def names_of(case: str) -> list:
    return CASES[case.removesuffix("_ref")] or [None]


def interleaved(built: dict, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    """One repetition: every case prefilled, then --steps decode steps round-robin (the first case rotating);
    (decode wall s, decode CPU s, prefill s) per case."""
    cases = list(built)
    prefill = {}
    for case in cases:
        engine, bank = built[case]
        with reference_path(case.endswith("_ref")):
            prefill[case] = fill(engine, bank, names_of(case), prompts, args.rows, args.steps)
    wall, cpu = dict.fromkeys(cases, 0.0), dict.fromkeys(cases, 0.0)
    for i in range(args.steps):
        for case in cases[i % len(cases):] + cases[: i % len(cases)]:
            with reference_path(case.endswith("_ref")):
                w, c = step(built[case][0])
            wall[case] += w
            cpu[case] += c
    for engine, _ in built.values():
        clear(engine)
    return {case: (wall[case], cpu[case], prefill[case]) for case in cases}


def profiled(built: dict, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, str]:
    """torch.profiler's table of --profile-steps decode steps per case in --profile-cases."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for case in args.profile_cases.split(","):
        engine, bank = built[case]
        with reference_path(args.profile_reference):
            fill(engine, bank, names_of(case), prompts, args.rows, args.steps)
            for _ in range(2):
                engine._step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):  # several steps: one alone is at the mercy of neighbours
                    engine._step()
        clear(engine)
        tables[case] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    return tables


def measure(world: dict, args: argparse.Namespace) -> dict:
    cases = [*CASES, *([f"{c}_ref" for c in ("single", "mixed", "mixed8")] if args.reference else [])]
    built = engines(world, args.rows, cases)
    tok = built["merged"][0].tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in world["prompts"]]
    runs = [interleaved(built, prompts, args) for _ in range(args.repeats + 1)][1:]  # the first round warms up
    tokens = args.rows * args.steps
    result = {}
    for case in cases:
        tok_s = [tokens / r[case][0] for r in runs]
        tok_cpu = [tokens / r[case][1] for r in runs]
        result[case] = {"decode_tok_s": statistics.median(tok_s), "runs": [round(x, 1) for x in tok_s],
                        "decode_tok_cpu_s": statistics.median(tok_cpu), "cpu_runs": [round(x, 1) for x in tok_cpu],
                        "best_tok_cpu_s": max(tok_cpu), "prefill_s": statistics.median(r[case][2] for r in runs)}
    if args.profile:
        result["profile"] = profiled(built, prompts, args)
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
    parser.add_argument("--profile-cases", default="mixed", help="cases profiled, comma-separated")
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
        for case, table in res.get("profile", {}).items():
            print(f"profile: {case}, {args.profile_steps} decode steps", flush=True)
            print(table, flush=True)
        out[f"h{hidden}x{layers}"] = res
    out["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
