"""torch.distributed on CPU (gloo, 2 processes): equal to one process with the same global batch, FSDP2
equal to DDP, QLoRA's 4-bit codes sharded, a killed rank failing the run cleanly and --resume finishing it.

Two processes with grad_accum K see, together, exactly the rows that one process with grad_accum 2K
sees, so the logged losses agree to fp32 summation order (<= 1e-5) at every step (dropout off: each
rank has its own dropout stream by design).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_base, write_text_data
from lorakit.config import dump_yaml, load_run_config
from lorakit.train import train_lora

STEPS = 30
TOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    save_tiny_base(root / "base")
    write_text_data(root / "train.jsonl", n=48)
    return root


def write_config(root: Path, name: str, *overrides: str) -> Path:
    """A tiny fp32 CPU run; micro-batch 2 × grad_accum 2 per rank (× 2 ranks = 8 rows per step)."""
    config = load_run_config(None, [
        f"base_model={root / 'base'}", f"output_dir={root / name}", f"data.train={root / 'train.jsonl'}",
        "data.eval_fraction=0.2", "data.max_seq_len=32", "data.packing=false", "data.dedup=false",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.micro_batch_size=2", "train.grad_accum=2",
        f"train.max_steps={STEPS}", "train.lr=1e-2", "train.log_every=1", "train.eval_every=10",
        "train.save_every=5", "train.warmup_ratio=0.0", "train.gradient_checkpointing=false",
        "train.device=cpu", "train.dtype=float32", *overrides,
    ])
    path = root / f"{name}.yaml"
    dump_yaml(config, path)
    return path


def single_process(root: Path, name: str, *overrides: str) -> Path:
    """The reference: one process, grad_accum doubled (the same global batch), in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers; also much faster on a shared 2-core machine
    try:
        result = train_lora(write_config(root, name, "train.grad_accum=4", *overrides), progress=False, memory_check=False)
    finally:
        torch.set_num_threads(threads)
    return result.run_dir


def launch(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    return out


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def assert_same_run(got: Path, expected: Path) -> None:
    """Same steps, every loss and eval loss within TOL, the same adapter."""
    a, b = metrics(got), metrics(expected)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in b:
        for key in ("loss", "eval_loss"):
            assert (key in a[step]) == (key in b[step]), (step, key)
            if key in b[step]:
                assert abs(a[step][key] - b[step][key]) <= TOL, (step, key, a[step][key], b[step][key])
    x = load_file(got / "adapter" / "adapter_model.safetensors")
    y = load_file(expected / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and x
    for key in y:
        torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def ddp_run(root) -> tuple[Path, str]:
    """`lorakit train CONFIG --nproc 2` (the convenience re-exec under torch.distributed.run), DDP."""
    out = finish(launch("lorakit", "train", str(write_config(root, "ddp")), "--nproc", "2", "--quiet", "--no-memory-check"))
    return root / "ddp", out


def test_rank_shares_partition_the_global_step(monkeypatch):
    """Rank r takes the r-th block of grad_accum micro-batches of each step; together: the single-process step."""
    import lorakit.runtime.distributed as d
    from lorakit.train import BatchPlan

    plan = BatchPlan(list(range(37)), micro_batch_size=3, seed=5)
    stream = plan.stream(0)
    step = [rows for _, rows in (next(stream) for _ in range(2 * 4))]  # world 4, grad_accum 2
    shares = []
    for r in range(4):
        monkeypatch.setattr(d, "rank", lambda r=r: r)
        shares.append(d.my_share(step, 2))
    assert [rows for share in shares for rows in share] == step
    again = BatchPlan(list(range(37)), micro_batch_size=3, seed=5).stream(0)
    assert [next(again)[1] for _ in range(8)] == step  # a pure function of (seed, epoch): every rank agrees


def test_ddp_two_processes_equal_one_process(root, ddp_run):
    run_dir, out = ddp_run
    assert "global batch: 2 rows/micro-batch × 2 grad_accum × 2 world size = 8 rows per optimizer step" in out
    assert out.count("completed:") == 1, out  # only rank 0 reports
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert_same_run(run_dir, single_process(root, "single"))


def test_fsdp2_qlora_shards_4bit_codes_and_equals_one_process(root):
    """The plain torchrun command; FSDP2 shards the NF4 codes (uint8 parameters) with the LoRA weights. fp32 NF4
    matmuls: in bf16 (auto on a CPU with AVX512-BF16) a rank's half batch rounds differently from the whole one."""
    fp32 = "quant.compute_dtype=float32"
    config = write_config(root, "qlora_fsdp", "method=qlora", "train.parallel=fsdp", fp32)
    out = finish(launch("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorakit", "train",
                        str(config), "--quiet", "--no-memory-check"))
    sharded = re.search(r"FSDP2: .* \((\d+) NF4 storage tensors among them\)", out)
    assert sharded and int(sharded.group(1)) > 0, out
    expected = single_process(root, "qlora_single", "method=qlora", fp32)
    assert_same_run(root / "qlora_fsdp", expected)
    fingerprint = [json.loads((d / "adapter" / "lorakit.json").read_text())["base_model"] for d in (root / "qlora_fsdp", expected)]
    assert fingerprint[0] == fingerprint[1]


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(proc.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the worker pids in /proc (Linux)")
def test_killed_rank_fails_cleanly_then_resume_matches_ddp(root, ddp_run):
    """SIGKILL rank 1 of an FSDP2 run after a checkpoint: non-zero exit naming the rank and the fix;
    --resume then finishes with the losses and adapter of the uninterrupted DDP run (FSDP2 == DDP)."""
    config = write_config(root, "fsdp", "train.parallel=fsdp")
    run_dir = root / "fsdp"
    args = ("lorakit", "train", str(config), "--nproc", "2", "--quiet", "--no-memory-check")
    proc = launch(*args)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-000010").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    victim = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
    os.kill(victim, signal.SIGKILL)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 1, out
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in out and "with --resume" in out, out
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill; the test proves nothing"
    assert max(metrics(run_dir)) < STEPS
    rng = json.loads((run_dir / "checkpoints" / "step-000010" / "state.json").read_text())["rng"]
    assert len(rng) == 2 and rng[0]["torch"] != rng[1]["torch"]  # one dropout stream per rank, both saved

    out = finish(launch(*args, "--resume"))
    assert "resumed from" in out and "step-0000" in out
    assert_same_run(run_dir, ddp_run[0])


def test_nproc_reports_config_problems_before_launching(root, capsys):
    from lorakit.cli import main

    bad = root / "bad.yaml"
    bad.write_text("train: {parallel: zero3}\n")
    assert main(["train", str(bad), "--nproc", "2"]) == 2
    assert "train.parallel must be one of ddp, fsdp; got 'zero3'" in capsys.readouterr().err
