"""The trackers people already use (`train.report_to`): the scalars of each metrics.jsonl line, also sent to

    tensorboard   event files in <output_dir>/tensorboard/          (torch.utils.tensorboard.SummaryWriter)
    mlflow        a local file store, <output_dir>/mlruns/           (experiment "lorakit", one run per start;
                  MLFLOW_TRACKING_URI, when set, names a server or database instead)
    wandb         <output_dir>/wandb/, offline unless WANDB_MODE says otherwise (`wandb sync` uploads it later)

Each line is logged under its own keys (loss, eval_loss, lr, grad_norm, tokens, tokens_per_s, epoch, and what a
periodic eval adds) at its optimizer `step`, so every tracker shows the curves metrics.jsonl holds, and
nothing else. Each tracker is an
optional dependency imported here, at the point of use; config.py refuses a tracker that is not installed
before any weight loads, with what to install.

A resumed run truncates metrics.jsonl back to its checkpoint and logs those steps again: TensorBoard is
told to purge the later events (`purge_step`); MLflow and W&B get a new run per start, tagged with the step
it resumed from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from lorakit.config import RunConfig

# the scalars every training line has (a periodic eval adds eval_loss, its task metrics, eval_time_s, ...)
SCALARS = ("loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "epoch")


class Reporter(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...
    def close(self, status: str) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """Every finite number of one metrics line, keyed as in metrics.jsonl; `step` is the x axis, not a series."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardReporter:
    def __init__(self, run_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # purge_step: events at or after it (written before a stop, logged again now) are hidden
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])
        self.writer.flush()  # a dashboard reading the files sees each line as it comes

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowReporter:
    def __init__(self, run_dir: Path, config: RunConfig, resumed_step: int):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")  # a server or database the user set up, else the run's folder
        if not uri:
            # NOTE: MLflow 3 keeps the file store behind an opt-in (it points new setups at a database); a
            # folder beside metrics.jsonl is what needs no server and no extra packages
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name("lorakit")
        experiment = found.experiment_id if found else self.client.create_experiment("lorakit")
        tags = {"lorakit.run_dir": str(run_dir.resolve()), "lorakit.resumed_from_step": str(resumed_step)}
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name, tags=tags).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, row["step"]) for k, v in scalars(row).items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "KILLED")


class WandbReporter:
    def __init__(self, run_dir: Path, config: RunConfig, resumed_step: int):
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")  # offline by default: no account, no network
        self.run = wandb.init(project="lorakit", name=run_dir.name, dir=str(run_dir), mode=mode,
                              config={**flat_config(config), "resumed_from_step": resumed_step},
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


def flat_config(config: RunConfig) -> dict[str, Any]:
    """{"train.lr": 2e-4, ...}: the resolved config as one level of dotted keys (trackers' params)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(dataclasses.asdict(config), "")
    return out


class Reporters:
    """Every tracker of train.report_to, fed one metrics line at a time (rank 0 only)."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    def log(self, row: dict[str, Any]) -> None:
        for r in self.reporters:
            r.log(row)

    def close(self, status: str) -> None:
        for r in self.reporters:
            r.close(status)


def open_reporters(config: RunConfig, run_dir: Path, resumed_step: int = 0) -> Reporters:
    """The trackers `config.train.report_to` names (none: an empty Reporters that does nothing)."""
    made: list[Reporter] = []
    for name in dict.fromkeys(config.train.report_to):
        if name == "tensorboard":
            made.append(TensorBoardReporter(run_dir, resumed_step))
        elif name == "mlflow":
            made.append(MlflowReporter(run_dir, config, resumed_step))
        elif name == "wandb":
            made.append(WandbReporter(run_dir, config, resumed_step))
    return Reporters(made)
