"""Ctrl-C while training (the dashboard's Stop sends the same SIGINT): the step in flight finishes, the loop
stops between two steps, and the checkpoint, metrics.jsonl, adapter/ and summary.json all say that step, so
--resume continues with the next one and every step is logged exactly once. A second Ctrl-C stops at once
and saves nothing new (the state may be half an update).

The SIGINT is raised from inside step 3's eval: after the step counter moved and before the step's metrics
line is written, the window where an immediate KeyboardInterrupt used to checkpoint step 3 with only steps
1-2 in metrics.jsonl (a resume then never logged step 3)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import save_tiny_base, write_text_data
from lorakit.adapters import read_metadata
from lorakit.config import load_run_config
from lorakit.runtime.interrupt import StopRequest
from lorakit.train import train_lora
from lorakit.train.loop import Loop


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupt")
    return save_tiny_base(tmp / "base"), write_text_data(tmp / "train.jsonl", n=32)


def config(base_and_data, run: Path):
    base, data = base_and_data
    return load_run_config(None, [
        f"base_model={base}", f"output_dir={run}", f"data.train={data}", "data.eval_fraction=0.2",
        "data.max_seq_len=32", "data.packing=false", "lora.r=4", "train.micro_batch_size=4", "train.grad_accum=1",
        "train.max_steps=6", "train.log_every=1", "train.eval_every=1", "train.save_every=null",
        "train.gradient_checkpointing=false", "eval.at_end=false",
    ])


def sigint_during_eval(monkeypatch, step: int, times: int) -> None:
    evaluate = Loop.evaluate

    def interrupted(self):
        if self.state.step == step:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return evaluate(self)

    monkeypatch.setattr(Loop, "evaluate", interrupted)


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_stop_request_is_a_flag_and_a_second_sigint_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and not stop.forced
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert stop.forced
    assert signal.getsignal(signal.SIGINT) is before
    with StopRequest(enabled=False) as stop, pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a non-interactive shell: left ignored
    try:
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGINT)
        assert not stop.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_mid_step_stops_at_the_boundary_and_resume_logs_every_step_once(base_and_data, tmp_path, monkeypatch,
                                                                               capsys):
    run = tmp_path / "run"
    sigint_during_eval(monkeypatch, step=3, times=1)
    with pytest.raises(KeyboardInterrupt):
        train_lora(config(base_and_data, run), progress=False)
    assert steps(run) == [1, 2, 3]
    assert "eval_loss" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])  # step 3 finished
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 3 and summary["peak_memory_bytes"] > 0
    assert read_metadata(run / "adapter")["metrics"]["steps"] == 3  # the weights at the stop, ready to export
    err = capsys.readouterr().err
    assert "interrupted at step 3: saved" in err and "--resume" in err

    monkeypatch.undo()
    result = train_lora(config(base_and_data, run), resume=True, progress=False)
    assert steps(run) == [1, 2, 3, 4, 5, 6] and result.summary["status"] == "completed"


def test_a_second_ctrl_c_stops_mid_step_and_saves_nothing_new(base_and_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    sigint_during_eval(monkeypatch, step=2, times=2)
    with pytest.raises(KeyboardInterrupt):
        train_lora(config(base_and_data, run), progress=False)
    assert steps(run) == [1]  # step 2's line never written: it did not finish
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert "stopped at once, mid-step (a second Ctrl-C): nothing new saved" in capsys.readouterr().err
