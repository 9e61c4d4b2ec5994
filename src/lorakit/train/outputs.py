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

    Every rank calls this (FSDP2 gathers the sharded weights collectively); rank 0 writes."""
    config, run_dir = loop.config, loop.run_dir
    if is_main():
        plot_losses(loop.state.history, run_dir / "loss.png")
    if config.method == "full":
        return save_full_model(loop)
    metadata = {
        "data_hash": loop.data.stats.get("data_hash"),
        "hyperparameters": {"method": config.method, "lora": asdict(config.lora), "train": asdict(config.train),
                            "quant": asdict(config.quant) if config.method == "qlora" else None},
        "metrics": {"best_eval_loss": loop.state.best_eval_loss, "steps": loop.state.step},
    }
    if fingerprint is not None:
        metadata["base_model"] = fingerprint
    with gathered_parameters(loop.model):
        if is_main():
            save_lora_adapter(loop.model, run_dir / "adapter", task_type="SEQ_CLS" if config.task == "seq_cls" else "CAUSAL_LM",
                              metadata=metadata, chat_template=getattr(loop.data, "chat_template", None))
    barrier()
    return run_dir / "adapter"


def save_full_model(loop: Loop) -> Path:
    state = full_model_state(loop.model) if sharded(loop.model) else None  # whole weights on rank 0
    if is_main():
        with atomic_directory(loop.run_dir / "model") as tmp:
            loop.model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            loop.tokenizer.save_pretrained(tmp)
    barrier()
    return loop.run_dir / "model"


def adapter_fingerprint(model: nn.Module, config: RunConfig) -> dict[str, Any] | None:
    if config.method == "full":
        return None
    return base_fingerprint(model)


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s (pip install 'lorakit[plot]')", path)
        return
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token-weighted)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    }
    if is_main():
        with atomic_file(loop.run_dir / "summary.json") as f:
            json.dump(summary, f, indent=2)
    return summary


def format_summary(result: TrainResult) -> str:
    s, d = result.summary, result.run_dir
    lines = [
        f"{s['status']}: {s['steps']}/{s['total_steps']} steps in {s['wall_time_s']:.1f}s "
        f"({s['tokens_per_s']:.0f} supervised tokens/s, peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB)",
        f"final train loss {s['final_loss']:.4f}" if s["final_loss"] is not None else "no train loss logged",
    ]
    if s["best_eval_loss"] is not None:
        lines.append(f"eval loss {s['final_eval_loss']:.4f} (best {s['best_eval_loss']:.4f} at step {s['best_step']})")
    lines += [
        f"{'model' if result.adapter_dir and result.adapter_dir.name == 'model' else 'adapter'}: {result.adapter_dir}",
        f"metrics: {d / 'metrics.jsonl'}   plot: {d / 'loss.png'}   summary: {d / 'summary.json'}",
    ]
    if (d / "eval" / "eval.md").is_file():
        lines.append(f"eval (base vs tuned): {d / 'eval' / 'eval.md'}")
    return "\n".join(lines)
