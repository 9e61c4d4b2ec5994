"""Markdown for bench_train.py: per-run tables, the issue's goals checked, and the profile.

The headline figure of each (stack, config) is robust to a noisy machine rather than flattering:
step time is the median of every timed step over all repetitions (steps of one configuration vary by up
to 40% here, from clock boost and neighbours), other times the median over repetitions, peak RSS the
highest seen (a peak is a worst case), the matmul ceiling the highest rate measured. Ratios are between
those figures; the per-repetition values are listed beside them so that the noise stays visible.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

GiB = 2**30
REFERENCE = {"lora": "PEFT", "qlora": "PEFT + bnb", "full": "transformers"}


def rows(run: dict, **match) -> list[dict]:
    """Results matching every key (missing keys never match), ordered by repetition; errors dropped."""
    out = [r for r in run["results"] if all(r.get(k) == v for k, v in match.items()) and "error" not in r]
    return sorted(out, key=lambda r: r["repeat"])


def tokens(run: dict) -> int:
    return run["args"]["batch"] * run["args"]["seq"]


def headline(run: dict, key: str, **match) -> float | None:
    """The figure reported for `key` over repetitions (see the module docstring)."""
    rs = rows(run, **match)
    if not rs:
        return None
    if key in ("tokens_per_s", "step_s"):
        step = statistics.median(t for r in rs for t in r["step_times"])
        return tokens(run) / step if key == "tokens_per_s" else step
    values = [r[key] for r in rs if r.get(key) is not None]
    if not values:
        return None
    return max(values) if key in ("flops", "peak_rss", "load_peak_rss") else statistics.median(values)


def ratio(run: dict, key: str, a: dict, b: dict) -> float | None:
    x, y = headline(run, key, **a), headline(run, key, **b)
    return x / y if x is not None and y else None


def fmt(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "failed" if value is None else f"{value:{spec}}{unit}"


def listing(run: dict, key: str, spec: str = ".0f", scale: float = 1.0, **match) -> str:
    values = [r[key] / scale for r in rows(run, **match) if r.get(key) is not None]
    return " / ".join(f"{v:{spec}}" for v in values) if values else "failed"


def header(run: dict, index: int) -> list[str]:
    loads = [x for r in run["results"] for x in r.get("load_1min", [])]
    ceil = [r["flops"] / 1e9 for r in rows(run, kind="ceiling")]
    return [
        f"### Run {index}: {run['started']}, {run['wall_s'] / 60:.1f} min", "",
        f"Command: `{run['command']}`", "",
        f"Machine: {run['machine']}. 1-minute load average during the run (sampled at every measurement's start and "
        f"end): {min(loads):.2f}–{max(loads):.2f}. fp32 matmul ceiling, fastest torch.mm rate on the training's shapes, "
        f"per repetition: {' / '.join(f'{c:.1f}' for c in ceil)} GFLOP/s.", "",
    ]


def gc_cost(run: dict, stack: str, method: str) -> float | None:
    """(median step with GC − median step without) ÷ median forward time without GC."""
    sel = dict(kind="train", stack=stack, method=method)
    on, off, fwd = headline(run, "step_s", **sel, gc=True), headline(run, "step_s", **sel, gc=False), headline(
        run, "forward_s", **sel, gc=False)
    return (on - off) / fwd if on and off and fwd else None


def train_table(run: dict, flops_fn: Callable) -> list[str]:
    a, m = run["args"], run["config"]
    ceiling = headline(run, "flops", kind="ceiling")
    lines = ["| config | stack | tokens/s, median step (per rep.) | ÷ reference | GFLOP/s, % of ceiling "
             "| peak RSS training, highest (per rep.) | ÷ reference | peak RSS whole process | forward s | GC: extra ÷ forward |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in a["configs"].split(","):
        method, _, gc = entry.partition("+")
        flops = flops_fn(m, a["seq"], method, gc == "gc", 16)
        for stack in ("lorakit", "peft"):
            sel = dict(kind="train", method=method, gc=gc == "gc", stack=stack)
            ref = dict(sel, stack="peft")
            tps = headline(run, "tokens_per_s", **sel)
            gflops = None if tps is None else tps * flops / 1e9
            is_lk = stack == "lorakit"
            lines.append(
                f"| {entry} | {'lorakit' if is_lk else REFERENCE[method]} "
                f"| {fmt(tps)} ({listing(run, 'tokens_per_s', **sel)}) "
                f"| {fmt(ratio(run, 'tokens_per_s', sel, ref), '.2f', '×') if is_lk else ''} "
                f"| {fmt(gflops)}, {fmt(None if gflops is None else 100e9 * gflops / ceiling, '.0f', '%')} "
                f"| {fmt(headline(run, 'peak_rss', **sel) and headline(run, 'peak_rss', **sel) / GiB, '.2f')} GiB "
                f"({listing(run, 'peak_rss', '.2f', GiB, **sel)}) "
                f"| {fmt(ratio(run, 'peak_rss', sel, ref), '.2f', '×') if is_lk else ''} "
                f"| {whole_process_peak(run, **sel)} GiB | {'' if gc else fmt(headline(run, 'forward_s', **sel), '.2f')} "
                f"| {fmt(gc_cost(run, stack, method), '.2f', '×') if gc else ''} |")
    return lines + [""]


def whole_process_peak(run: dict, **match) -> str:
    """max(peak while loading, peak while training) per repetition: the process's ru_maxrss."""
    peaks = [max(r["load_peak_rss"], r["peak_rss"] or 0) / GiB for r in rows(run, **match)]
    return " / ".join(f"{p:.2f}" for p in peaks) if peaks else "failed"


def generate_table(run: dict) -> list[str]:
    if not rows(run, kind="generate"):
        return []
    a = run["args"]
    lines = [f"Generation, greedy, {a['gen_batch']} rows × {a['prompt']} prompt tokens → {a['new_tokens']} new tokens "
             "(lorakit: `lorakit.generate.decode`; PEFT: `model.generate`); B factors random, so the adapter is live. "
             "Tokens/s, median (per repetition):", "",
             "| stack | unmerged | merged | merged ÷ unmerged |", "| --- | --- | --- | --- |"]
    for stack in ("lorakit", "peft"):
        sel = dict(kind="generate", stack=stack)
        un, mg = _median(run, "unmerged_tokens_per_s", **sel), _median(run, "merged_tokens_per_s", **sel)
        cells = [f"{fmt(v, '.1f')} ({listing(run, k, '.1f', **sel)})"
                 for v, k in ((un, "unmerged_tokens_per_s"), (mg, "merged_tokens_per_s"))]
        lines.append(f"| {'lorakit' if stack == 'lorakit' else 'PEFT'} | {cells[0]} | {cells[1]} "
                     f"| {fmt(mg / un if mg and un else None, '.2f', '×')} |")
    return lines + [""]


def _median(run: dict, key: str, **match) -> float | None:
    values = [r[key] for r in rows(run, **match) if r.get(key)]
    return statistics.median(values) if values else None


def quantize_table(run: dict) -> list[str]:
    if not rows(run, kind="quantize"):
        return []
    lines = ["Whole-model NF4 quantization (blocksize 64, double quant, every linear layer but the head), median "
             "(per repetition):", "",
             "| stack | kernel over all weights | ÷ bitsandbytes | fp32 checkpoint → 4-bit model in memory |",
             "| --- | --- | --- | --- |"]
    for stack, name in (("lorakit", "lorakit `quantize_nf4` / `load_model` + `quantize_model`"),
                        ("peft", "bitsandbytes `quantize_4bit` / `from_pretrained(BitsAndBytesConfig)`")):
        sel = dict(kind="quantize", stack=stack)
        r = ratio(run, "kernel_s", sel, dict(sel, stack="peft")) if stack == "lorakit" else None
        lines.append(f"| {name} | {fmt(headline(run, 'kernel_s', **sel), '.2f', ' s')} ({listing(run, 'kernel_s', '.2f', **sel)}) "
                     f"| {fmt(r, '.2f', '×') if stack == 'lorakit' else ''} "
                     f"| {fmt(headline(run, 'end_to_end_s', **sel), '.2f', ' s')} ({listing(run, 'end_to_end_s', '.2f', **sel)}) |")
    return lines + [""]


def goals(runs: list[dict], flops_fn: Callable) -> list[str]:
    """The issue's goals, each a ratio of side-by-side headline figures, for every run."""
    def lk(method, gc=False, stack="lorakit"):
        return dict(kind="train", stack=stack, method=method, gc=gc)

    def util(run):
        tps, ceiling = headline(run, "tokens_per_s", **lk("lora")), headline(run, "flops", kind="ceiling")
        return tps * flops_fn(run["config"], run["args"]["seq"], "lora", False, 16) / ceiling if tps and ceiling else None

    tps, rss = "tokens_per_s", "peak_rss"
    checks = [
        ("QLoRA tokens/s ÷ lorakit LoRA tokens/s", ">= 0.9", lambda r: ratio(r, tps, lk("qlora"), lk("lora")), 0.9, True),
        ("same, both with GC", ">= 0.9", lambda r: ratio(r, tps, lk("qlora", True), lk("lora", True)), 0.9, True),
        ("QLoRA tokens/s ÷ PEFT + bnb QLoRA", ">= 4", lambda r: ratio(r, tps, lk("qlora"), lk("qlora", stack="peft")), 4, True),
        ("QLoRA peak RSS ÷ PEFT + bnb QLoRA peak", "<= 1",
         lambda r: ratio(r, rss, lk("qlora"), lk("qlora", stack="peft")), 1, False),
        ("QLoRA peak RSS ÷ lorakit fp32 LoRA peak", "<= 0.5", lambda r: ratio(r, rss, lk("qlora"), lk("lora")), 0.5, False),
        ("QLoRA peak RSS ÷ PEFT fp32 LoRA peak", "<= 0.5",
         lambda r: ratio(r, rss, lk("qlora"), lk("lora", stack="peft")), 0.5, False),
        ("QLoRA + GC (lorakit's default) peak RSS ÷ lorakit fp32 LoRA peak", "<= 0.5",
         lambda r: ratio(r, rss, lk("qlora", True), lk("lora")), 0.5, False),
        ("LoRA tokens/s ÷ PEFT LoRA", ">= 1.1", lambda r: ratio(r, tps, lk("lora"), lk("lora", stack="peft")), 1.1, True),
        ("LoRA share of the fp32 matmul ceiling", ">= 0.9", util, 0.9, True),
        ("LoRA with GC: extra step time ÷ one forward", "<= 1", lambda r: gc_cost(r, "lorakit", "lora"), 1, False),
    ]
    lines = ["| goal | target | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | met |",
             "| --- | --- | " + " | ".join("---" for _ in runs) + " | --- |"]
    for name, target, fn, bound, higher in checks:
        values = [fn(run) for run in runs]
        known = [v for v in values if v is not None]
        met = bool(known) and all((v >= bound) if higher else (v <= bound) for v in known)
        cells = " | ".join(fmt(v, ".2f") for v in values)
        lines.append(f"| {name} | {target} | {cells} | {'yes' if met else 'no' if known else 'n/a'} |")
    return lines + [""]


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
        name = "lorakit" if c["stack"] == "lorakit" else REFERENCE[c["method"]]
        lines.append(f"| {name} | {c['method']} | {c['total_s']:.2f} s | {shares} | {c['matmul_gflops']:.0f} |")
    return lines + [""]


def render(title: str, runs: list[dict], flops_fn: Callable, profile: dict | None = None, notes: str = "") -> str:
    m, a = runs[0]["config"], runs[0]["args"]
    if len({run["model"] for run in runs}) > 1:
        raise SystemExit("--render: every JSON must come from the same --model (one section per model)")
    lines = [
        title, "",
        f"Model: random-init Llama, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, intermediate "
        f"{m['intermediate_size']}, vocab {m['vocab_size']}, untied head; micro-batch {a['batch']} × {a['seq']} tokens, "
        "LoRA r=16, alpha 32, dropout 0, every linear layer but the head; AdamW lr 1e-4, clip 1.0; fp32. Every "
        "figure comes from a fresh process; lorakit and the reference alternate back to back in each repetition. "
        "Headline figures are medians (peak RSS: the highest), see bench/report.py. Peak RSS training: `ru_maxrss` "
        "after the high-water mark was reset once the model was loaded (/proc/self/clear_refs), so it covers the "
        "optimizer steps; whole process: loading included. FLOPs per token: bench/bench_train.py's docstring.", "",
        "### Goals", "",
        *goals(runs, flops_fn),
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
