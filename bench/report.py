"""Markdown for bench_train.py: tables per run, ratios per repetition, and the issue's goals checked."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

GiB = 2**30
NAMES = {"lorakit": "lorakit", "peft": "PEFT", "torch": "torch"}
REFERENCE = {"lora": "PEFT", "qlora": "PEFT + bnb", "full": "transformers"}


def rows(run: dict, **match) -> list[dict]:
    """Results matching every key (missing keys never match), ordered by repetition; errors dropped."""
    out = [r for r in run["results"] if all(r.get(k) == v for k, v in match.items()) and "error" not in r]
    return sorted(out, key=lambda r: r["repeat"])


def per_rep(run: dict, key: str, **match) -> list[float]:
    return [r[key] for r in rows(run, **match) if r.get(key) is not None]


def ratios(run: dict, key: str, a: dict, b: dict) -> list[float]:
    """a[key] / b[key] within each repetition (the two ran back to back)."""
    by_rep = {r["repeat"]: r[key] for r in rows(run, **b) if r.get(key)}
    return [r[key] / by_rep[r["repeat"]] for r in rows(run, **a) if r.get(key) and r["repeat"] in by_rep]


def fmt(values: list[float], spec: str = ".0f", unit: str = "") -> str:
    return " / ".join(f"{v:{spec}}{unit}" for v in values) if values else "failed"


def span(values: list[float], spec: str = ".2f") -> str:
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return f"{lo:{spec}}×" if f"{lo:{spec}}" == f"{hi:{spec}}" else f"{lo:{spec}}–{hi:{spec}}×"


def ceilings(run: dict) -> dict[int, float]:
    return {r["repeat"]: r["flops"] for r in rows(run, kind="ceiling")}


def header(run: dict, index: int) -> list[str]:
    loads = [x for r in run["results"] for x in r.get("load_1min", [])]
    ceil = ceilings(run)
    return [
        f"### Run {index}: {run['started']}, {run['wall_s'] / 60:.1f} min", "",
        f"Command: `{run['command']}`", "",
        f"Machine: {run['machine']}. 1-minute load average during the run: {min(loads):.2f}–{max(loads):.2f}. "
        f"fp32 matmul ceiling (best torch.mm rate on the training's shapes, per repetition): "
        f"{fmt([ceil[k] / 1e9 for k in sorted(ceil)], '.1f')} GFLOP/s.", "",
    ]


def train_table(run: dict, flops_fn: Callable) -> list[str]:
    a, m, ceil = run["args"], run["config"], ceilings(run)
    lines = ["| config | stack | tokens/s | ÷ reference | GFLOP/s (% of ceiling) | peak RSS training | ÷ reference "
             "| peak RSS incl. loading | GC cost ÷ forward |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in a["configs"].split(","):
        method, _, gc = entry.partition("+")
        flops = flops_fn(m, a["seq"], method, gc == "gc", 16)
        for stack in ("lorakit", "peft"):
            sel = dict(kind="train", method=method, gc=gc == "gc", stack=stack)
            ref = dict(sel, stack="peft")
            tps = per_rep(run, "tokens_per_s", **sel)
            util = [r["tokens_per_s"] * flops / ceil[r["repeat"]] for r in rows(run, **sel)]
            gflops = [t * flops / 1e9 for t in tps]
            name = NAMES[stack] if stack == "lorakit" else REFERENCE[method]
            lines.append(
                f"| {entry} | {name} | {fmt(tps)} | {span(ratios(run, 'tokens_per_s', sel, ref)) if stack == 'lorakit' else ''} "
                f"| {fmt(gflops, '.0f')} ({fmt([100 * u for u in util], '.0f', '%')}) "
                f"| {fmt([x / GiB for x in per_rep(run, 'peak_rss', **sel)], '.2f')} GiB "
                f"| {span(ratios(run, 'peak_rss', sel, ref)) if stack == 'lorakit' else ''} "
                f"| {fmt([x / GiB for x in per_rep(run, 'load_peak_rss', **sel)], '.2f')} GiB | {gc_cost(run, sel)} |")
    return lines + [""]


def gc_cost(run: dict, sel: dict) -> str:
    """(step with GC − step without) ÷ forward time without GC, per repetition."""
    if not sel["gc"]:
        return ""
    plain = {r["repeat"]: r for r in rows(run, **dict(sel, gc=False))}
    costs = [(r["step_s"] - plain[r["repeat"]]["step_s"]) / plain[r["repeat"]]["forward_s"]
             for r in rows(run, **sel) if r["repeat"] in plain]
    return fmt(costs, ".2f", "×")


def generate_table(run: dict) -> list[str]:
    if not rows(run, kind="generate"):
        return []
    a = run["args"]
    lines = [f"Generation, greedy, {a['gen_batch']} rows × {a['prompt']} prompt tokens → {a['new_tokens']} new tokens "
             "(lorakit: `lorakit.generate.decode`; PEFT: `model.generate`); B factors random, so the adapter is live:", "",
             "| stack | unmerged tokens/s | merged tokens/s | merged ÷ unmerged |", "| --- | --- | --- | --- |"]
    for stack in ("lorakit", "peft"):
        un = dict(kind="generate", stack=stack, merged=False)
        lines.append(f"| {NAMES[stack]} | {fmt(per_rep(run, 'tokens_per_s', **un), '.1f')} "
                     f"| {fmt(per_rep(run, 'tokens_per_s', **dict(un, merged=True)), '.1f')} "
                     f"| {span(ratios(run, 'tokens_per_s', dict(un, merged=True), un))} |")
    return lines + [""]


def quantize_table(run: dict) -> list[str]:
    if not rows(run, kind="quantize"):
        return []
    lines = ["Whole-model NF4 quantization (blocksize 64, double quant, every linear layer but the head):", "",
             "| stack | kernel over all weights | ÷ bitsandbytes | fp32 checkpoint → 4-bit model in memory |",
             "| --- | --- | --- | --- |"]
    for stack, name in (("lorakit", "lorakit `quantize_nf4` / `load_model`+`quantize_model`"),
                        ("peft", "bitsandbytes `quantize_4bit` / `from_pretrained(BitsAndBytesConfig)`")):
        sel = dict(kind="quantize", stack=stack)
        ratio = span(ratios(run, "kernel_s", sel, dict(sel, stack="peft"))) if stack == "lorakit" else ""
        lines.append(f"| {name} | {fmt(per_rep(run, 'kernel_s', **sel), '.2f', ' s')} | {ratio} "
                     f"| {fmt(per_rep(run, 'end_to_end_s', **sel), '.2f', ' s')} |")
    return lines + [""]


def goals(runs: list[dict], flops_fn: Callable) -> list[str]:
    """The issue's goals, each a ratio measured side by side, for every run."""
    def lk(method, gc=False, stack="lorakit"):
        return dict(kind="train", stack=stack, method=method, gc=gc)

    def util(run):
        ceil, flops = ceilings(run), flops_fn(run["config"], run["args"]["seq"], "lora", False, 16)
        return [r["tokens_per_s"] * flops / ceil[r["repeat"]] for r in rows(run, **lk("lora"))]

    def gc_costs(run):
        return [float(x.rstrip("×")) for x in gc_cost(run, lk("lora", True)).split(" / ") if x and x != "failed"]

    tps, rss = "tokens_per_s", "peak_rss"
    checks = [
        ("QLoRA tokens/s ÷ lorakit LoRA tokens/s", ">= 0.9", lambda r: ratios(r, tps, lk("qlora"), lk("lora")), 0.9, True),
        ("same, both with GC", ">= 0.9", lambda r: ratios(r, tps, lk("qlora", True), lk("lora", True)), 0.9, True),
        ("QLoRA tokens/s ÷ PEFT + bnb QLoRA", ">= 4",
         lambda r: ratios(r, tps, lk("qlora"), lk("qlora", stack="peft")), 4, True),
        ("QLoRA peak RSS ÷ PEFT + bnb QLoRA peak", "<= 1",
         lambda r: ratios(r, rss, lk("qlora"), lk("qlora", stack="peft")), 1, False),
        ("QLoRA peak RSS ÷ lorakit fp32 LoRA peak", "<= 0.5", lambda r: ratios(r, rss, lk("qlora"), lk("lora")), 0.5, False),
        ("QLoRA peak RSS ÷ PEFT fp32 LoRA peak", "<= 0.5",
         lambda r: ratios(r, rss, lk("qlora"), lk("lora", stack="peft")), 0.5, False),
        ("QLoRA + GC (lorakit's default) peak ÷ lorakit fp32 LoRA peak", "<= 0.5",
         lambda r: ratios(r, rss, lk("qlora", True), lk("lora")), 0.5, False),
        ("LoRA tokens/s ÷ PEFT LoRA", ">= 1.1", lambda r: ratios(r, tps, lk("lora"), lk("lora", stack="peft")), 1.1, True),
        ("LoRA share of the fp32 matmul ceiling", ">= 0.9", util, 0.9, True),
        ("LoRA with GC: extra step time ÷ one forward", "<= 1", gc_costs, 1, False),
    ]
    lines = ["| goal | target | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | met |",
             "| --- | --- | " + " | ".join("---" for _ in runs) + " | --- |"]
    for name, target, fn, bound, higher in checks:
        values = [fn(run) for run in runs]
        flat = [v for vs in values for v in vs]
        met = flat and all((v >= bound) if higher else (v <= bound) for v in flat)
        lines.append(f"| {name} | {target} | " + " | ".join(span(v) for v in values)
                     + f" | {'yes' if met else 'no' if flat else 'n/a'} |")
    return lines + ["", "Each cell: the range over repetitions (lorakit and the reference ran back to back in each)."]


def profile_table(profile: dict) -> list[str]:
    """One profiled step per case (bench/profile_train.py): share of self CPU time by kind of op."""
    cats = ["matmul", "attention", "loss", "NF4 dequantize", "other"]
    lines = [f"### Where a step's time goes ({profile['model']} model, torch.profiler, one step after a warm-up)", "",
             f"Command: `{profile['command']}`", "",
             "| stack | method | step CPU time | " + " | ".join(cats) + " | matmul GFLOP/s |",
             "| --- | --- | --- | " + " | ".join("---" for _ in cats) + " | --- |"]
    for c in profile["cases"]:
        t = c["times"]
        shares = " | ".join(f"{100 * t.get(k, 0.0) / c['total_s']:.1f}%" for k in cats)
        name = NAMES[c["stack"]] if c["stack"] == "lorakit" else REFERENCE[c["method"]]
        lines.append(f"| {name} | {c['method']} | {c['total_s']:.2f} s | {shares} | {c['matmul_gflops']:.0f} |")
    return lines + [""]


def render(runs: list[dict], flops_fn: Callable, profile: dict | None = None, notes: str = "") -> str:
    first = runs[0]
    m, a = first["config"], first["args"]
    lines = [
        "## Training throughput and memory (CPU)", "",
        f"Model: random-init Llama, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, intermediate "
        f"{m['intermediate_size']}, vocab {m['vocab_size']}, untied head; micro-batch {a['batch']} × {a['seq']} tokens, "
        f"LoRA r=16, alpha 32, dropout 0, all linear layers but the head; AdamW lr 1e-4, clip 1.0; fp32. Every figure "
        f"is from a fresh process; `a / b` lists repetitions; ratios are lorakit ÷ reference within a repetition. "
        f"Peak RSS training: the high-water mark reset after loading (/proc/self/clear_refs), so it covers the "
        f"optimizer steps; incl. loading: `ru_maxrss` of the whole process.", "",
        "### Goals", "",
        *goals(runs, flops_fn), "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    if profile:
        lines += profile_table(profile)
    for i, run in enumerate(runs, 1):
        lines += header(run, i) + train_table(run, flops_fn) + generate_table(run) + quantize_table(run)
    return "\n".join(lines).rstrip() + "\n"


def upsert_section(path: Path, title: str, section: str) -> None:
    """Replace the `title` section of `path` (up to the next "## " heading), or append it; others are kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "\n".join(lines[end:])
    path.write_text("\n".join(lines[:start]) + ("\n" if start else "") + section + ("\n" + rest + "\n" if rest else ""))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
