"""Base vs tuned: the comparison table, its markdown and plot, and the saved report (eval.md/json/png).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.eval.canary import CanaryResult
from lorakit.eval.metrics import LOWER_IS_BETTER, RATE_METRICS, check_thresholds
from lorakit.runtime.atomic import atomic_file


@dataclass
class CompareRow:
    metric: str
    base: float | None
    tuned: float | None
    delta: float | None


def compare(base_scores: dict[str, float], tuned_scores: dict[str, float] | None) -> list[CompareRow]:
    """One row per metric (base's order, then any tuned-only ones); delta = tuned - base."""
    tuned_scores = tuned_scores or {}
    names = list(base_scores) + [m for m in tuned_scores if m not in base_scores]
    rows = []
    for name in names:
        b, t = base_scores.get(name), tuned_scores.get(name)
        rows.append(CompareRow(name, b, t, t - b if b is not None and t is not None else None))
    return rows


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def markdown_table(rows: Sequence[CompareRow]) -> str:
    """| metric | base | tuned | delta |, lower-is-better metrics marked with a down arrow."""
    lines = ["| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for row in rows:
        name = f"{row.metric} ↓" if row.metric in LOWER_IS_BETTER else row.metric
        lines.append(f"| {name} | {_fmt(row.base)} | {_fmt(row.tuned)} | {_fmt(row.delta, signed=True)} |")
    return "\n".join(lines)


def plot_comparison(rows: Sequence[CompareRow], path: str | Path) -> Path:
    """Grouped bars, base vs tuned: rates (higher is better) left, losses (lower is better) right."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the eval chart needs matplotlib: pip install 'lorakit[plot]'") from None

    # A bare Figure renders with Agg on savefig and never touches pyplot's global backend or state.
    groups = [[r for r in rows if r.metric in RATE_METRICS], [r for r in rows if r.metric in ("eval_loss", "canary_loss")]]
    titles = ["task metrics (higher is better)", "loss (lower is better)"]
    fig = Figure(figsize=(11, 4), layout="tight")
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    for ax, group, title in zip(axes, groups, titles, strict=True):
        x = range(len(group))
        ax.bar([i - 0.2 for i in x], [r.base or 0.0 for r in group], width=0.4, label="base", color="#9e9e9e")
        ax.bar([i + 0.2 for i in x], [r.tuned or 0.0 for r in group], width=0.4, label="tuned", color="#1f77b4")
        ax.set_xticks(list(x), [r.metric for r in group], rotation=30, ha="right")
        ax.set_title(title)
    axes[0].legend()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


@dataclass
class EvalReport:
    """Everything one eval found; `save` writes eval.json, eval.md and eval.png."""

    base: dict[str, float]
    tuned: dict[str, float] | None = None
    canary: CanaryResult | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[CompareRow]:
        return compare(self.base, self.tuned)

    @property
    def scores(self) -> dict[str, float]:
        """The scores that thresholds apply to: the tuned model's, or the base's when there is no adapter."""
        return self.tuned if self.tuned is not None else self.base

    @property
    def markdown(self) -> str:
        parts = [markdown_table(self.rows)]
        if self.canary is not None:
            parts.append(f"Canary: {self.canary.message()}")
        for s in self.samples:
            parts.append(f"- prompt: `{_short(s['prompt'])}`\n  reference: `{s['reference']}`\n"
                         f"  base: `{s['base']}`\n  tuned: `{s.get('tuned', '-')}`")
        return "\n\n".join(parts)

    @property
    def json(self) -> dict[str, Any]:
        return {
            "base": self.base, "tuned": self.tuned, "rows": [asdict(r) for r in self.rows],
            "canary": asdict(self.canary) if self.canary else None, "samples": self.samples, "settings": self.settings,
        }

    def failures(self, thresholds: Sequence[str] | dict[str, float] = (), fail_on_forgetting: bool = False) -> list[str]:
        out = check_thresholds(self.scores, thresholds)
        if fail_on_forgetting and self.canary is not None and self.canary.degraded:
            out.append(self.canary.message())
        return out

    def save(self, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
        out_dir = Path(out_dir)
        paths = {"json": out_dir / "eval.json", "markdown": out_dir / "eval.md"}
        with atomic_file(paths["json"]) as f:
            json.dump(self.json, f, indent=2, default=str)
        with atomic_file(paths["markdown"]) as f:
            f.write(self.markdown + "\n")
        if plot:
            paths["chart"] = plot_comparison(self.rows, out_dir / "eval.png")
        return paths


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else "…" + text[-limit:]
