"""train.report_to: the scalars of metrics.jsonl reach TensorBoard, MLflow and W&B, read back with each
tracker's own reader; a tracker that is not installed is refused at config time with what to install."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from conftest import save_tiny_base, write_text_data
from lorakit.config import load_run_config
from lorakit.errors import ConfigError
from lorakit.train import train_lora
from lorakit.train.loggers import SCALARS

pytest.importorskip("tensorboard", reason="pip install tensorboard (in the dev extra)")
pytest.importorskip("mlflow", reason="pip install mlflow-skinny (in the dev extra)")
HAVE_WANDB = importlib.util.find_spec("wandb") is not None


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def expected_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} for every number metrics.jsonl holds."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in numbers(row).items():
            out.setdefault(key, []).append((row["step"], value))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny run (12 steps, log and eval every few steps) reporting to every installed tracker."""
    tmp = tmp_path_factory.mktemp("loggers")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = save_tiny_base(tmp / "base")
    data = write_text_data(tmp / "train.jsonl", n=32)
    trackers = ["tensorboard", "mlflow"] + (["wandb"] if HAVE_WANDB else [])
    config = load_run_config(None, [
        f"base_model={base}", f"output_dir={tmp / 'run'}", f"data.train={data}", "data.eval_fraction=0.2",
        "data.max_seq_len=32", "data.packing=false", "lora.r=4", "train.micro_batch_size=4", "train.grad_accum=1",
        "train.max_steps=12", "train.log_every=2", "train.eval_every=6", "train.save_every=null",
        "train.gradient_checkpointing=false", "eval.at_end=false", f"train.report_to=[{', '.join(trackers)}]",
    ])
    yield train_lora(config, progress=False).run_dir
    mp.undo()


def test_tensorboard_event_files_hold_the_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = expected_series(metrics_rows(run_dir))
    assert set(SCALARS) <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert all(math.isclose(g, v, rel_tol=1e-6) for (_, g), (_, v) in zip(got, points, strict=True)), key


def test_mlflow_file_store_holds_the_metrics_and_config(run_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is opt-in
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("lorakit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.max_steps"] == "12" and run.data.params["lora.r"] == "4"
    for key, points in expected_series(metrics_rows(run_dir)).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert all(math.isclose(g, v, rel_tol=1e-6) for (_, g), (_, v) in zip(got, points, strict=True)), key


def wandb_records(path: Path) -> list:
    """The records of a .wandb file, decoded with wandb's own protobuf `Record`. The framing is LevelDB's log
    format (wandb ships no Python reader for it any more): a 7-byte header (":W&B", magic, version), then
    32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a chunk header never spans blocks: the rest of the block is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding at the end of a block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_holds_the_metrics(run_dir):
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
    rows = metrics_rows(run_dir)
    assert sorted(history) == [row["step"] for row in rows]
    for row in rows:
        for key, value in numbers(row).items():
            assert math.isclose(history[row["step"]][key], value, rel_tol=1e-6), (row["step"], key)


def test_unknown_and_missing_trackers_are_config_problems(monkeypatch):
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'tensorbord'; choose from tensorboard"):
        load_run_config(None, ["train.report_to=[tensorbord]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: wandb is not installed: pip install wandb"):
        load_run_config(None, ["train.report_to=[wandb]"])
    assert load_run_config(None, []).train.report_to == []
