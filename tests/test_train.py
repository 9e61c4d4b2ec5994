"""The training loop: learning, weighting, resume, crash safety, guards, early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_base, write_text_data
from lorakit.config import load_run_config
from lorakit.train import Loop, TrainingError, loss_sum, prepare_model, supervised_tokens, train_lora


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def make_config(base_dir, tmp_path, *overrides, n=48):
    data = write_text_data(tmp_path / "train.jsonl", n=n)
    defaults = [
        f"base_model={base_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={data}", "data.eval_fraction=0.2",
        "data.max_seq_len=32", "data.packing=false", "data.dedup=false", "lora.r=4", "lora.alpha=8",
        "train.micro_batch_size=4", "train.grad_accum=2", "train.max_steps=12", "train.lr=1e-2",
        "train.log_every=1", "train.eval_every=4", "train.save_every=4", "train.warmup_ratio=0.0",
        "train.gradient_checkpointing=false", "eval.at_end=false",
    ]
    return load_run_config(None, defaults + list(overrides))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_loss_falls_and_only_adapters_change(base_dir, tmp_path):
    config = make_config(base_dir, tmp_path, "train.max_steps=30", "train.eval_every=10")
    result = train_lora(config, progress=False)
    rows = [r for r in read_metrics(result.run_dir) if "loss" in r]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    evals = [r["eval_loss"] for r in read_metrics(result.run_dir) if "eval_loss" in r]
    assert evals[-1] < evals[0]
    # base weights are bit-identical to the saved base model
    import transformers as tf

    base = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    tuned = {n.replace(".base_layer", ""): p for n, p in frozen_state(result.model).items()}
    for name, param in base.named_parameters():
        assert torch.equal(tuned[name], param), name
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.yaml",
                 "metrics.jsonl", "loss.png", "summary.json"):
        assert (result.run_dir / name).is_file(), name
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["status"] == "completed" and summary["peak_memory_bytes"] > 0


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_other_methods_learn(base_dir, tmp_path, method):
    config = make_config(base_dir, tmp_path, f"method={method}", "train.max_steps=20", "train.gradient_checkpointing=true",
                         "train.lr=" + ("1e-2" if method == "qlora" else "3e-3"))
    result = train_lora(config, progress=False)
    rows = [r for r in read_metrics(result.run_dir) if "loss" in r]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    expected = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    assert (result.run_dir / expected).is_file()


def test_token_weighted_accumulation_equals_one_big_batch(base_dir, tmp_path):
    """Two micro-batches of 4 give the same gradient as one batch of 8 (not a mean of means)."""
    grads = {}
    for micro, accum in ((4, 2), (8, 1)):
        config = make_config(base_dir, tmp_path / f"{micro}", f"train.micro_batch_size={micro}",
                             f"train.grad_accum={accum}", "lora.dropout=0.0", "train.max_grad_norm=null")
        torch.manual_seed(0)
        model, tokenizer = prepare_model(config, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        from lorakit.data import prepare_data

        loop = Loop(config, model, tokenizer, prepare_data(config.data, tokenizer), torch.device("cpu"), config_dir(config), False)
        captured = []
        loop.optimizer.step = lambda captured=captured, model=model: captured.append(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        loop.step(loop.plan.stream(0))
        grads[micro] = captured[0]
    small, big = grads[4], grads[8]
    assert small.keys() == big.keys() and small
    for name in small:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-7)


def config_dir(config) -> Path:
    path = Path(config.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_mean_of_means_would_differ(base_dir, tmp_path):
    """Guards the test above: with these rows, per-micro-batch means really do weight tokens differently."""
    config = make_config(base_dir, tmp_path)
    from lorakit.data import collate, prepare_data
    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(str(base_dir))
    rows = prepare_data(config.data, tokenizer).train[:8]
    a, b = (collate(rows[i:i + 4], tokenizer.pad_token_id, False, 32) for i in (0, 4))
    assert supervised_tokens(a) != supervised_tokens(b)


def _cli(*args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorakit", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # bitwise: one thread


def _write_yaml(config, path: Path) -> Path:
    from lorakit.config import dump_yaml

    dump_yaml(config, path)
    return path


def test_sigkill_and_resume_logs_identical_losses(base_dir, tmp_path):
    common = ["train.max_steps=80", "train.save_every=5", "train.eval_every=20", "lora.dropout=0.1",
              "train.micro_batch_size=2", "train.lr=1e-3"]
    full = make_config(base_dir, tmp_path / "full", *common)
    killed = make_config(base_dir, tmp_path / "killed", *common)
    proc = _cli("train", str(_write_yaml(full, tmp_path / "full.yaml")), "--quiet")
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()
    proc = _cli("train", str(_write_yaml(killed, tmp_path / "killed.yaml")), "--quiet")
    run = Path(killed.output_dir)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-000010").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before the kill; the test proves nothing"
    killed_at = max(r["step"] for r in read_metrics(run))
    assert killed_at < 80
    proc = _cli("train", str(tmp_path / "killed.yaml"), "--resume", "--quiet")
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    assert "resumed from" in out
    expected = {r["step"]: r for r in read_metrics(Path(full.output_dir))}
    got = {r["step"]: r for r in read_metrics(run)}
    assert sorted(got) == sorted(expected)
    for step, row in expected.items():
        assert got[step].get("loss") == row.get("loss"), step  # bitwise: floats round-trip through JSON exactly
        assert got[step].get("eval_loss") == row.get("eval_loss"), step
    a = load_file(Path(full.output_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_mid_checkpoint_keeps_previous(base_dir, tmp_path, monkeypatch):
    import lorakit.runtime.checkpoint as ckpt

    config = make_config(base_dir, tmp_path, "train.max_steps=12", "train.save_every=4", "train.keep_checkpoints=5")
    real_save = ckpt.save_file
    calls = {"n": 0}

    def crash_on_second(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(tensors, path, *a, **k)  # half-written state: weights there, the rest missing
            raise OSError("simulated crash mid-save")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second)
    with pytest.raises(OSError, match="simulated crash"):
        train_lora(config, progress=False)
    from lorakit.runtime.checkpoint import list_checkpoints

    found = list_checkpoints(Path(config.output_dir))
    assert [p.name for p in found] == ["step-000004"]
    assert sorted(p.name for p in found[0].iterdir()) == ["optimizer.pt", "state.json", "trainable.safetensors"]
    monkeypatch.setattr(ckpt, "save_file", real_save)
    result = train_lora(config, resume=True, progress=False)
    assert result.summary["steps"] == 12


def test_nan_guard_stops_with_advice_and_keeps_checkpoint(base_dir, tmp_path, monkeypatch):
    import lorakit.train.loop as train_mod

    config = make_config(base_dir, tmp_path, "train.save_every=2")
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = loss_sum(model, batch)
        return loss * float("nan") if calls["n"] > 2 * 3 else loss  # step 4's first micro-batch

    monkeypatch.setattr(train_mod, "loss_sum", poisoned)
    with pytest.raises(TrainingError) as e:
        train_lora(config, progress=False)
    msg = str(e.value)
    assert "non-finite loss at step 4" in msg and "learning rate" in msg and "step-000002" in msg


def test_early_stopping_restores_best_adapter(base_dir, tmp_path, monkeypatch):
    config = make_config(base_dir, tmp_path, "train.eval_every=1", "train.early_stopping_patience=2", "train.save_every=null")
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    snapshots = {}
    real_evaluate = Loop.evaluate

    def fake_evaluate(self):
        real_evaluate(self)
        snapshots[self.state.step] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return next(scripted)

    monkeypatch.setattr(Loop, "evaluate", fake_evaluate)
    result = train_lora(config, progress=False)
    assert result.summary["status"].startswith("early stopping") and result.summary["steps"] == 4
    assert result.summary["best_step"] == 2 and result.summary["best_eval_loss"] == 2.0
    saved = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    best = snapshots[2]
    for key, tensor in saved.items():
        name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(tensor, best[name]), key
    assert not torch.equal(snapshots[4][name], best[name])


def test_cli_reports_every_config_problem_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: qlora\nlora: {r: 0, alpah: 16}\ntrain: {lr: -1, scheduler: cosin}\n")
    proc = _cli("train", str(bad))
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 2
    assert "Traceback" not in out
    for text in ("unknown key lora.alpah; did you mean lora.alpha?", "lora.r must be an integer >= 1, got 0",
                 "train.lr must be a number > 0, got -1", "train.scheduler must be one of cosine, linear, constant"):
        assert text in out, out


def test_eval_runs_at_the_end_of_training(base_dir, tmp_path):
    """eval.at_end: the same code as `lorakit eval`, base (adapters off) vs tuned on the same eval rows."""
    config = make_config(base_dir, tmp_path, "train.max_steps=16", "eval.at_end=true", "eval.canary=null",
                         "eval.max_prompts=4", "eval.generation.max_new_tokens=4")
    result = train_lora(config, progress=False)
    report = json.loads((result.run_dir / "eval" / "eval.json").read_text())
    assert report["tuned"]["eval_loss"] < report["base"]["eval_loss"]
    assert report["tuned"]["eval_loss"] == pytest.approx(result.summary["final_eval_loss"], rel=1e-6)
    assert {p.name for p in (result.run_dir / "eval").iterdir()} == {"eval.json", "eval.md", "eval.png"}
