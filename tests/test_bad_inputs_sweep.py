"""Issue 19's sweep: bad inputs through the real CLI (`python -m lorakit ...` in subprocesses).

Every case must exit 2 (130 for Ctrl-C) with its message on stderr, no Python traceback, and leave every
file that was there before with the same bytes. Each case gets its own copy of a finished run, so the
cases run two at a time (a thread pool of 2: the subprocesses are the work).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny_base, write_text_data
from lorakit.train import train_lora

SRC = Path(__file__).resolve().parents[1] / "src"
LOCK = ".lorakit.lock"


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.name == LOCK:
            continue
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)  # never follow: one case links to /dev/full
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_config(path: Path, base: Path, train_file: Path, out: Path, **sections) -> Path:
    config = {
        "base_model": str(base), "output_dir": str(out),
        "data": {"train": str(train_file), "max_seq_len": 32, "packing": False, "dedup": False, "eval_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "save_every": 1, "eval_every": 2, "micro_batch_size": 4, "grad_accum": 1,
                  "log_every": 1, "gradient_checkpointing": False},
        "eval": {"at_end": False},
    }
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path, Path], list[str]]  # (case dir, base, data) -> lorakit arguments
    expect: str  # a piece of the message
    status: int = 2
    interrupt: bool = False  # send SIGINT once training is under way


def run_config(d: Path, base: Path, train_file: Path, **sections) -> str:
    return str(write_config(d / "run.yaml", base, train_file, d / "run", **sections))


def fresh_config(d: Path, base: Path, train_file: Path, **sections) -> str:
    return str(write_config(d / "fresh.yaml", base, train_file, d / "fresh", **sections))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _adapter_config(d: Path, text: str | None) -> Path:
    adapter = d / "run" / "adapter"
    if text is None:
        (adapter / "adapter_config.json").unlink()
    else:
        _write(adapter / "adapter_config.json", text)
    return adapter


def _adapter_rank(d: Path, r: int) -> Path:
    path = d / "run" / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": r}))
    return path.parent


def _metrics_to_dev_full(d: Path, base: Path, data: Path) -> list[str]:
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full here")
    (d / "full").mkdir()
    os.symlink("/dev/full", d / "full" / "metrics.jsonl")  # every write to it: ENOSPC
    return ["train", str(write_config(d / "full.yaml", base, data, d / "full")), "--resume", "--quiet"]


def _no_config_json(d: Path, base: Path, data: Path) -> list[str]:
    model = d / "model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, model / name)
    return ["train", str(write_config(d / "c.yaml", model, data, d / "fresh")), "--quiet", "--no-memory-check"]


def gen(*args: str) -> Callable[[Path, Path, Path], list[str]]:
    return lambda d, b, t: ["generate", "--base", str(b), *args]


CASES = [
    # config files and overrides
    Case("empty yaml", lambda d, b, t: ["train", str(_write(d / "e.yaml", "# todo\n"))], "is empty"),
    Case("yaml list", lambda d, b, t: ["train", str(_write(d / "l.yaml", "- a\n- b\n"))], "must be a mapping"),
    Case("yaml syntax", lambda d, b, t: ["train", str(_write(d / "s.yaml", "lora: {r: 8\n"))], "not valid YAML"),
    Case("missing config", lambda d, b, t: ["train", str(d / "nope.yaml")], "does not exist"),
    Case("--set not yaml", lambda d, b, t: ["train", "--set", "lora.target_modules=[q_proj"],
         "--set lora.target_modules=[q_proj: the value is not valid YAML"),
    Case("--set without =", lambda d, b, t: ["train", "--set", "lora.r"], "must look like key.sub=value"),
    Case("bool maybe", lambda d, b, t: ["train", "--set", "data.packing=maybe"], "data.packing must be true or false"),
    Case("quoted bool", lambda d, b, t: ["train", fresh_config(d, b, t, data={"packing": "false"})],
         "without quotes"),
    Case("float rank", lambda d, b, t: ["train", "--set", "lora.r=1.5"], "lora.r must be an integer, got 1.5"),
    Case("unknown key", lambda d, b, t: ["train", "--set", "lora.alpah=16"], "did you mean lora.alpha?"),
    Case("resume and overwrite", lambda d, b, t: ["train", run_config(d, b, t), "--resume", "--overwrite"],
         "not allowed with"),
    # a previous run in output_dir
    Case("train over a run", lambda d, b, t: ["train", run_config(d, b, t), "--quiet"], "already holds a run"),
    Case("overwrite, typo base", lambda d, b, t: ["train", run_config(d, b, t, base_model=str(d / "typo")),
                                                  "--overwrite", "--quiet"], "could not"),
    Case("overwrite, missing data", lambda d, b, t: ["train", run_config(d, b, t), "--overwrite", "--quiet",
                                                     "--set", f"data.train={d / 'nope.jsonl'}"], "nope.jsonl"),
    Case("overwrite, no target", lambda d, b, t: ["train", run_config(d, b, t), "--overwrite", "--quiet",
                                                  "--set", "lora.target_modules=[qproj]"], "matched no module"),
    Case("resume, lora.r", lambda d, b, t: ["train", run_config(d, b, t), "--resume", "--set", "lora.r=8"],
         "lora.r: 4 in the checkpoint, 8 now"),
    Case("resume, lr", lambda d, b, t: ["train", run_config(d, b, t), "--resume", "--set", "train.lr=0.1"],
         "train.lr: 0.0002 in the checkpoint, 0.1 now"),
    Case("resume, data", lambda d, b, t: ["train", run_config(d, b, write_text_data(d / "o.jsonl", n=24, seed=3)),
                                          "--resume"], "the data: hash"),
    Case("resume-anyway, lora.r", lambda d, b, t: ["train", run_config(d, b, t), "--resume-anyway", "--quiet",
                                                   "--set", "lora.r=8"], "other shapes"),
    # where the outputs go
    Case("output_dir is a file", lambda d, b, t: ["train", fresh_config(d, b, t, output_dir=str(_write(d / "f", "x")))],
         "is a file, not a directory"),
    Case("output_dir read-only", lambda d, b, t: ["train", fresh_config(d, b, t, output_dir="/sys/lorakit-sweep/r")],
         "cannot write /sys/lorakit-sweep"),
    Case("disk full", _metrics_to_dev_full, "the disk is full"),
    # model and data
    Case("no config.json", _no_config_json, "has no config.json"),
    Case("missing data", lambda d, b, t: ["train", fresh_config(d, b, t, data={"train": str(d / "x.jsonl")})],
         "x.jsonl"),
    Case("bad json line", lambda d, b, t: ["train", fresh_config(d, b, t, data={"train": str(_write(
        d / "bad.jsonl", '{"text": "a"}\n{"text": \n'))}), "--quiet"], "bad.jsonl:2"),
    Case("inspect, missing data", lambda d, b, t: ["data", "inspect", "--set", f"base_model={b}",
                                                   "--set", f"data.train={d / 'x.jsonl'}"], "x.jsonl"),
    # merge
    Case("merge, non-empty out", lambda d, b, t: ["merge", "--base", str(b), "--adapter", str(d / "run" / "adapter"),
                                                  "--out", str(d / "run")], "is not empty"),
    Case("merge, out is a file", lambda d, b, t: ["merge", "--base", str(b), "--adapter", str(d / "run" / "adapter"),
                                                  "--out", str(_write(d / "f", "x"))], "is a file"),
    Case("merge, no adapter_config", lambda d, b, t: ["merge", "--base", str(b), "--adapter",
                                                      str(_adapter_config(d, None)), "--out", str(d / "m")],
         "adapter_config.json not found"),
    Case("merge, corrupt adapter_config", lambda d, b, t: ["merge", "--base", str(b), "--adapter",
                                                           str(_adapter_config(d, "{oops")), "--out", str(d / "m")],
         "adapter_config.json is not valid JSON"),
    Case("merge, rank mismatch", lambda d, b, t: ["merge", "--base", str(b), "--adapter", str(_adapter_rank(d, 8)),
                                                  "--out", str(d / "m")], "do not belong together"),
    # generate and eval
    Case("generate, empty raw prompt", gen("--raw", "--prompt", ""), "--prompt is empty"),
    Case("generate, negative tokens", gen("--prompt", "hi", "--max-new-tokens", "-5"), "--max-new-tokens must be"),
    Case("generate, negative temperature", gen("--prompt", "hi", "--temperature", "-1"), "--temperature must be"),
    Case("generate, no model", lambda d, b, t: ["generate", "--base", str(d / "none"), "--prompt", "hi"], "base_model"),
    Case("eval, fail-below spec", lambda d, b, t: ["eval", run_config(d, b, t), "--fail-below", "exact_match"],
         "must look like METRIC=VALUE"),
    Case("eval, fail-below metric", lambda d, b, t: ["eval", run_config(d, b, t), "--fail-below", "bleu=0.5"],
         "unknown metric 'bleu'"),
    # Ctrl-C
    Case("SIGINT", lambda d, b, t: ["train", fresh_config(d, b, t, train={"max_steps": 100000, "save_every": None,
                                                                          "eval_every": None})],
         "interrupted at step", status=130, interrupt=True),
]


def run_case(case: Case, root: Path, base: Path, data: Path, finished: Path) -> str | None:
    """None when the case behaved; else what went wrong."""
    d = root / case.name.replace(" ", "_").replace(",", "").replace(".", "_")
    d.mkdir()
    shutil.copytree(finished, d / "run")
    args = case.setup(d, base, data)
    before = snapshot(d) | {f"base/{k}": v for k, v in snapshot(base).items()}
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *args], cwd=d, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if case.interrupt:
        metrics, deadline = d / "fresh" / "metrics.jsonl", time.time() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and proc.poll() is None:
            if time.time() > deadline:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        return f"{case.name}: timed out"
    after = snapshot(d) | {f"base/{k}": v for k, v in snapshot(base).items()}
    changed = sorted(k for k in before if after.get(k) != before[k])
    problems = []
    if proc.returncode != case.status:
        problems.append(f"exit {proc.returncode}, expected {case.status}")
    if "Traceback" in err:
        problems.append("a traceback on stderr")
    if case.expect not in err:
        problems.append(f"{case.expect!r} not in the message")
    if changed:
        problems.append(f"changed {changed[:5]}")
    return f"{case.name} ({' '.join(args)}): {'; '.join(problems)}\n{err[-1500:]}" if problems else None


@pytest.mark.slow
def test_sweep_of_bad_inputs(tmp_path):
    assert len(CASES) >= 30
    base = save_tiny_base(tmp_path / "base")
    data = write_text_data(tmp_path / "train.jsonl", n=24)
    finished = tmp_path / "finished"
    train_lora(write_config(tmp_path / "finished.yaml", base, data, finished), progress=False)
    (tmp_path / "cases").mkdir()
    started = time.time()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: run_case(c, tmp_path / "cases", base, data, finished), CASES))
    failures = [r for r in results if r]
    assert not failures, f"{len(failures)} of {len(CASES)} cases misbehaved:\n\n" + "\n\n".join(failures)
    print(f"{len(CASES)} bad inputs, each exit 2 (or 130), no traceback, no file changed: {time.time() - started:.0f}s")


def test_the_sweep_can_fail(tmp_path):
    """The checker itself: a case whose command succeeds, or names another message, is reported."""
    base = save_tiny_base(tmp_path / "base")
    data = write_text_data(tmp_path / "train.jsonl", n=24)
    (tmp_path / "finished").mkdir()
    (tmp_path / "cases").mkdir()
    ok = Case("config keys", lambda d, b, t: ["config"], "no such text")
    report = run_case(ok, tmp_path / "cases", base, data, tmp_path / "finished")
    assert report is not None and "exit 0, expected 2" in report and "not in the message" in report
    assert json.dumps(CASES[0].name)
