"""The new-run form: fields -> the YAML that will run -> the same validation and advisor as the CLI.

    preset (RunConfig)  ──to_dict──>  mapping  <── form fields and extra lines, each a `--set KEY=VALUE`
                                         │
                                  YAML preview  ──written to a file──>  config.load_run_config  (every problem
                                         │                                       at once, the CLI's words)
                                  advisor verdict (peak memory vs available, time), from config.json only

The YAML shown is exactly the file the run starts from (<runs>/<name>/config.yaml), and it is validated by
the function `lorakit train` uses, so the form can never accept what the command line would refuse.
output_dir is never a field: it is the run's name under --runs.
"""

from __future__ import annotations

import copy
import datetime as dt
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lorakit.advise import advise, fmt_bytes, fmt_seconds
from lorakit.config import REPORTERS, RunConfig, apply_overrides, load_run_config, to_dict
from lorakit.errors import ConfigError, LorakitError
from lorakit.ui.runs import RunsRoot, UIError

# The keys the form shows, in order; anything else goes in the free "extra" lines (KEY=VALUE, as --set).
FORM_KEYS = (
    "method", "base_model", "data.train", "data.max_seq_len",
    "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
    "train.max_steps", "train.lr", "train.micro_batch_size", "train.grad_accum",
    "train.log_every", "train.eval_every", "train.save_every", "train.report_to", "eval.at_end",
)


def form_defaults(preset: RunConfig) -> dict[str, str]:
    """The preset's value of every form field, as the text the field shows (YAML flow style)."""
    data = to_dict(preset)
    return {key: _text(_get(data, key)) for key in FORM_KEYS}


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def overrides_of(fields: dict[str, Any], extra: str) -> list[str]:
    """Form fields and extra lines as `--set` overrides (an empty field means null, as `--set key=` does)."""
    if not isinstance(fields, dict):
        raise UIError("fields must be a mapping of config keys to values")
    unknown = sorted(set(fields) - set(FORM_KEYS))
    if unknown:
        raise UIError(f"unknown form fields {unknown}; put other keys in the extra lines as KEY=VALUE")
    out = [f"{key}={'' if fields[key] is None else fields[key]}" for key in FORM_KEYS if key in fields]
    for line in (extra or "").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def compose(preset: RunConfig, fields: dict[str, Any], extra: str, output_dir: Path) -> str:
    """The YAML of the run: the preset, then the form, then the extra lines; output_dir is the run's folder."""
    data = apply_overrides(to_dict(copy.deepcopy(preset)), overrides_of(fields, extra))
    if any(line.split("=", 1)[0].strip() == "output_dir" for line in (extra or "").splitlines()):
        raise UIError("output_dir is the run's name under --runs: set the name field instead of output_dir")
    data["output_dir"] = str(output_dir)
    return yaml.safe_dump(data, sort_keys=False)


def validate(text: str) -> tuple[RunConfig | None, list[str]]:
    """(config, []) or (None, every problem) -- load_run_config on the YAML, as `lorakit train` reads it."""
    with tempfile.TemporaryDirectory(prefix="lorakit-ui-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_run_config(path), []
        except ConfigError as e:
            return None, e.problems


def verdict(config: RunConfig, resolve_base: Callable[[str], str]) -> dict[str, Any]:
    """The advisor on this exact config (config.json only, no calibration run): fits?, peak, time, notes."""
    trial = copy.deepcopy(config)
    try:
        trial.base_model = resolve_base(trial.base_model)
        advice = advise(trial, calibrate_now=False)
    except (LorakitError, OSError, ValueError) as e:
        return {"error": f"the advisor cannot predict this run: {e}"}
    total = advice.total_time_s
    return {
        "fits": advice.fits, "device": advice.device, "peak_bytes": advice.peak_memory_bytes,
        "peak": fmt_bytes(advice.peak_memory_bytes), "available": fmt_bytes(advice.memory_available),
        "peak_phase": advice.memory.peak_phase, "step_time": fmt_seconds(advice.step_time_s),
        "total_steps": advice.total_steps, "total_time": fmt_seconds(total) if total is not None else None,
        "notes": advice.notes,
        "recommendations": [{"key": r.key, "value": str(r.value), "reason": r.reason} for r in advice.recommendations],
    }


def default_name(fields: dict[str, Any]) -> str:
    return f"{fields.get('method') or 'run'}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


class NewRunForm:
    """Preview and create runs from the form; `preset` is the config the form starts from."""

    def __init__(self, root: RunsRoot, preset: RunConfig, resolve_base: Callable[[str], str]):
        self.root, self.preset, self.resolve_base = root, preset, resolve_base
        self.verdicts: OrderedDict[str, dict[str, Any]] = OrderedDict()  # YAML -> verdict: a form re-asks often

    def defaults(self) -> dict[str, Any]:
        return {"fields": form_defaults(self.preset), "keys": list(FORM_KEYS), "reporters": list(REPORTERS),
                "name": default_name({"method": self.preset.method})}

    def preview(self, name: str, fields: dict[str, Any], extra: str, with_advice: bool = True) -> dict[str, Any]:
        text = compose(self.preset, fields, extra, self.root.path(name or default_name(fields)))
        config, problems = validate(text)
        advice = None
        if config is not None and with_advice:
            if text not in self.verdicts:
                self.verdicts[text] = verdict(config, self.resolve_base)
                while len(self.verdicts) > 64:
                    self.verdicts.popitem(last=False)
            advice = self.verdicts[text]
        return {"yaml": text, "problems": problems, "advice": advice}

    def create(self, name: str, fields: dict[str, Any], extra: str) -> Path:
        """<runs>/<name>/config.yaml, once the YAML validates; the folder must be new (or empty)."""
        run_dir = self.root.path(name)
        text = compose(self.preset, fields, extra, run_dir)
        _, problems = validate(text)
        if problems:
            raise ConfigError(problems)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UIError(f"run {name!r} already exists under {self.root.root}; pick another name (or resume it)", 409)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(text, encoding="utf-8")
        return run_dir
