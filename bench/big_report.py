"""Markdown for bench_big.py: the issue's goals for big models, met or not, with the figures behind them."""

from __future__ import annotations

import math
import statistics

GiB = 2**30
STACK_NAMES = {"lorakit-qlora": "lorakit QLoRA (fp32 model, NF4 matmuls auto: bf16 here)",
               "lorakit-qlora-fp32": "lorakit QLoRA (NF4 matmuls fp32)", "lorakit-lora": "lorakit LoRA (fp32)",
               "peft-qlora": "PEFT + bnb QLoRA (fp32 compute)", "peft-qlora-bf16": "PEFT + bnb QLoRA (bf16 compute)"}


def nf4_bytes(n: int) -> int:
    """Packed codes + 8-bit scales + fp32 second-level scales + offset of one n-weight layer."""
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


def footprint(config: dict) -> tuple[int, int]:
    """(NF4 bytes, unquantized bytes) of the streamed Llama: bf16 embeddings and head, fp32 norms and rope."""
    d, f, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    nf4 = layers * sum(nf4_bytes(a * b) for a, b in shapes)
    head_dim = d // config["num_attention_heads"]
    other = 2 * vocab * d * 2 + (2 * layers + 1) * d * 4 + 2 * (head_dim // 2) * 4
    return nf4, other


def goal_peak(config: dict) -> float:
    nf4, other = footprint(config)
    return 1.2 * (nf4 + other) + 0.6 * GiB


def ok(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**not met**")


def rows(run: dict, **match) -> list[dict]:
    return [r for r in run["results"] if all(r.get(k) == v for k, v in match.items()) and "error" not in r]


def median_of(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def gib(x: float | None) -> str:
    return "failed" if x is None else f"{x / GiB:.2f} GiB"


def loads(rs: list[dict]) -> str:
    values = [x for r in rs for x in r.get("load_1min", [])]
    return f"{min(values):.1f}–{max(values):.1f}" if values else "?"


def load_table(run: dict) -> list[str]:
    config, out = run["config"], []
    nf4, other = footprint(config)
    goal = goal_peak(config)
    ours = rows(run, kind="load", stack="lorakit") or [r for r in rows(run, kind="step", stack="lorakit-qlora")
                                                       if r.get("load_peak_rss")]
    peak = max((r.get("peak_rss") if r["kind"] == "load" else r["load_peak_rss"]) for r in ours) if ours else None
    load_s = median_of([r["load_s"] for r in ours])
    out += ["| | peak RSS | goal | | load time | load avg |", "| --- | --- | --- | --- | --- | --- |"]
    out.append(f"| lorakit streamed (NF4 {nf4 / GiB:.2f} GiB + bf16/fp32 rest {other / GiB:.2f} GiB) | {gib(peak)} | "
               f"≤ 1.2 × {(nf4 + other) / GiB:.2f} + 0.6 = {goal / GiB:.2f} GiB | {ok(peak <= goal if peak else None)} | "
               f"{load_s:.0f} s | {loads(ours)} |" if load_s else "| lorakit streamed | failed | | | | |")
    theirs = rows(run, kind="load", stack="peft")
    if theirs:
        tpeak = max(r["peak_rss"] for r in theirs)
        out.append(f"| transformers + bnb `from_pretrained` (NF4, fp32 rest) | {gib(tpeak)} | lorakit ≤ 0.6 × this "
                   f"({peak / tpeak:.2f}×) | {ok(peak <= 0.6 * tpeak)} | {median_of([r['load_s'] for r in theirs]):.0f} s | "
                   f"{loads(theirs)} |")
    return out


def step_table(run: dict) -> list[str]:
    seqs = sorted({r["seq"] for r in rows(run, kind="step")})
    out = ["| stack | seq | step (median) | steps | × lorakit LoRA | PEFT+bnb ÷ this | fwd 1×64 no-grad | peak RSS | load avg |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for seq in seqs:
        med = {s: median_of([t for r in rows(run, kind="step", stack=s, seq=seq) for t in r["step_times"]])
               for s in STACK_NAMES}
        for stack, name in STACK_NAMES.items():
            rs = rows(run, kind="step", stack=stack, seq=seq)
            if not rs:
                continue
            step = med[stack]
            fwd = median_of([r["forward_s"] for r in rs if r.get("forward_s") is not None])
            vs_lora = f"{step / med['lorakit-lora']:.2f}" if med.get("lorakit-lora") else "–"
            vs_peft = f"{med['peft-qlora'] / step:.2f}" if med.get("peft-qlora") else "–"
            times = " / ".join(f"{t:.1f}" for r in rs for t in r["step_times"])
            out.append(f"| {name} | {seq} | {step:.2f} s | {times} | {vs_lora} | {vs_peft} | "
                       f"{'–' if fwd is None else f'{fwd:.2f} s'} | {gib(max(r['peak_rss'] for r in rs))} | {loads(rs)} |")
    return out


def step_goals(run: dict) -> list[str]:
    """The issue's batch-1 goals for lorakit QLoRA as `lorakit train` runs it, with the fp32-matmul variant and
    both PEFT + bnb compute dtypes beside it."""
    out = []
    for seq in sorted({r["seq"] for r in rows(run, kind="step")}):
        med = {s: median_of([t for r in rows(run, kind="step", stack=s, seq=seq) for t in r["step_times"]])
               for s in STACK_NAMES}
        q, q32, lora = med.get("lorakit-qlora"), med.get("lorakit-qlora-fp32"), med.get("lorakit-lora")
        if q and lora:
            out.append(f"- 1 × {seq}: QLoRA step ≤ 1.0 × fp32 LoRA step: {q / lora:.2f}× {ok(q <= lora)}"
                       + (f" (with fp32 NF4 matmuls: {q32 / lora:.2f}×)" if q32 else ""))
        for peft in ("peft-qlora", "peft-qlora-bf16"):
            if q and med.get(peft):
                out.append(f"- 1 × {seq}: ≥ 1.5 × {STACK_NAMES[peft]}'s speed: {med[peft] / q:.2f}× "
                           f"{ok(med[peft] / q >= 1.5)}")
    fwd = {s: median_of([r["forward_s"] for r in rows(run, kind="step", stack=s, seq=64) if r.get("forward_s")])
           for s in STACK_NAMES}
    if fwd.get("lorakit-qlora") and fwd.get("lorakit-lora"):
        ratio = fwd["lorakit-qlora"] / fwd["lorakit-lora"]
        out.append(f"- no-grad forward 1 × 64 ≤ 1.0 × fp32: {ratio:.2f}× {ok(ratio <= 1.0)}"
                   + (f" (with fp32 NF4 matmuls: {fwd['lorakit-qlora-fp32'] / fwd['lorakit-lora']:.2f}×)"
                      if fwd.get("lorakit-qlora-fp32") else ""))
    q64 = rows(run, kind="step", stack="lorakit-qlora", seq=64)
    ev = median_of([r["eval40_s"] for r in q64 if r.get("eval40_s")])
    step = median_of([t for r in q64 for t in r["step_times"]])
    if ev and step:
        out.append(f"- eval loss of 40 rows (32 tokens, batches of 16) ≤ 4 × one QLoRA training step at 1 × 64: "
                   f"{ev:.1f} s = {ev / step:.1f}× {ok(ev <= 4 * step)}")
    return out


def micro_table(run: dict) -> list[str]:
    rs = rows(run, kind="micro")
    if not rs:
        return []
    ms = rs[0]["micro_ms"]
    out = ["| rows | fp32 matmul fwd / bwd | NF4 whole-Ŵ fwd / bwd | NF4 tiled fwd / bwd |", "| --- | --- | --- | --- |"]
    for n in (1, 64):
        out.append(f"| {n} | {ms[f'{n} fp32 fwd']:.1f} / {ms[f'{n} fp32 bwd']:.1f} ms | {ms[f'{n} nf4 plain fwd']:.1f} / "
                   f"{ms[f'{n} nf4 plain bwd']:.1f} ms | {ms[f'{n} nf4 tiled fwd']:.1f} / {ms[f'{n} nf4 tiled bwd']:.1f} ms |")
    return out + [f"\n(medians of 10 calls each, alternating; load average {loads(rs)})"]


def merge_lines(run: dict) -> list[str]:
    rs, check = rows(run, kind="merge"), rows(run, kind="merge_check")
    if not rs:
        return []
    peak = max(r["peak_rss"] for r in rs)
    out = [f"- shard-streamed merge (r=16 adapter on every linear layer, bf16 base): peak {gib(peak)}, "
           f"{median_of([r['merge_s'] for r in rs]):.0f} s (load avg {loads(rs)}); peak ≤ 1.5 GiB {ok(peak <= 1.5 * GiB)}"]
    if check:
        c = check[0]
        verdict = "yes, bit for bit" if c["logits_equal"] else "no (max |Δ| {:.3g})".format(c["max_abs_diff"])
        out.append(f"- its output loads in transformers with logits equal to the in-memory merge: {verdict} "
                   f"{ok(c['logits_equal'])}")
    return out


def eight_b_lines(run: dict) -> list[str]:
    rs = rows(run, kind="step", stack="lorakit-qlora")
    errors = [r for r in run["results"] if "error" in r]
    if not rs:
        why = run.get("note") or (errors[0]["error"][-300:] if errors else "no result")
        return [f"- 8B QLoRA steps at 1 × 256 with checkpointing: not completed ({why})"]
    r = rs[0]
    return [f"- {len(r['step_times'])} timed step(s) after 1 warmup at 1 × 256, checkpointing on: "
            f"{' / '.join(f'{t:.0f}' for t in r['step_times'])} s per step, training peak RSS {gib(r['peak_rss'])} "
            f"(fits 24 GiB: {ok(r['peak_rss'] < 24 * GiB)}), loss {r['loss']:.3f}"]


def render(title: str, runs: list[dict], notes: str = "") -> str:
    lines = [title, ""]
    for run in runs:
        config = run["config"]
        params = footprint(config)
        lines += [f"### {run['model']}: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, GQA "
                  f"{config['num_attention_heads']}/{config['num_key_value_heads']}, intermediate "
                  f"{config['intermediate_size']}, vocab {config['vocab_size']} (bf16 safetensors, sharded)", "",
                  f"`{run['command']}` — {run['machine']}; started {run['started']}, {run['wall_s'] / 60:.0f} min. "
                  f"NF4 footprint {params[0] / GiB:.2f} GiB, unquantized {params[1] / GiB:.2f} GiB.", ""]
        lines += ["**Load (peak RSS = VmHWM of a fresh process, imports included)**", ""] + load_table(run) + [""]
        if run["model"] == "8b":
            lines += eight_b_lines(run) + [""]
            continue
        lines += ["**Batch-1 training steps (LoRA r=16 on all linear layers, AdamW, gradient checkpointing)**", ""]
        if rows(run, kind="step"):
            lines += step_table(run) + [""] + step_goals(run) + [""]
        else:
            lines += ["Not measured: " + run.get("note", "no step results") + "", ""]
        lines += ["**One 2048 → 5632 layer (the NF4 matmul paths, fp32)**", ""] + micro_table(run) + [""]
        lines += ["**Merge**", ""] + merge_lines(run) + [""]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"
