"""LoRA vs DoRA vs PiSSA vs QLoRA vs QLoRA+LoftQ on the built-in demo task: same steps, lr and data.

Each run is the quickstart's training (lorakit.demo.demo_run_config: r=16 on all linear layers, 150 steps,
lr 3e-3, packed rows of 256 tokens) with only the method changed, in a fresh process (its peak RSS is the
run's own), then the demo's eval at the end (greedy answers to the eval prompts: exact match, and the
eval loss). Two seeds each (train.seed: adapter init, dropout, data order).

    python bench/bench_methods.py --seeds 0 1 --json /tmp/methods.json --results bench/RESULTS.md
    python bench/bench_methods.py --render /tmp/methods.json --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

METHODS: dict[str, dict] = {
    "LoRA": {"method": "lora"},
    "DoRA": {"method": "lora", "use_dora": True},
    "PiSSA": {"method": "lora", "init": "pissa"},
    "QLoRA": {"method": "qlora"},
    "QLoRA+LoftQ": {"method": "qlora", "init": "loftq"},
}
SECTION = "## Adapter methods on the demo task"


def worker(name: str, seed: int, out: Path) -> dict:
    """One training run + eval at the end, in this process; returns its row."""
    from lorakit.config import EvalConfig
    from lorakit.demo import demo_run_config, resolve_demo
    from lorakit.train import train_lora

    spec = METHODS[name]
    config = demo_run_config(out)
    config.method = spec["method"]
    config.lora.use_dora = spec.get("use_dora", False)
    config.lora.init = spec.get("init", "kaiming")
    config.train.seed = seed
    config.eval = EvalConfig(at_end=True)
    resolve_demo(config)
    result = train_lora(config, progress=False, memory_check=False)
    s = result.summary
    tuned = s.get("eval", {}).get("tuned", {})
    return {"method": name, "seed": seed, "eval_loss": s["final_eval_loss"], "exact_match": tuned.get("exact_match"),
            "accuracy": tuned.get("accuracy"), "step_s": s["wall_time_s"] / max(1, s["steps"]), "steps": s["steps"],
            "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """VmHWM of this process (ru_maxrss may report a parent's peak after fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(seeds: list[int], methods: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        for name in methods:
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run([sys.executable, __file__, "--worker", name, str(seed), tmp], capture_output=True,
                                     text=True, env=os.environ.copy())
                if out.returncode:
                    raise RuntimeError(f"{name} seed {seed} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [SECTION, "", f"Command: `python bench/bench_methods.py --seeds {' '.join(sorted({str(r['seed']) for r in rows}))}`", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, fp32, load average "
             f"when rendered {', '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs share the cores: compare step "
             "times within this table only). The quickstart's run (demo base, r=16 alpha 32 on all linear layers, "
             "dropout 0, 150 steps, lr 3e-3 cosine, micro-batch 8 packed rows of 256 tokens) with only the method changed; "
             "eval at the end on the demo task's eval split (greedy, 24 new tokens). Mean ± half the range over the seeds.",
             "", "| method | eval loss | exact match | label accuracy | step time | peak RSS |", "|---|---|---|---|---|---|"]
    for name in METHODS:
        group = [r for r in rows if r["method"] == name]
        if not group:
            continue

        def cell(key: str, fmt: str, group=group) -> str:
            values = [r[key] for r in group if r[key] is not None]
            if not values:
                return "–"
            spread = (max(values) - min(values)) / 2
            return f"{format(statistics.mean(values), fmt)} ± {format(spread, fmt)}"

        lines.append(f"| {name} | {cell('eval_loss', '.3f')} | {cell('exact_match', '.2f')} | {cell('accuracy', '.2f')} | "
                     f"{cell('step_s', '.3f')} s | {cell('peak_rss_mib', '.0f')} MiB |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.is_file() else ""
    if SECTION in old:
        head, _, rest = old.partition(SECTION)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        old = head.rstrip("\n") + "\n\n" + text + tail
    else:
        old = old.rstrip("\n") + "\n\n" + text
    path.write_text(old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "SEED", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--json", type=Path, help="write the raw rows here")
    p.add_argument("--render", type=Path, help="render this JSON instead of measuring")
    p.add_argument("--results", type=Path, help=f"markdown file whose '{SECTION}' section to write")
    args = p.parse_args()
    if args.worker:
        name, seed, out = args.worker
        print(json.dumps(worker(name, int(seed), Path(out))))
        return
    rows = json.loads(args.render.read_text()) if args.render else run(args.seeds, args.methods)
    if args.json and not args.render:
        args.json.write_text(json.dumps(rows, indent=2))
    text = markdown(rows)
    print(text)
    if args.results:
        write_section(args.results, text)


if __name__ == "__main__":
    main()
