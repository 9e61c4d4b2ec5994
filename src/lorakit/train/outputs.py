"""What a finished run leaves behind: adapter/ (PEFT format) or model/, loss.png, summary.json, and the
summary printed to the user.
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters import base_fingerprint, save_lora_adapter
from lorakit.config import RunConfig
from lorakit.eval.metrics import RATE_METRICS
from lorakit.runtime.atomic import atomic_directory, atomic_file
from lorakit.runtime.devices import proc_kib
from lorakit.runtime.distributed import (
    barrier,
    full_model_state,
    gathered_parameters,
    is_main,
    sharded,
)
from lorakit.train.loop import Loop
from lorakit.train.select import EvalEntry, Selection

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path | None
    summary: dict[str, Any]
    model: nn.Module | None = None
    tokenizer: Any = None
    rank: int = 0  # under torchrun: which process returned this (rank 0 wrote the files)


def save_outputs(loop: Loop, fingerprint: dict[str, Any] | None = None) -> Path | None:
    """adapter/ (PEFT format) for LoRA/QLoRA, model/ (save_pretrained) for full fine-tuning; loss.png.

    With checkpoint selection (train.select_best, or early stopping) the last weights go to adapter-last/
    (model-last/) first, then the chosen eval's weights are restored into the model and saved as adapter/
    (model/): the returned model is the chosen one. Every rank calls this (FSDP2 gathers the sharded weights
    collectively); rank 0 writes."""
    config, run_dir = loop.config, loop.run_dir
    name = "model" if config.method == "full" else "adapter"
    if is_main():
        sel = loop.selection
        plot_losses(loop.state.history, run_dir / "loss.png", sel.chosen_step if sel.active else None, sel.max_forgetting)
    if loop.selection.active:
        _save_weights(loop, f"{name}-last", fingerprint, chosen=False)
        if loop.selection.chosen_step is not None:
            loop.restore_best()
    return _save_weights(loop, name, fingerprint, chosen=loop.selection.active)


def _save_weights(loop: Loop, name: str, fingerprint: dict[str, Any] | None, chosen: bool) -> Path:
    config, run_dir = loop.config, loop.run_dir
    if config.method == "full":
        return save_full_model(loop, name)
    sel = loop.selection
    metrics: dict[str, Any] = {"best_eval_loss": loop.state.best_eval_loss, "steps": loop.state.step}
    if chosen:
        metrics["selection"] = {"metric": sel.metric, "chosen_step": sel.chosen_step,
                                "value": sel.chosen.value if sel.chosen else None, "reason": sel.reason()}
    metadata = {
        "data_hash": loop.data.stats.get("data_hash"),
        "hyperparameters": {"method": config.method, "lora": asdict(config.lora), "train": asdict(config.train),
                            "quant": asdict(config.quant) if config.method == "qlora" else None},
        "metrics": metrics,
    }
    if fingerprint is not None:
        metadata["base_model"] = fingerprint
    with gathered_parameters(loop.model):
        if is_main():
            save_lora_adapter(loop.model, run_dir / name, task_type="SEQ_CLS" if config.task == "seq_cls" else "CAUSAL_LM",
                              metadata=metadata, chat_template=getattr(loop.data, "chat_template", None))
    barrier()
    return run_dir / name


def save_full_model(loop: Loop, name: str = "model") -> Path:
    state = full_model_state(loop.model) if sharded(loop.model) else None  # whole weights on rank 0
    if is_main():
        with atomic_directory(loop.run_dir / name) as tmp:
            loop.model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            loop.tokenizer.save_pretrained(tmp)
    barrier()
    return loop.run_dir / name


def adapter_fingerprint(model: nn.Module, config: RunConfig) -> dict[str, Any] | None:
    if config.method == "full":
        return None
    return base_fingerprint(model)


def plot_losses(history: list[dict[str, Any]], path: Path, chosen_step: int | None = None,
                budget: float | None = None) -> None:
    """Train and eval loss; beside them, when eval.every_eval measured them, the task metrics and the canary's
    perplexity change at each eval, with the forgetting budget and the chosen eval marked."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s (pip install 'lorakit[plot]')", path)
        return
    evals = [r for r in history if "eval_loss" in r or "canary_change" in r]
    metrics = _distinct_series(evals, [m for m in RATE_METRICS if any(m in r for r in evals)])
    canary = any("canary_change" in r for r in evals)
    # A bare Figure renders with Agg on savefig and never touches pyplot's global backend or state.
    fig = Figure(figsize=(13 if metrics or canary else 7, 4), layout="tight")
    axes = fig.subplots(1, 2) if metrics or canary else [fig.subplots()]
    _plot_loss_panel(axes[0], history, chosen_step)
    if len(axes) > 1:
        _plot_metric_panel(axes[1], evals, metrics, canary, chosen_step, budget)
    fig.savefig(path, dpi=100)


def _distinct_series(evals: list[dict[str, Any]], names: list[str]) -> dict[str, str]:
    """{metric: legend label}; metrics with the same values at every eval share one line ("exact_match = accuracy")."""
    labels: dict[str, str] = {}
    for name in names:
        twin = next((m for m in labels if all(r.get(m) == r.get(name) for r in evals)), None)
        if twin is None:
            labels[name] = name
        else:
            labels[twin] += f" = {name}"
    return labels


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plot_loss_panel(ax: Any, history: list[dict[str, Any]], chosen_step: int | None) -> None:
    for key, label, marker in (("loss", "train loss", None), ("eval_loss", "eval loss", "o")):
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, marker=marker, label=label)
    if chosen_step is not None:
        ax.axvline(chosen_step, color="green", linestyle=":", label=f"chosen (step {chosen_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token-weighted)")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_metric_panel(ax: Any, evals: list[dict[str, Any]], metrics: dict[str, str], canary: bool,
                       chosen_step: int | None, budget: float | None) -> None:
    for metric, label in metrics.items():
        ax.plot(*_series(evals, metric), marker="o", label=label)
    if canary:
        ax.plot(*_series(evals, "canary_change"), marker="s", color="red", linestyle="--", label="canary change")
        if budget is not None:
            ax.axhline(budget, color="red", linewidth=0.8, linestyle=":", label=f"forgetting budget +{budget:.0%}")
    if chosen_step is not None:
        ax.axvline(chosen_step, color="green", linestyle=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("task metric; canary perplexity change")
    ax.set_title("at each eval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak of this process: CUDA allocator peak, else VmHWM. Why not ru_maxrss: a child started by fork
    inherits its parent's peak there, so a run launched from a big Python process would over-report."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = proc_kib("/proc/self/status", "VmHWM")
    return peak if peak is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB


def write_summary(loop: Loop, adapter_dir: Path | None, device: torch.device) -> dict[str, Any]:
    s = loop.state
    last = next((r for r in reversed(s.history) if "loss" in r), {})
    summary = {
        "status": loop.stop_reason,
        "steps": s.step,
        "total_steps": loop.total,
        "final_loss": last.get("loss"),
        "final_eval_loss": next((r["eval_loss"] for r in reversed(s.history) if "eval_loss" in r), None),
        "best_eval_loss": s.best_eval_loss,
        "best_step": s.best_step,
        "tokens": s.tokens,
        "wall_time_s": round(s.elapsed_s, 2),
        "tokens_per_s": s.tokens / max(s.elapsed_s, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device),
        "world_size": loop.world,
        "output": str(adapter_dir) if adapter_dir else None,
        "selection": loop.selection.summary() if loop.selection.entries else None,
    }
    if is_main():
        with atomic_file(loop.run_dir / "summary.json") as f:
            json.dump(summary, f, indent=2)
    return summary


def selection_lines(selection: dict[str, Any] | None) -> list[str]:
    """The per-eval table and the choice, when the run measured more than the loss or selected a checkpoint."""
    if not selection or not (selection["active"] or any(e["canary_change"] is not None or selection["metric"] != "eval_loss"
                                                        for e in selection["evals"])):
        return []
    sel = Selection(selection["metric"], selection["mode"], selection["max_forgetting"], None, selection["active"],
                    [EvalEntry(**e) for e in selection["evals"]], selection["chosen_step"])
    what = "adapter/ = chosen" if selection["active"] else "not applied (train.select_best.metric: null)"
    return [f"checkpoint selection ({what}): {selection['reason']}", sel.table()]


def format_summary(result: TrainResult) -> str:
    s, d = result.summary, result.run_dir
    lines = [
        f"{s['status']}: {s['steps']}/{s['total_steps']} steps in {s['wall_time_s']:.1f}s "
        f"({s['tokens_per_s']:.0f} supervised tokens/s, peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB)",
        f"final train loss {s['final_loss']:.4f}" if s["final_loss"] is not None else "no train loss logged",
    ]
    if s["best_eval_loss"] is not None:
        lines.append(f"eval loss {s['final_eval_loss']:.4f} (best {s['best_eval_loss']:.4f} at step {s['best_step']})")
    lines += selection_lines(s.get("selection"))
    lines += [
        f"{'model' if result.adapter_dir and result.adapter_dir.name == 'model' else 'adapter'}: {result.adapter_dir}",
        f"metrics: {d / 'metrics.jsonl'}   plot: {d / 'loss.png'}   summary: {d / 'summary.json'}",
    ]
    if (d / "eval" / "eval.md").is_file():
        lines.append(f"eval (base vs tuned): {d / 'eval' / 'eval.md'}")
    return "\n".join(lines)
