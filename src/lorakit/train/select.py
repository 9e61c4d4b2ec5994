"""Which eval's weights a run keeps: the best task metric among the evals that did not forget too much.

    eligible(e)  <=>  canary_change(e) <= max_forgetting     (no canary measured, or no limit: every eval)
    chosen       =    the eligible eval with the best metric; a tie goes to less forgetting, then to the earlier eval
    early stop   <=>  `patience` evals in a row did not replace the chosen one

`choose` is the rule as a pure function of the eval history; `Selection` is the same rule fed one eval at a
time by the training loop and stored in every checkpoint (RunState.selection), so a resumed run continues the
same history. When no eval is eligible nothing is chosen: adapter/ then holds the last weights and the summary
says so -- a checkpoint over the forgetting budget is never presented as the best one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lorakit.config import RunConfig

Mode = Literal["max", "min"]


@dataclass
class EvalEntry:
    """One eval as the rule sees it."""

    step: int
    value: float | None  # the selection metric; None when it was not measured
    canary_change: float | None  # perplexity rise over the base; None when no canary
    eligible: bool
    eval_loss: float | None = None


def is_eligible(value: float | None, canary_change: float | None, max_forgetting: float | None) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return max_forgetting is None or canary_change is None or canary_change <= max_forgetting


def better(a: EvalEntry, b: EvalEntry | None, mode: Mode) -> bool:
    """True when `a` should replace `b`: a better metric, or the same metric with less forgetting."""
    if b is None:
        return True
    assert a.value is not None and b.value is not None
    if a.value != b.value:
        return a.value > b.value if mode == "max" else a.value < b.value
    return a.canary_change is not None and b.canary_change is not None and a.canary_change < b.canary_change


def choose(entries: list[EvalEntry], mode: Mode) -> EvalEntry | None:
    """The chosen eval of a history: the best eligible one (see the module docstring), or None."""
    chosen = None
    for entry in entries:
        if entry.eligible and better(entry, chosen, mode):
            chosen = entry
    return chosen


@dataclass
class Selection:
    """The rule applied eval by eval; `state()` / `load()` round-trip it through a checkpoint's state.json."""

    metric: str = "eval_loss"
    mode: Mode = "min"
    max_forgetting: float | None = None
    patience: int | None = None
    active: bool = False  # the chosen eval's weights become adapter/ (else adapter/ = the last weights)
    entries: list[EvalEntry] = field(default_factory=list)
    chosen_step: int | None = None
    since_best: int = 0
    base_canary_loss: float | None = None  # what canary_change is measured against: computed once, kept on resume

    @classmethod
    def from_config(cls, config: RunConfig) -> Selection:
        sb, patience = config.train.select_best, config.train.early_stopping_patience
        return cls(sb.metric or "eval_loss", sb.direction, sb.max_forgetting, patience,
                   sb.metric is not None or patience is not None)

    def load(self, state: dict[str, Any]) -> None:
        """Continue a history saved by `state()` (a resumed run); an empty dict keeps this one."""
        if state:
            self.entries = [EvalEntry(**e) for e in state["entries"]]
            self.chosen_step, self.since_best = state["chosen_step"], state["since_best"]
            self.base_canary_loss = state.get("base_canary_loss")

    def state(self) -> dict[str, Any]:
        return {"entries": [asdict(e) for e in self.entries], "chosen_step": self.chosen_step,
                "since_best": self.since_best, "base_canary_loss": self.base_canary_loss}

    @property
    def chosen(self) -> EvalEntry | None:
        return next((e for e in self.entries if e.step == self.chosen_step), None)

    def record(self, row: dict[str, Any]) -> bool:
        """Add one eval (a metrics row: step, eval_loss, task metrics, canary_change); True when it is the new choice."""
        value = row.get(self.metric)
        value = float(value) if value is not None else None
        change = row.get("canary_change")
        entry = EvalEntry(row["step"], value, change, is_eligible(value, change, self.max_forgetting), row.get("eval_loss"))
        self.entries.append(entry)
        if entry.eligible and better(entry, self.chosen, self.mode):
            self.chosen_step, self.since_best = entry.step, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    # ----- what the summary shows

    def table(self) -> str:
        """Markdown: one row per eval -- step, metric, eval loss, canary change, eligible (the chosen one marked)."""
        loss_col = self.metric != "eval_loss"
        head = f"| step | {self.metric} |" + (" eval_loss |" if loss_col else "") + " canary change | eligible |"
        lines = [head, "|---:|---:|" + ("---:|" if loss_col else "") + "---:|:---|"]
        for e in self.entries:
            cells = [str(e.step), _num(e.value)] + ([_num(e.eval_loss)] if loss_col else [])
            cells += [f"{e.canary_change:+.1%}" if e.canary_change is not None else "-", self._verdict(e)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _verdict(self, e: EvalEntry) -> str:
        if e.value is None or not math.isfinite(e.value):
            return f"no: {self.metric} not measured"
        if not e.eligible:
            return f"no: canary {e.canary_change:+.1%} > +{self.max_forgetting:.0%}"
        return "yes ← chosen" if e.step == self.chosen_step else "yes"

    def reason(self) -> str:
        """One sentence: which eval was chosen and why, and what a loss-only or forgetting-blind rule would have taken."""
        if not self.entries:
            return "no eval ran: adapter/ holds the last weights"
        budget = f"canary rise <= +{self.max_forgetting:.0%}" if self.max_forgetting is not None else "no forgetting limit"
        chosen = self.chosen
        if chosen is None:
            return (f"no eval met the rule ({budget}, {self.metric} measured): adapter/ holds the last weights; "
                    f"lower train.lr, train shorter, or mix general data back in")
        eligible = sum(e.eligible for e in self.entries)
        text = (f"step {chosen.step}: best {self.metric} {_num(chosen.value)} ({self.mode}) among {eligible} of "
                f"{len(self.entries)} evals within the budget ({budget})")
        blind = choose([EvalEntry(e.step, e.value, e.canary_change, e.value is not None, e.eval_loss)
                        for e in self.entries], self.mode)
        if blind is not None and blind.step != chosen.step:
            text += (f"; step {blind.step} scored {_num(blind.value)} but its canary rose "
                     f"{blind.canary_change:+.1%}")
        lowest = min((e for e in self.entries if e.eval_loss is not None), key=lambda e: e.eval_loss, default=None)
        if self.metric != "eval_loss" and lowest is not None and lowest.step != chosen.step:
            text += f"; the lowest eval loss ({lowest.eval_loss:.4f}) was at step {lowest.step}"
        return text

    def summary(self) -> dict[str, Any]:
        chosen = self.chosen
        return {"metric": self.metric, "mode": self.mode, "max_forgetting": self.max_forgetting, "active": self.active,
                "chosen_step": self.chosen_step, "chosen_value": chosen.value if chosen else None,
                "reason": self.reason(), "evals": [asdict(e) for e in self.entries]}


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
