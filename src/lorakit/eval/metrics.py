"""Scores of generated text and of class predictions: exact match, token F1, ROUGE-L, JSON validity and
schema compliance, label accuracy and macro F1, and `--fail-below` thresholds over them.

Every function here is pure (strings and numbers in, numbers out), tested against hand-worked examples.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from lorakit.errors import ConfigError

# Metrics where lower is better; every other metric is a rate in [0, 1] where higher is better.
LOWER_IS_BETTER = ("eval_loss", "perplexity", "canary_loss", "canary_perplexity")


RATE_METRICS = ("exact_match", "token_f1", "rouge_l", "json_valid", "schema_valid", "accuracy", "macro_f1", "judge_score")


ALL_METRICS = LOWER_IS_BETTER + RATE_METRICS


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
