"""Load test of `lorakit serve` on loopback: mixed adapters, 8 adapters, one unmerged adapter, versus one merged model.

    python bench/bench_serve.py --requests 200 --concurrency 16 --sizes 1024x4,512x6 --threads 1 --repeats 3 --results bench/RESULTS.md

What it does, all offline:
1. Builds a small random Llama (byte-level BPE tokenizer from lorakit.demo) and 4 adapters of ranks
   8/16/32/64 on different targets, with random (non-zero) B factors, plus a 5th adapter "hot" in the
   adapter root; and the base with adapter a1 merged in (`export_merged`).
2. Starts `python -m lorakit serve` as a subprocess for each case and drives it with the official
   `openai` async client, `--concurrency` requests in flight, completions and chat mixed:
     merged  every request to one merged model (no LoRA at all): the reference throughput
     mixed   requests spread over base, a1..a4: one forward carries rows of several adapters
     mixed8  requests spread over a1..a8 (8 adapters of ranks 4-64 loaded): 8 distinct adapters per forward
     single  every request to a1, the only adapter loaded, unmerged
     hot     as mixed, while a side task loads "hot", sends it requests, and unloads it while those
             requests are still running -- in cycles, for the whole run
   Every request asks for exactly --max-tokens tokens (`ignore_eos`, a vLLM extension), so the cases
   generate the same work. The `--cases` alternate `--repeats` times (the median is reported), so a
   noisy neighbour on the machine hurts them alike; the 1-minute load average is recorded with each run.
3. Reports errors, p50/p95 latency, requests/s, generated tokens/s, the mean rows per forward and the
   most adapters seen in one forward (from /health), and each case's throughput ÷ merged; `--results`
   writes them into the "## Server" section of a markdown file (other sections are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ADAPTERS = {"a1": (8, "attention"), "a2": (16, "all-linear"), "a3": (32, ["q_proj", "v_proj"]), "a4": (64, "all-linear"),
            "hot": (16, "attention"),
            # for the 8-adapter case (a1..a8 in every batch): more ranks and target sets
            "a5": (4, "all-linear"), "a6": (12, ["q_proj", "k_proj", "v_proj"]), "a7": (24, ["gate_proj", "up_proj", "down_proj"]),
            "a8": (48, "attention")}


# --------------------------------------------------------------------------- models on disk


def build_world(workdir: Path, hidden: int, layers: int) -> dict:
    """Base, adapters (in an adapter root) and the merged model, saved under `workdir`."""
    import transformers as tf

    from lorakit.adapters import export_merged, load_lora_adapter, save_lora_adapter
    from lorakit.config import LoraConfig
    from lorakit.demo import build_tokenizer, pretraining_corpus
    from lorakit.lora import inject_lora
    from lorakit.models import load_model

    tokenizer = build_tokenizer(pretraining_corpus(400, seed=1), vocab_size=512, max_len=1024)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64,
                            num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=1024,
                            eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    base = workdir / "base"
    tf.LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    root = workdir / "adapters"
    for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        model = load_model(str(base))
        inject_lora(model, LoraConfig(r=rank, alpha=rank, target_modules=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # as after training: B is no longer zero, so every adapter answers differently
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.02)
        save_lora_adapter(model, root / name)
    merged = load_model(str(base))
    load_lora_adapter(merged, root / "a1")
    export_merged(merged, workdir / "merged", tokenizer)
    prompts = [text[: 40 + (i * 37) % 160] for i, text in enumerate(pretraining_corpus(64, seed=7))]
    return {"base": str(base), "root": root, "merged": str(workdir / "merged"), "prompts": prompts}


# --------------------------------------------------------------------------- the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str, adapters: dict[str, Path], root: Path, args: argparse.Namespace, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "lorakit", "serve", "--base", base, "--port", str(port), "--max-batch",
           str(args.max_batch), "--device", "cpu", "--dtype", "float32", "--adapter-root", str(root)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within 300 s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- the load


@dataclass
class Result:
    case: str
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    hot_cycles: int = 0
    hot_requests: int = 0
    stats: dict = field(default_factory=dict)
    load: float = 0.0  # 1-minute load average when the run started

    def row(self) -> dict:
        lat = sorted(self.latencies)
        return {"case": self.case, "requests": len(lat) + len(self.errors), "errors": len(self.errors),
                "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "req_per_s": len(lat) / self.wall,
                "tok_per_s": self.tokens / self.wall, "wall_s": self.wall,
                "rows_per_forward": self.stats.get("rows_forwarded", 0) / max(self.stats.get("forwards", 1), 1),
                "max_adapters_per_forward": self.stats.get("max_adapters_per_forward", 0), "load": self.load}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client, model: str, i: int, prompts: list[str], max_tokens: int) -> int:
    """One completion (3 in 4) or chat (1 in 4) request; returns the tokens generated."""
    prompt = prompts[i % len(prompts)]
    extra = {"ignore_eos": True}
    if i % 4 == 3:
        out = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=max_tokens, temperature=0, extra_body=extra)
    else:
        out = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                              extra_body=extra)
    return out.usage.completion_tokens


async def hot_request(client, i: int, prompts: list[str], max_tokens: int, started: asyncio.Event) -> int:
    """A streamed request to "hot"; `started` is set at its first chunk (it is then running on the server)."""
    tokens = 0
    try:
        stream = await client.completions.create(model="hot", prompt=prompts[i % len(prompts)], max_tokens=max_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            started.set()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    finally:
        started.set()
    return tokens


async def timed(sem: asyncio.Semaphore | None, result: Result, coro_factory) -> None:
    async with sem if sem is not None else contextlib.nullcontext():
        start = time.perf_counter()
        try:
            tokens = await coro_factory()  # (not `result.tokens += await ...`: that reads the total before awaiting)
            result.tokens += tokens
            result.latencies.append(time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            result.errors.append(f"{type(e).__name__}: {e}")


async def hot_cycles(url: str, client, http, result: Result, done: asyncio.Event, args, prompts) -> None:
    """Load "hot", send it 4 streamed requests (beyond --concurrency), unload it as soon as all 4 are
    running (they must still finish), repeat until the main load is done."""
    i = 0
    while not done.is_set():
        r = await http.post(url + "/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "hot"})
        if r.status_code != 200:
            result.errors.append(f"load hot: {r.status_code} {r.text}")
            return
        started = [asyncio.Event() for _ in range(4)]
        tasks = [asyncio.create_task(timed(None, result, lambda k=i + j, ev=ev: hot_request(client, k, prompts,
                                                                                             args.max_tokens, ev)))
                 for j, ev in enumerate(started)]
        i += 4
        result.hot_requests += 4
        await asyncio.gather(*(ev.wait() for ev in started))
        r = await http.post(url + "/v1/unload_lora_adapter", json={"lora_name": "hot"})
        if r.status_code != 200:
            result.errors.append(f"unload hot: {r.status_code} {r.text}")
        await asyncio.gather(*tasks)
        result.hot_cycles += 1


async def drive(url: str, case: str, models: list[str], args: argparse.Namespace, prompts: list[str],
                requests: int, hot: bool = False) -> Result:
    import httpx
    from openai import AsyncOpenAI

    result, sem, done = Result(case, load=os.getloadavg()[0]), asyncio.Semaphore(args.concurrency), asyncio.Event()
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                             http_client=httpx.AsyncClient(timeout=600, limits=limits))
        before = (await http.get(url + "/health")).json()["stats"]
        side = asyncio.create_task(hot_cycles(url, client, http, result, done, args, prompts)) if hot else None
        start = time.perf_counter()
        await asyncio.gather(*(timed(sem, result, lambda i=i: one_request(client, models[i % len(models)], i, prompts,
                                                                          args.max_tokens))
                               for i in range(requests)))
        result.wall = time.perf_counter() - start
        done.set()
        if side is not None:
            await side
        after = (await http.get(url + "/health")).json()["stats"]
        result.stats = {**after, **{k: after[k] - before[k] for k in ("forwards", "rows_forwarded", "tokens")}}
        await client.close()
    return result


# case -> (adapters loaded at start, the models requests go to in turn; "base" = the base model)
CASES = {"merged": ([], ["base"]), "mixed": (["a1", "a2", "a3", "a4"], ["base", "a1", "a2", "a3", "a4"]),
         "mixed8": ([f"a{i}" for i in range(1, 9)], [f"a{i}" for i in range(1, 9)]), "single": (["a1"], ["a1"]),
         "hot": (["a1", "a2", "a3", "a4"], ["base", "a1", "a2", "a3", "a4"])}


def run_case(world: dict, case: str, args: argparse.Namespace, workdir: Path) -> Result:
    loaded, targets = CASES[case]
    base = world["merged"] if case == "merged" else world["base"]
    proc, url = start_server(base, {n: world["root"] / n for n in loaded}, world["root"], args,
                             workdir / f"server-{case}.log")
    try:
        models = [base if m == "base" else m for m in targets]
        asyncio.run(drive(url, case, models, args, world["prompts"], requests=args.concurrency))  # warm-up
        result = asyncio.run(drive(url, case, models, args, world["prompts"], args.requests, hot=case == "hot"))
    finally:
        stop_server(proc)
    row = result.row()
    print(f"{case:7s} load={row['load']:.1f} errors={row['errors']} p50={row['p50_s']:.2f}s p95={row['p95_s']:.2f}s "
          f"{row['req_per_s']:.2f} req/s {row['tok_per_s']:.0f} tok/s rows/forward={row['rows_per_forward']:.1f} "
          f"max adapters/forward={row['max_adapters_per_forward']}" +
          (f" hot cycles={result.hot_cycles} hot requests={result.hot_requests}" if case == "hot" else ""), flush=True)
    for error in result.errors[:5]:
        print("  error:", error, flush=True)
    return result


# --------------------------------------------------------------------------- report


def median_row(results: list[Result]) -> dict:
    rows = sorted((r.row() for r in results), key=lambda r: r["tok_per_s"])
    row = dict(rows[len(rows) // 2])
    row["errors"] = sum(r["errors"] for r in rows)
    return row


def markdown(sizes: list[tuple[str, dict[str, dict], Result]], args: argparse.Namespace, command: str, load: str) -> str:
    threads = f"{args.threads} thread(s) per server" if args.threads else "torch's default threads"
    lines = [
        "## Server", "",
        "`lorakit serve` on loopback, driven by the official `openai` async client "
        f"({args.requests} requests, {args.concurrency} in flight, {args.max_tokens} generated tokens each, "
        "greedy, 3 in 4 completions and 1 in 4 chat).", "",
        f"Command: `{command}`", "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"fp32, {threads}; load average (1/5/15 min) when it started: {load}, and the 1-minute load when each run "
        "started in the table. Models: random Llamas (vocab 512); adapters a1..a8 of ranks 8/16/32/64/4/12/24/48 on "
        "attention / all-linear / q,v / all-linear / all-linear / q,k,v / MLP / attention; "
        f"server --max-batch {args.max_batch}. {', '.join(args.cases)} alternate {args.repeats}× per model; "
        "the median run (by tokens/s) is shown.", "",
        "| model | case | load | requests | errors | p50 latency | p95 latency | requests/s | tokens/s | rows per forward "
        "| most adapters in one forward | ÷ merged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, rows, _ in sizes:
        for case, r in rows.items():
            ratio = f"**{r['tok_per_s'] / rows['merged']['tok_per_s']:.2f}×**" if case != "merged" else ""
            lines.append(f"| {label} | {case} | {r['load']:.1f} | {r['requests']} | {r['errors']} | {r['p50_s']:.2f} s | "
                         f"{r['p95_s']:.2f} s | {r['req_per_s']:.2f} | {r['tok_per_s']:.0f} | {r['rows_per_forward']:.1f} | "
                         f"{r['max_adapters_per_forward']} | {ratio} |")
    hot = sizes[0][2]
    lines += [
        "",
        "- **merged**: adapter a1 merged into the base, every request to that one model (no LoRA in the forward).",
        "- **mixed**: base + a1..a4 in turn; rows of different adapters share each forward (per-row adapters, "
        "no swapping, no merging).",
        "- **mixed8**: a1..a8 in turn (8 adapters loaded), so every forward carries 8 distinct adapters.",
        "- **single**: every request to a1, the only adapter loaded, unmerged (the fused single-adapter path).",
        f"- **hot**: as mixed, plus {hot.hot_cycles} cycles of load \"hot\" → 4 streamed requests to it (beyond the "
        f"{args.concurrency} in flight) → unload as soon as all 4 are running → they finish "
        f"({hot.hot_requests} extra requests, counted in the row); zero errors means neither the loads nor the "
        "unloads disturbed a request.",
        "- ÷ merged is the case's throughput relative to the merged model. Mixed rows run grouped "
        "(`lorakit.lora_rows`, module docstring): per adapted layer one gather, two batched matmuls over the adapters' "
        "rank pieces and one scatter, whatever the mix; what remains is mostly the low-rank FLOPs themselves "
        "(with rank padding) against the base's. The load is noisy here (other jobs share the cores): compare "
        "runs only within one table.", "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--sizes", default="1024x4", help="model sizes HIDDENxLAYERS, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="OMP threads per server (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of the cases (median reported)")
    parser.add_argument("--cases", default="merged,mixed,mixed8,single",
                        help="cases run alternately, merged first (hot runs once at the end)")
    parser.add_argument("--results", type=Path, help="markdown file whose '## Server' section to write")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    args.cases = ["merged"] + [c for c in args.cases.split(",") if c != "merged"]
    unknown = sorted(set(args.cases) - set(CASES) | ({"hot"} & set(args.cases)))
    if unknown:
        parser.error(f"--cases {unknown}: choose from {sorted(set(CASES) - {'hot'})}")
    command = "python bench/bench_serve.py " + shlex.join(sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    sizes = []
    for size in args.sizes.split(","):
        hidden, layers = (int(v) for v in size.lower().split("x"))
        print(f"-- hidden {hidden}, {layers} layers", flush=True)
        with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
            workdir = Path(tmp)
            world = build_world(workdir, hidden, layers)
            runs: dict[str, list[Result]] = {case: [] for case in args.cases}
            for _ in range(args.repeats):
                for case in args.cases:
                    runs[case].append(run_case(world, case, args, workdir))
            hot = run_case(world, "hot", args, workdir)
        rows = {**{case: median_row(r) for case, r in runs.items()}, "hot": hot.row()}
        sizes.append((f"h{hidden}×{layers}", rows, hot))
    section = markdown(sizes, args, command, load)
    print("\n" + section)
    if args.results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import upsert_section

        upsert_section(args.results, "## Server", section)
    if args.json:
        args.json.write_text(json.dumps([{"model": label, "rows": rows, "hot_cycles": hot.hot_cycles,
                                          "errors": hot.errors} for label, rows, hot in sizes], indent=2))
    failed = sum(r["errors"] for _, rows, _ in sizes for r in rows.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
