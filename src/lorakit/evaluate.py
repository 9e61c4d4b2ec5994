"""Evaluation: is the tuned model better at the task, and what did it forget?

Base and tuned are scored on identical examples by *one* model object: the tuned model is the base
plus its adapter, and `adapters_disabled` gives the base outputs (no second copy in memory).

    eval_loss   token-weighted:  L = Σ_i Σ_t CE(i, t) / Σ_i n_i   over supervised tokens (labels != -100),
                perplexity = exp(L). Never a mean of per-batch means; logits are dropped batch by batch.
    generation  normalized exact match and token F1 (SQuAD), ROUGE-L (LCS F-measure), JSON validity,
                JSON-schema compliance, label accuracy and macro F1 (from a JSON key or the text).
    classifier  accuracy and macro F1 from a sequence-classification head.
    canary      loss/perplexity on general text from the base's own distribution; a tuned model whose
                canary perplexity rises by more than `canary_max_increase` is flagged as forgetting.

The training loop calls `eval_loss`; `lorakit eval` calls `evaluate_run`; both end in the same code.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import EvalConfig
from lorakit.errors import ConfigError
from lorakit.generate import encode_prompts, generate, model_device, render_chat_prompt
from lorakit.lora import adapters_disabled, lora_layers

# Metrics where lower is better; every other metric is a rate in [0, 1] where higher is better.
LOWER_IS_BETTER = ("eval_loss", "perplexity", "canary_loss", "canary_perplexity")
RATE_METRICS = ("exact_match", "token_f1", "rouge_l", "json_valid", "schema_valid", "accuracy", "macro_f1")
ALL_METRICS = LOWER_IS_BETTER + RATE_METRICS


# --------------------------------------------------------------------------- loss and perplexity


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(Σ cross-entropy over supervised positions in float64, their count) for one batch.

    Labels follow transformers' convention: aligned with input_ids, shifted here (token t predicts t+1).
    1-D labels are class ids of a classification head (one "token" per row). Every other key of the
    batch (attention_mask, position_ids of packed rows, ...) goes to the model unchanged.
    """
    from lorakit.data import model_inputs

    device = model_device(model)
    inputs = model_inputs(batch, model)
    labels = batch["labels"].to(device)
    logits = model(**inputs).logits
    if labels.dim() == 1:  # (B,) class ids, logits (B, C)
        return F.cross_entropy(logits.double(), labels, reduction="sum"), labels.numel()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for row in range(logits.shape[0]):  # one row at a time: the fp32 upcast never holds (B, T, V)
        row_loss = F.cross_entropy(logits[row, :-1].float(), labels[row, 1:], ignore_index=-100, reduction="sum")
        total += row_loss.double()
    return total, int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def eval_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted loss and perplexity over `batches` (the data pipeline's collate output).

    Only two numbers are accumulated, so memory stays bounded however long the eval set is. The model
    may be in train mode (the training loop calls this): it is switched to eval and back.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            loss_sum, n = batch_loss_sum(model, batch)
            total, count = total + float(loss_sum), count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("eval_loss: the batches hold no supervised tokens (every label is -100); check the eval data")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


# --------------------------------------------------------------------------- text metrics


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: harmonic mean of precision and recall of the bag of normalized tokens."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)·len(b)), one row kept)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenization: lowercase, runs of [a-z0-9] (no stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: P = LCS/|pred|, R = LCS/|ref|, F = 2PR/(P+R)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


_MISSING = object()


def parse_json(text: str) -> Any:
    """The JSON value of the whole output (surrounding whitespace allowed), or `_MISSING` when invalid.

    NOTE: strict on purpose -- prose around the JSON, or a ``` fence, makes it invalid, as it would
    be for the program that consumes the output.
    """
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return _MISSING


def json_valid(text: str) -> bool:
    return parse_json(text) is not _MISSING


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Violations of a JSON-schema subset: type (a name or list), enum, required, properties, items.

    Keywords outside the subset are ignored (so a full schema still checks what it can).
    """
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_JSON_TYPES[name](value) for name in names if name in _JSON_TYPES):
            return [f"{path}: expected {' or '.join(names)}, got {type(value).__name__} {value!r}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing required key {key!r}" for key in schema.get("required", []) if key not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{path}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def schema_valid(text: str, schema: dict[str, Any]) -> bool:
    value = parse_json(text)
    return value is not _MISSING and not schema_errors(value, schema)


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"accuracy needs equally many predictions and labels (> 0), got {len(predictions)} and {len(labels)}")
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def macro_f1(predictions: Sequence[Any], labels: Sequence[Any], classes: Sequence[Any] | None = None) -> float:
    """Unweighted mean of per-class F1 over `classes` (default: the classes present in `labels`).

    A prediction outside the gold classes (e.g. an unparseable answer) counts as a miss for its true
    class but gets no class of its own, so invalid output lowers recall without adding a zero-F1 class.
    """
    accuracy(predictions, labels)  # same length checks
    scores = []
    for c in classes if classes is not None else sorted(set(labels), key=str):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def predicted_label(text: str, label_key: str | None) -> str:
    """The class a generation names: its JSON `label_key` value, else the stripped lowercased text."""
    if label_key is None:
        return text.strip().lower()
    value = parse_json(text)
    if isinstance(value, dict) and label_key in value:
        return str(value[label_key]).strip().lower()
    return "<invalid>"


def score_generations(
    predictions: Sequence[str], references: Sequence[str], schema: dict[str, Any] | None = None,
    labels: Sequence[str] | None = None, label_key: str | None = None,
) -> dict[str, float]:
    """Mean of each text metric over prompt -> reference pairs.

    JSON validity is reported when a schema is given or every reference is a JSON object/array (a
    structured-output task); label accuracy and macro F1 when labels are given or `label_key` names
    the JSON key holding the class (then the reference's value is the gold label).
    """
    n = len(references)
    if len(predictions) != n or n == 0:
        raise ValueError(f"score_generations needs equally many predictions and references (> 0), got {len(predictions)} and {n}")
    scores = {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "rouge_l": sum(map(rouge_l, predictions, references)) / n,
    }
    if schema is not None or all(isinstance(parse_json(r), (dict, list)) for r in references):
        scores["json_valid"] = sum(map(json_valid, predictions)) / n
    if schema is not None:
        scores["schema_valid"] = sum(schema_valid(p, schema) for p in predictions) / n
    if labels is None and label_key is not None:
        labels = [predicted_label(r, label_key) for r in references]
    if labels is not None:
        gold = [str(y).strip().lower() for y in labels]
        guessed = [predicted_label(p, label_key) for p in predictions]
        scores["accuracy"], scores["macro_f1"] = accuracy(guessed, gold), macro_f1(guessed, gold)
    return scores


# --------------------------------------------------------------------------- classification head


@torch.no_grad()
def eval_classifier(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss, accuracy and macro F1 of a sequence-classification model; batches carry (B,) class labels."""
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    gold: list[int] = []
    total = 0.0
    try:
        for batch in batches:
            device = model_device(model)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}  # (B, T) masks only
            logits = model(**inputs).logits  # (B, C)
            labels = batch["labels"].to(device)
            total += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            predictions += logits.argmax(-1).tolist()
            gold += labels.tolist()
    finally:
        model.train(was_training)
    return {"eval_loss": total / len(gold), "accuracy": accuracy(predictions, gold), "macro_f1": macro_f1(predictions, gold)}


# --------------------------------------------------------------------------- canary


GENERAL_CANARY: tuple[tuple[str, str], ...] = (
    ("The capital of France is", " Paris."),
    ("Water freezes at zero degrees", " Celsius."),
    ("The sun rises in the", " east and sets in the west."),
    ("One, two, three, four,", " five, six, seven."),
    ("Monday, Tuesday, Wednesday,", " Thursday, Friday."),
    ("The opposite of hot is", " cold."),
    ("A week has seven days and a year has twelve", " months."),
    ("Cats and dogs are popular", " pets."),
    ("To be or not to be, that is the", " question."),
    ("The largest ocean on Earth is the", " Pacific Ocean."),
    ("She opened the door and walked into the", " room."),
    ("Please close the window because it is", " cold outside."),
    ("def add(a, b):\n    return", " a + b"),
    ("Two plus two equals", " four."),
    ("The chemical symbol for gold is", " Au."),
    ("Thank you very much for your", " help."),
)


@dataclass
class CanaryResult:
    """Base vs tuned loss on general text; `degraded` when perplexity rose more than `threshold`."""

    base_loss: float
    tuned_loss: float
    base_perplexity: float
    tuned_perplexity: float
    increase: float
    threshold: float
    degraded: bool

    def message(self) -> str:
        verdict = "FORGETTING: " if self.degraded else "ok: "
        return (f"{verdict}canary perplexity {self.base_perplexity:.3f} -> {self.tuned_perplexity:.3f} "
                f"({self.increase:+.1%}; threshold +{self.threshold:.0%})")


def canary_check(base_loss: float, tuned_loss: float, max_increase: float = 0.10) -> CanaryResult:
    """Compare canary losses. increase = ppl_tuned / ppl_base - 1 = exp(L_tuned - L_base) - 1."""
    increase = math.exp(tuned_loss - base_loss) - 1
    return CanaryResult(base_loss, tuned_loss, math.exp(min(base_loss, 700.0)), math.exp(min(tuned_loss, 700.0)),
                        increase, max_increase, increase > max_increase)


def completion_batches(
    tokenizer: Any, rows: Sequence[dict[str, str]], batch_size: int = 8, max_len: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """{"prompt", "completion"} rows -> right-padded batches with the loss on completion tokens only.

    Prompt and completion are tokenized separately (as lm-eval-harness does), so the boundary is exact.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = encode_prompts(tokenizer, [r["prompt"] for r in chunk])
        pairs = []
        for prompt, row in zip(prompts, chunk, strict=True):
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids, labels = prompt + completion, [-100] * len(prompt) + completion
            pairs.append((ids[-max_len:], labels[-max_len:]) if max_len else (ids, labels))
        width = max(len(ids) for ids, _ in pairs)
        yield {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in pairs]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs]),
        }


# --------------------------------------------------------------------------- comparison and report


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


def parse_thresholds(specs: Sequence[str] | dict[str, float]) -> dict[str, float]:
    """`["exact_match=0.8", ...]` -> {"exact_match": 0.8}; names and values are checked up front, and every
    bad spec is reported at once (ConfigError) -- the CLI calls this before the eval runs."""
    items, problems = [], []
    if isinstance(specs, dict):
        items = list(specs.items())
    else:
        for spec in specs:
            name, sep, value = spec.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = None
            if not sep or number is None:
                problems.append(f"--fail-below {spec!r} must look like METRIC=VALUE, e.g. exact_match=0.8")
            else:
                items.append((name.strip(), number))
    for name, value in items:
        if name in LOWER_IS_BETTER:
            problems.append(f"--fail-below {name}: {name} is lower-is-better; thresholds apply to {', '.join(RATE_METRICS)}")
        elif name not in RATE_METRICS:
            problems.append(f"--fail-below: unknown metric {name!r}; choose from {', '.join(RATE_METRICS)}")
        elif not (isinstance(value, (int, float)) and 0 <= value <= 1):
            problems.append(f"--fail-below {name}={value}: a threshold is a rate in [0, 1], e.g. {name}=0.8")
    if problems:
        raise ConfigError(problems, source="--fail-below")
    return dict(items)


def check_thresholds(scores: dict[str, float], thresholds: Sequence[str] | dict[str, float]) -> list[str]:
    """One message per metric below its threshold (or not computed in this eval); [] means pass.

    The CLI exits 1 when this list is non-empty, so CI can gate on `--fail-below exact_match=0.8`.
    """
    failures = []
    for name, minimum in parse_thresholds(thresholds).items():
        value = scores.get(name)
        if value is None:
            failures.append(f"{name} was not computed in this eval (computed: {', '.join(scores)}); threshold {minimum}")
        elif not value >= minimum:  # also catches NaN
            failures.append(f"{name} = {value:.4f} is below the required {minimum}")
    return failures


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
        from lorakit.runtime.atomic import atomic_file

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


# --------------------------------------------------------------------------- settings


EvalSettings = EvalConfig  # the run config's `eval` section (config.py documents every field)


def load_schema(schema: str | dict | None) -> dict[str, Any] | None:
    if schema is None or isinstance(schema, dict):
        return schema
    try:
        return json.loads(Path(schema).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"eval.schema {schema}: could not read a JSON schema ({e})") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return rows


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptSet:
    """Generation inputs as token ids (one tokenization for base and tuned) with their references."""

    prompt_ids: list[list[int]]
    references: list[str]
    labels: list[str] | None = None


def prompts_from_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, chat_template: str | None = None) -> PromptSet:
    """{"messages"} rows are rendered with the chat template (add_generation_prompt), {"prompt"} rows used
    as is. The reference is the row's "reference", else a final assistant message (dropped from the prompt)."""
    texts, references = [], []
    for i, row in enumerate(rows):
        messages = row.get("messages")
        if messages and messages[-1].get("role") == "assistant":
            references.append(row.get("reference", messages[-1]["content"]))
            messages = messages[:-1]
        elif "reference" in row:
            references.append(row["reference"])
        else:
            raise ValueError(f"eval prompt row {i} has no 'reference' (nor a final assistant message); fields: {sorted(row)}")
        if messages:
            texts.append(render_chat_prompt(tokenizer, messages, chat_template))
        elif "prompt" in row:
            texts.append(row["prompt"])
        else:
            raise ValueError(f"eval prompt row {i} has neither 'messages' nor 'prompt'; fields: {sorted(row)}")
    labels = [str(r["label"]) for r in rows] if rows and all("label" in r for r in rows) else None
    return PromptSet(encode_prompts(tokenizer, texts), references, labels)


def prompts_from_examples(examples: Sequence[Any], tokenizer: Any) -> PromptSet:
    """Prompt = the tokens before the first supervised label, reference = that supervised run decoded.

    Derived from token ids, so it works for every format and chat template the data pipeline knows,
    and the prompt is byte-identical to what the model was trained on.
    """
    prompts, references = [], []
    for ex in examples:
        ids, labels = list(map(int, ex.input_ids)), list(map(int, ex.labels))
        supervised = [i for i, y in enumerate(labels) if y != -100]
        if not supervised or supervised[0] == 0:
            continue  # nothing to prompt with (train_on: all, or a truncated example)
        start = end = supervised[0]
        while end < len(labels) and labels[end] != -100:
            end += 1
        prompts.append(ids[:start])
        references.append(tokenizer.decode(ids[start:end], skip_special_tokens=True).strip())
    return PromptSet(prompts, references)


# --------------------------------------------------------------------------- base vs tuned


def _loss_scores(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: str) -> dict[str, float]:
    if task == "seq_cls":
        return eval_classifier(model, batches)
    result = eval_loss(model, batches)
    return {"eval_loss": result["loss"], "perplexity": result["perplexity"]}


def score_model(
    model: nn.Module, tokenizer: Any, settings: EvalSettings, loss_batches: Callable[[], Iterable[dict]] | None,
    prompts: PromptSet | None, canary: Sequence[dict[str, str]] | None, task: str = "causal_lm",
) -> tuple[dict[str, float], list[str]]:
    """Every metric for the model as it is now (adapters on or off); returns (scores, generations)."""
    scores: dict[str, float] = {}
    outputs: list[str] = []
    if loss_batches is not None:
        scores |= _loss_scores(model, loss_batches(), task)
    if prompts is not None and prompts.prompt_ids:
        outputs = generate(model, tokenizer, prompts.prompt_ids, settings.generation, settings.batch_size)
        scores |= score_generations(outputs, prompts.references, load_schema(settings.schema), prompts.labels, settings.label_key)
    if canary:
        result = eval_loss(model, completion_batches(tokenizer, canary, settings.batch_size))
        scores |= {"canary_loss": result["loss"], "canary_perplexity": result["perplexity"]}
    return scores, outputs


def run_eval(
    model: nn.Module, tokenizer: Any, settings: EvalSettings | None = None, *,
    loss_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
    prompts: PromptSet | None = None, canary: Sequence[dict[str, str]] | None = None, task: str = "causal_lm",
) -> EvalReport:
    """Score the model with its adapter (tuned) and inside `adapters_disabled` (base), same examples.

    `loss_batches` is a factory (called once per model) so the eval set is streamed twice, never held
    as logits. A model without LoRA layers is scored once, as the base.
    """
    settings = settings or EvalSettings()
    if prompts is not None:
        prompts = PromptSet(prompts.prompt_ids[: settings.max_prompts], prompts.references[: settings.max_prompts],
                            prompts.labels[: settings.max_prompts] if prompts.labels else None)
    tuned = tuned_out = None
    if any(True for _ in lora_layers(model)):
        tuned, tuned_out = score_model(model, tokenizer, settings, loss_batches, prompts, canary, task)
    with adapters_disabled(model):
        base, base_out = score_model(model, tokenizer, settings, loss_batches, prompts, canary, task)
    result = None
    if tuned is not None and "canary_loss" in base:
        result = canary_check(base["canary_loss"], tuned["canary_loss"], settings.canary_max_increase)
    samples = _samples(tokenizer, prompts, base_out, tuned_out, settings.samples)
    return EvalReport(base, tuned, result, samples, asdict(settings))


def _samples(tokenizer: Any, prompts: PromptSet | None, base: list[str], tuned: list[str] | None, n: int) -> list[dict[str, str]]:
    if prompts is None or not base:
        return []
    out = []
    for i in range(min(n, len(base))):
        row = {"prompt": tokenizer.decode(prompts.prompt_ids[i]), "reference": prompts.references[i], "base": base[i]}
        if tuned:
            row["tuned"] = tuned[i]
        out.append(row)
    return out


# --------------------------------------------------------------------------- a run, end to end


def default_settings(config: Any) -> EvalSettings:
    """The run config's `eval` section; for the demo task's data left at defaults, the demo's settings."""
    from lorakit.demo import demo_eval_settings, is_demo_data

    untouched = config.eval == EvalConfig(at_end=config.eval.at_end)
    if untouched and (config.data.train is None or is_demo_data(config.data.train)):
        return demo_eval_settings()
    return config.eval


def load_for_eval(config: Any, adapter_dir: Path | None) -> tuple[nn.Module, Any]:
    """The base as trained (NF4-quantized for qlora) with the adapter loaded, and its tokenizer."""
    from lorakit.adapters import load_lora_adapter
    from lorakit.models import load_model, load_tokenizer
    from lorakit.runtime.devices import pick_device, pick_dtype

    device = pick_device(config.train.device)
    dtype = pick_dtype(config.train.dtype, device)
    tokenizer = load_tokenizer(config.base_model, config.revision)
    model = load_model(config.base_model, config.task, dtype, device, config.revision, config.num_labels)
    if config.method == "qlora":
        from lorakit.quant import quantize_model

        quantize_model(model, config.quant, compute_dtype=dtype, progress=False)
    if adapter_dir is not None:
        load_lora_adapter(model, adapter_dir)
    return model, tokenizer


def _prepared_data(config: Any, tokenizer: Any) -> Any:
    """The data pipeline's eval split, exactly as training made it (the demo files when data.train is null)."""
    import dataclasses

    from lorakit.data import prepare_data

    data = config.data
    if data.train is None:
        from lorakit.demo import write_demo_data

        paths = write_demo_data(Path(config.output_dir) / "data")
        data = dataclasses.replace(data, train=str(paths["train"]), eval=data.eval or str(paths["eval"]))
    return prepare_data(data, tokenizer, config.task, config.train.micro_batch_size)


def _loss_batch_factory(config: Any, examples: list[Any], tokenizer: Any) -> Callable[[], Iterator[dict]]:
    """Batches built as the training loop builds its eval batches (same packing, same collate)."""
    from lorakit.data import collate
    from lorakit.train import training_rows

    rows, size = training_rows(examples, config), config.train.micro_batch_size
    pad = tokenizer.pad_token_id

    def batches() -> Iterator[dict]:
        for i in range(0, len(rows), size):
            yield collate(rows[i : i + size], pad, config.data.packing, config.data.max_seq_len)

    return batches


def _canary_rows(settings: EvalSettings, config: Any) -> list[dict[str, str]] | None:
    if settings.canary is None:
        return None
    if settings.canary != "builtin":
        return read_jsonl(settings.canary)
    if config.base_model == "demo":
        from lorakit.demo import demo_canary

        return demo_canary()
    return [{"prompt": p, "completion": c} for p, c in GENERAL_CANARY]


def evaluate_run(
    config: Any, adapter_dir: str | Path | None, out_dir: str | Path, *, model: nn.Module | None = None,
    tokenizer: Any = None, settings: EvalSettings | None = None, progress: bool = True,
) -> EvalReport:
    """`lorakit eval`: base vs tuned on the run's eval split, prompts and canary; writes out_dir/eval.*.

    Pass `model`/`tokenizer` (the trained model, adapter attached) to skip loading; otherwise the base
    is loaded as in training and `adapter_dir` attached. Chat prompts use the adapter's saved template.
    """
    settings = settings or default_settings(config)
    problems = settings.problems()
    if problems:
        raise ValueError("eval settings: " + "; ".join(problems))
    if model is None:
        model, tokenizer = load_for_eval(config, Path(adapter_dir) if adapter_dir else None)
    elif tokenizer is None:
        raise ValueError("evaluate_run: pass the tokenizer together with the model")
    data = _prepared_data(config, tokenizer)
    prompts, canary = None, None
    if config.task == "causal_lm":  # a classifier head has no text to generate and no LM loss to canary
        prompts, canary = _prompts(settings, data, tokenizer, _adapter_template(adapter_dir)), _canary_rows(settings, config)
    if progress:
        import sys

        n_prompts = min(len(prompts.prompt_ids), settings.max_prompts) if prompts else 0
        print(f"eval: {len(data.eval)} eval examples, {n_prompts} prompts, canary {len(canary or [])}", file=sys.stderr)
    loss_batches = _loss_batch_factory(config, data.eval, tokenizer) if data.eval else None
    report = run_eval(model, tokenizer, settings, loss_batches=loss_batches, prompts=prompts, canary=canary, task=config.task)
    report.save(out_dir)
    return report


def _prompts(settings: EvalSettings, data: Any, tokenizer: Any, template: str | None) -> PromptSet:
    """The settings' prompt file (rendered with the training template), else the eval split itself."""
    if settings.prompts:
        return prompts_from_rows(read_jsonl(settings.prompts), tokenizer, template or getattr(data, "chat_template", None))
    return prompts_from_examples(data.eval, tokenizer)


def _adapter_template(adapter_dir: str | Path | None) -> str | None:
    from lorakit.adapters import TEMPLATE_FILE

    path = Path(adapter_dir) / TEMPLATE_FILE if adapter_dir else None
    return path.read_text(encoding="utf-8") if path is not None and path.is_file() else None
