"""Every lorakit setting as a typed dataclass, with YAML load/dump and whole-config validation.

Why dataclasses with a `help` per field: the same text documents the YAML keys (`lorakit
config` lists them), and validation can name the exact key that is wrong. Validation collects *every*
problem before anything heavy (weights, data) is loaded, so a user fixes a config in one pass.

Types are strict, from each field's annotation: a bool is `true`/`false` (not "false" in quotes, not
"maybe"), an int is not 1.5 or "8", a list is a list. A mistyped value is reported and then stands in
as its default, so the range checks of every other key still run and every problem comes out at once.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from lorakit.errors import ConfigError

TARGET_PRESETS: dict[str, tuple[str, ...] | None] = {
    "minimal": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": None,  # every linear layer except the output head(s)
}




class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (plain YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d+\.\d*|\.\d+)$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class LoraConfig:
    """Low-rank adapter settings: y = base(x) + scaling · dropout(x) Aᵀ Bᵀ."""

    r: int = _help("Rank of the update (A: r×in, B: out×r).", default=16)
    alpha: float = _help("Scale numerator: scaling = alpha/r (or alpha/sqrt(r) with use_rslora).", default=32.0)
    dropout: float = _help("Dropout on the LoRA input path only, in [0, 1).", default=0.05)
    target_modules: str | list[str] = _help(
        "Which linear layers get adapters: a preset (minimal | attention | all-linear), a list of "
        "module-name suffixes, or a regex matched against the full module name.",
        default="all-linear",
    )
    use_rslora: bool = _help("Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r.", default=False)
    use_dora: bool = _help(
        "DoRA (weight-decomposed LoRA, PEFT's use_dora): a trainable magnitude per output row times the "
        "direction of W + scaling·BA; on LoRA and QLoRA (QDoRA) bases.",
        default=False,
    )
    init: str = _help(
        "Initialization: kaiming | gaussian (random A, B = 0, so training starts at the base model); "
        "pissa | pissa_niter_N (A, B from the top-r singular vectors of W, W reduced by scaling·BA; with "
        "_niter_N a randomized SVD of N iterations, much faster on big layers); olora (A, B from a QR of W, W "
        "reduced); loftq (qlora only: alternate NF4 quantization of W − scaling·BA and a rank-r SVD of the "
        "residual, so that the 4-bit base plus the adapter is closer to W).",
        default="kaiming",
    )
    loftq_iter: int = _help("LoftQ alternations (quantize, then SVD of the residual) for init: loftq.", default=1)
    save_converted: bool = _help(
        "For init: pissa | olora, save the adapter converted to plain LoRA of rank 2r that applies to the "
        "original base (PEFT's path_initial_model_for_weight_conversion); false = save the trained factors, "
        "which apply only to the reduced base W − scaling·B₀A₀.",
        default=True,
    )
    bias: Literal["none"] = _help("Bias training; only 'none' (base biases stay frozen).", default="none")
    modules_to_save: list[str] | None = _help(
        "Modules trained in full and saved with the adapter. null = the classification head for task seq_cls "
        "(score / classifier, and a pooler where the model has one: what PEFT's task_type=SEQ_CLS trains), "
        "none for causal_lm; a list = exactly these modules (name-suffixes); [] = none.",
        default=None,
    )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def problems(self, prefix: str = "lora") -> list[str]:
        out = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            out.append(f"{prefix}.r must be an integer >= 1, got {self.r!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            out.append(f"{prefix}.alpha must be a number > 0, got {self.alpha!r} (a common choice is 2*r)")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            out.append(f"{prefix}.dropout must be in [0, 1), got {self.dropout!r}")
        out += _target_problems(self.target_modules, f"{prefix}.target_modules")
        out += _init_problems(self, prefix)
        out += _choice_problems(self, prefix, ("bias",))
        save = self.modules_to_save
        if save is not None and (not isinstance(save, list) or not all(isinstance(m, str) and m for m in save)):
            out.append(f"{prefix}.modules_to_save must be a list of module names or null (the task's default), got {save!r}")
        return out


LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq")
WEIGHT_INITS = ("pissa", "olora", "loftq")  # inits computed from the base weight (which they change)


def init_kind(init: str) -> str:
    """'pissa' for pissa_niter_N, else `init` itself."""
    return "pissa" if isinstance(init, str) and init.startswith("pissa") else init


def _init_problems(config: LoraConfig, prefix: str) -> list[str]:
    init, out = config.init, []
    niter = init.removeprefix("pissa_niter_") if isinstance(init, str) and init.startswith("pissa_niter_") else None
    if niter is not None and not (niter.isdigit() and int(niter) >= 1):
        out.append(f"{prefix}.init {init!r}: the N of pissa_niter_N must be an integer >= 1 (e.g. pissa_niter_4)")
    elif niter is None and init not in LORA_INITS:
        out.append(f"{prefix}.init must be one of {', '.join(LORA_INITS)}; got {init!r}")
    if not isinstance(config.loftq_iter, int) or isinstance(config.loftq_iter, bool) or config.loftq_iter < 1:
        out.append(f"{prefix}.loftq_iter must be an integer >= 1 (1 is PEFT's default), got {config.loftq_iter!r}")
    for key in ("use_dora", "save_converted"):
        if not isinstance(getattr(config, key), bool):
            out.append(f"{prefix}.{key} must be true or false, got {getattr(config, key)!r}")
    return out


@dataclass
class QuantConfig:
    """4-bit NormalFloat storage of frozen base weights (QLoRA)."""

    type: Literal["nf4"] = _help("Quantization type; NF4 is the QLoRA data type.", default="nf4")
    blocksize: int = _help("Weights per absmax scale (64 in QLoRA and bitsandbytes).", default=64)
    double_quant: bool = _help(
        "Quantize the absmax scales to 8 bits in blocks of 256 (saves ~0.37 bit/param).", default=True
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "dtype the 4-bit weight is decoded to for its matmuls; auto = bf16 on CUDA and on CPUs with AVX512-BF16/AMX, "
        "else train.dtype.",
        default="auto",
    )
    skip_modules: list[str] = _help(
        "Linear layers kept in full precision (suffixes): output and classifier heads by default.",
        default_factory=lambda: ["lm_head", "score", "classifier"],
    )

    def problems(self, prefix: str = "quant") -> list[str]:
        out = _choice_problems(self, prefix, ("type", "compute_dtype"))
        if not isinstance(self.blocksize, int) or self.blocksize < 2 or self.blocksize % 2:
            out.append(f"{prefix}.blocksize must be an even integer >= 2, got {self.blocksize!r} (64 is standard)")
        if not isinstance(self.skip_modules, list):
            out.append(f"{prefix}.skip_modules must be a list of module-name suffixes, got {self.skip_modules!r}")
        return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _target_problems(targets: Any, key: str) -> list[str]:
    if isinstance(targets, str):
        if targets in TARGET_PRESETS:
            return []
        try:
            re.compile(targets)
        except re.error as e:
            return [f"{key} {targets!r} is neither a preset ({', '.join(TARGET_PRESETS)}) nor a valid regex: {e}"]
        return []
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
        return []
    return [
        f"{key} must be a preset ({', '.join(TARGET_PRESETS)}), a non-empty list of module-name "
        f"suffixes, or a regex; got {targets!r}"
    ]


def _choice_problems(obj: Any, prefix: str, names: tuple[str, ...]) -> list[str]:
    """Check Literal-typed fields against their allowed values."""
    hints = get_type_hints(type(obj))
    out = []
    for name in names:
        allowed = get_args(hints[name])
        value = getattr(obj, name)
        if get_origin(hints[name]) is Literal and value not in allowed:
            out.append(f"{prefix}.{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return out


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a dict, recording unknown keys (with a close match) as problems."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            problems.append(f"unknown key {prefix}{key}{hint}")
            continue
        sub = _nested_dataclass(cls, key)
        if sub is not None and (isinstance(value, dict) or value is None):
            value = from_dict(sub, value, f"{prefix}{key}.", problems)
        kwargs[key] = value
    return cls(**kwargs)


def _nested_dataclass(cls: type, name: str) -> type | None:
    hint = get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field, recursing into nested sections."""
    rows = []
    for f in dataclasses.fields(cls):
        sub = _nested_dataclass(cls, f.name)
        if sub is not None:
            rows += field_help(sub, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r} must look like key.sub=value (e.g. train.lr=1e-4)"])
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key.strip()}={raw}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                           f"close the brackets or quotes (a list: --set 'lora.target_modules=[q_proj, v_proj]'), "
                           f"or quote the whole value as a string"]) from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply every `key.sub=value`; raises one ConfigError naming every override that cannot be parsed."""
    problems = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as e:
            problems += e.problems
            continue
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    if problems:
        raise ConfigError(problems, source="the --set overrides")
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist (pass the path to a YAML run config)"])
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({getattr(e, 'problem', e)})"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    if data is None:
        raise ConfigError([f"{path} is empty (or only comments); write the run's keys in it (at least base_model "
                           "and data.train; `lorakit config` lists every key), or run `lorakit train` without a "
                           "file for the built-in demo"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    return data


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), encoding="utf-8")


@dataclass
class GenerationConfig:
    """How new tokens are chosen; the defaults are greedy decoding (reproducible evals)."""

    max_new_tokens: int = _help("New tokens at most per answer.", default=64)
    temperature: float = _help("0 = greedy; otherwise softmax temperature.", default=0.0)
    top_p: float = _help("Nucleus sampling mass in (0, 1]; 1 = off.", default=1.0)
    top_k: int = _help("Sample among the k most likely tokens; 0 = off.", default=0)
    repetition_penalty: float = _help("CTRL repetition penalty; 1 = off.", default=1.0)
    stop: list[str] = _help("Strings that end an answer (cut from the text).", default_factory=list)
    seed: int | None = _help("Sampling seed (reproducible sampling); null = unseeded.", default=None)

    def problems(self, prefix: str = "generation") -> list[str]:
        """prefix "--" names command-line flags (--max-new-tokens) instead of keys (generation.max_new_tokens)."""
        def key(name: str) -> str:
            return f"--{name.replace('_', '-')}" if prefix == "--" else f"{prefix}.{name}"

        out = []
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            out.append(f"{key('max_new_tokens')} must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            out.append(f"{key('temperature')} must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            out.append(f"{key('top_p')} must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            out.append(f"{key('top_k')} must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            out.append(f"{key('repetition_penalty')} must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            out.append(f"{key('stop')} must be a list of non-empty strings, got {self.stop!r}")
        return out


# Metrics a run can select on (eval/metrics.py computes them; tests keep the two lists in step).
LOWER_IS_BETTER_METRICS = ("eval_loss", "perplexity", "canary_loss", "canary_change")
EVERY_EVAL_METRICS = ("exact_match", "token_f1", "rouge_l", "json_valid", "schema_valid", "accuracy", "macro_f1",
                      "judge_score")
SELECTABLE_METRICS = ("eval_loss", *EVERY_EVAL_METRICS, "canary_loss")


DEFAULT_RUBRIC = (
    "Score how well the answer matches the reference answer for the prompt: correctness first, then "
    "completeness and format. {scale} = equivalent to the reference, 1 = wrong or unusable."
)


@dataclass
class JudgeConfig:
    """LLM-as-judge: any OpenAI-compatible chat endpoint scores each answer against its reference."""

    base_url: str | None = _help(
        "OpenAI-compatible endpoint (https://api.openai.com/v1, a vLLM server, `lorakit serve`: "
        "http://127.0.0.1:8000/v1); null = no judge.", default=None)
    model: str = _help("Model name sent to the endpoint.", default="")
    api_key_env: str | None = _help("Environment variable holding the API key (never the key itself); null = none.",
                                    default=None)
    rubric: str = _help("What a good answer is; {scale} is replaced by the top score.", default=DEFAULT_RUBRIC)
    scale: int = _help("Scores run from 1 to this; judge_score = (score - 1) / (scale - 1), in [0, 1].", default=5)
    timeout_s: float = _help("Seconds per request before it is retried.", default=60.0)
    max_retries: int = _help("Retries of a failed request (timeouts, 429, 5xx), with exponential backoff.", default=3)
    during_training: bool = _help("Also judge the during-training prompts at every eval (eval.every_eval).",
                                  default=True)

    def problems(self, prefix: str = "eval.judge") -> list[str]:
        if self.base_url is None:
            return []
        out = []
        if not isinstance(self.base_url, str) or not re.match(r"https?://", self.base_url):
            out.append(f"{prefix}.base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model:
            out.append(f"{prefix}.model must name the judge model on that endpoint, got {self.model!r}")
        if self.api_key_env is not None and not (isinstance(self.api_key_env, str) and self.api_key_env):
            out.append(f"{prefix}.api_key_env must name an environment variable or be null, got {self.api_key_env!r}")
        if not isinstance(self.rubric, str) or not self.rubric.strip():
            out.append(f"{prefix}.rubric must be a non-empty text, got {self.rubric!r}")
        if not isinstance(self.scale, int) or isinstance(self.scale, bool) or self.scale < 2:
            out.append(f"{prefix}.scale must be an integer >= 2 (scores 1..scale), got {self.scale!r}")
        if not _is_number(self.timeout_s) or self.timeout_s <= 0:
            out.append(f"{prefix}.timeout_s must be a number > 0, got {self.timeout_s!r}")
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            out.append(f"{prefix}.max_retries must be an integer >= 0, got {self.max_retries!r}")
        return out


@dataclass
class EvalConfig:
    """`lorakit eval` and the eval at the end of training: what is measured beyond the loss."""

    generation: GenerationConfig = _help(
        "Sampling for generation metrics (greedy by default): max_new_tokens, temperature, top_p, top_k, "
        "repetition_penalty, stop.",
        default_factory=lambda: GenerationConfig(max_new_tokens=64),
    )
    prompts: str | None = _help(
        'JSONL of {"messages": [...]} or {"prompt": "..."} rows with a "reference" (and optional "label"); '
        "null = the eval split, prompted up to its first supervised token.",
        default=None,
    )
    max_prompts: int = _help("Prompts generated for (the first N); generation is the slow part.", default=200)
    schema: str | dict | None = _help("JSON schema (path or mapping) the outputs must satisfy; null = none.", default=None)
    label_key: str | None = _help("JSON key holding the class in outputs and references (accuracy, macro F1).", default=None)
    canary: str | None = _help(
        'Forgetting canary: "builtin", a JSONL of open {"prompt", "completion"} rows and/or multiple-choice '
        '{"prompt", "options", "answer"} rows (scored by option likelihood: canary_accuracy), or null = off.',
        default="builtin"
    )
    canary_max_increase: float = _help("Flag forgetting when canary perplexity rises by more than this share.", default=0.10)
    batch_size: int = _help("Rows per generation / loss batch.", default=16)
    samples: int = _help("Example generations shown in the report (base and tuned side by side).", default=3)
    at_end: bool = _help("Run this eval (base vs tuned) when training ends, writing <output_dir>/eval/.", default=True)
    every_eval: bool | list[str] = _help(
        "At each periodic eval during training, besides the eval loss: generate for a fixed seeded subset of "
        "eval prompts and score the task's metrics (true = every metric the task produces, or a list such as "
        "[exact_match, json_valid]) and measure the forgetting canary; logged to metrics.jsonl and loss.png.",
        default=False)
    during_training_prompts: int = _help(
        "Prompts generated for at each eval when every_eval is on (a fixed seeded subset; bounds the time).",
        default=64)
    judge: JudgeConfig = _help(
        "LLM-as-judge (judge_score): base_url, model, api_key_env, rubric, scale; base_url null = off.",
        default_factory=JudgeConfig)

    def problems(self, prefix: str = "eval") -> list[str]:
        out = self.generation.problems(f"{prefix}.generation")
        out += self.judge.problems(f"{prefix}.judge") if isinstance(self.judge, JudgeConfig) else [
            f"{prefix}.judge must be a mapping {{base_url, model, api_key_env, rubric, scale}}, got {self.judge!r}"]
        every = self.every_eval
        if not isinstance(every, bool) and not (isinstance(every, list) and every and all(isinstance(m, str) for m in every)):
            out.append(f"{prefix}.every_eval must be true, false or a non-empty list of metric names, got {every!r}")
        elif isinstance(every, list):
            out += [f"{prefix}.every_eval: unknown metric {m!r}; choose from {', '.join(EVERY_EVAL_METRICS)}"
                    for m in every if m not in EVERY_EVAL_METRICS]
        if not isinstance(self.during_training_prompts, int) or isinstance(self.during_training_prompts, bool) \
                or self.during_training_prompts < 1:
            out.append(f"{prefix}.during_training_prompts must be an integer >= 1, got {self.during_training_prompts!r}")
        for key in ("max_prompts", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                out.append(f"{prefix}.{key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.canary_max_increase, (int, float)) or self.canary_max_increase < 0:
            out.append(f"{prefix}.canary_max_increase must be >= 0 (0.1 = +10% perplexity), got {self.canary_max_increase!r}")
        for key in ("prompts", "canary"):
            value = getattr(self, key)
            if value not in (None, "builtin") and not Path(value).is_file():
                out.append(f"{prefix}.{key} file {value} does not exist (a JSONL path{', builtin' if key == 'canary' else ''} or null)")
        return out


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids."""

    train: str | None = _help(
        "Training data: a .jsonl/.json/.csv/.parquet file, a directory of them, or a datasets hub id. "
        "null = the built-in synthetic demo task.",
        default=None,
    )
    eval: str | None = _help("Separate eval data (same forms as train); null = split eval_fraction off train.", default=None)
    eval_fraction: float = _help("Share of train held out for eval by a stable hash split, in [0, 0.5].", default=0.05)
    format: Literal["auto", "alpaca", "chat", "completion", "text"] = _help(
        "Row format: alpaca (instruction/input/output), chat (messages), completion (prompt/completion), "
        "text (raw text); auto detects it from the fields.",
        default="auto",
    )
    chat_template: str | None = _help(
        "Named built-in template (chatml, llama-3, mistral, alpaca); null = the tokenizer's own.", default=None
    )
    train_on: Literal["assistant", "all"] = _help(
        "Which tokens carry loss: the assistant turns (with their end token) or everything.", default="assistant"
    )
    max_seq_len: int = _help("Tokens per example (or per packed row); longer examples are truncated.", default=1024)
    truncation: Literal["truncate", "drop"] = _help("What to do with examples over max_seq_len.", default="truncate")
    packing: bool = _help(
        "Pack several examples per row; attention never crosses examples and positions restart.", default=True
    )
    dedup: bool = _help("Remove exact and near-duplicate examples before splitting.", default=True)
    seed: int = _help("Seed of the hash split (an example keeps its side when rows are appended).", default=0)

    def problems(self, prefix: str = "data") -> list[str]:
        out = _choice_problems(self, prefix, ("format", "train_on", "truncation"))
        if not _is_number(self.eval_fraction) or not 0 <= self.eval_fraction <= 0.5:
            out.append(f"{prefix}.eval_fraction must be in [0, 0.5], got {self.eval_fraction!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 8:
            out.append(f"{prefix}.max_seq_len must be an integer >= 8, got {self.max_seq_len!r}")
        for key in ("train", "eval"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                out.append(f"{prefix}.{key} must be a path or hub id, got {value!r}")
        return out


@dataclass
class SelectConfig:
    """Which eval's weights become adapter/: the best `metric` among evals whose canary rose at most `max_forgetting`."""

    metric: str | None = _help(
        "Metric that picks the saved adapter and drives early stopping: eval_loss, exact_match, token_f1, rouge_l, "
        "json_valid, schema_valid, accuracy, macro_f1, judge_score, canary_loss. null = off: adapter/ holds the "
        "last weights (or, with early_stopping_patience, the lowest eval loss).", default=None)
    mode: Literal["auto", "max", "min"] = _help(
        "max or min; auto = min for losses, max for the rates.", default="auto")
    max_forgetting: float | None = _help(
        "Largest canary perplexity rise over the base (0.10 = +10%) an eval may show and still be chosen; "
        "null = no limit. Needs the canary measured during training (eval.every_eval).", default=0.10)

    def problems(self, prefix: str = "train.select_best") -> list[str]:
        out = _choice_problems(self, prefix, ("mode",))
        if self.metric is not None and self.metric not in SELECTABLE_METRICS:
            out.append(f"{prefix}.metric must be one of {', '.join(SELECTABLE_METRICS)} or null; got {self.metric!r}")
        elif self.metric is not None and self.mode != "auto":
            natural = "min" if self.metric in LOWER_IS_BETTER_METRICS else "max"
            if self.mode != natural:
                out.append(f"{prefix}.mode {self.mode} contradicts {self.metric} ({'lower' if natural == 'min' else 'higher'} "
                           f"is better); use mode: {natural} or auto")
        if self.max_forgetting is not None and (not _is_number(self.max_forgetting) or self.max_forgetting < 0):
            out.append(f"{prefix}.max_forgetting must be >= 0 (0.10 = +10% canary perplexity) or null, "
                       f"got {self.max_forgetting!r}")
        return out

    @property
    def direction(self) -> Literal["max", "min"]:
        if self.mode != "auto":
            return self.mode
        return "min" if (self.metric or "eval_loss") in LOWER_IS_BETTER_METRICS else "max"


@dataclass
class TrainConfig:
    """The optimization loop."""

    epochs: float = _help("Passes over the training data (ignored when max_steps is set).", default=3)
    max_steps: int | None = _help("Optimizer steps to run; overrides epochs.", default=None)
    micro_batch_size: int = _help(
        "Rows per forward/backward on each process. Global batch = micro_batch_size × grad_accum × world size "
        "(processes under torchrun; 1 otherwise) rows per optimizer step, printed at start.", default=4)
    grad_accum: int = _help(
        "Micro-batches per optimizer step on each process (loss weighted by supervised tokens); "
        "global batch = micro_batch_size × grad_accum × world size.", default=4)
    lr: float = _help("Peak learning rate (LoRA 5e-5–2e-4, QLoRA 1e-4–3e-4, full 1e-5–5e-5).", default=2e-4)
    lora_plus_ratio: float | None = _help("LoRA+: learning rate of B = lr × this ratio (e.g. 16); null = off.", default=None)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = _help(
        "AdamW (torch); the 8-bit variants need CUDA and bitsandbytes.", default="adamw"
    )
    scheduler: Literal["cosine", "linear", "constant"] = _help("Learning-rate decay after warmup.", default="cosine")
    warmup_ratio: float = _help("Warmup as a share of total steps (used when warmup_steps is null).", default=0.03)
    warmup_steps: int | None = _help("Warmup in steps; overrides warmup_ratio.", default=None)
    max_grad_norm: float | None = _help("Clip the global gradient norm to this; null = no clipping.", default=1.0)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", default=True)
    log_every: int = _help("Optimizer steps between metrics lines.", default=10)
    eval_every: int | None = _help("Optimizer steps between evals (also at each epoch end); null = epoch ends only.", default=100)
    save_every: int | None = _help("Optimizer steps between checkpoints; null = only at the end.", default=100)
    keep_checkpoints: int = _help("Checkpoints kept (oldest deleted first).", default=3)
    early_stopping_patience: int | None = _help(
        "Stop after this many evals without improvement of train.select_best.metric (default: eval loss) and "
        "keep the best adapter; null = off.", default=None
    )
    select_best: SelectConfig = _help(
        "Checkpoint selection: {metric, mode, max_forgetting}; the chosen eval's weights become adapter/, the "
        "last ones adapter-last/.", default_factory=SelectConfig)
    seed: int = _help("Seed for initialization, dropout and data order.", default=42)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Compute dtype; auto = bf16 on CUDA, fp32 on CPU (bf16 matmul is ~100x slower on most CPUs).", default="auto"
    )
    device: str = _help("auto | cpu | cuda | cuda:N | mps; under torchrun each process takes cuda:LOCAL_RANK.", default="auto")
    report_to: list[str] = _help(
        "Also send the metrics.jsonl scalars to: tensorboard (event files in <output_dir>/tensorboard), mlflow "
        "(a local file store, <output_dir>/mlruns), wandb (offline unless WANDB_MODE says otherwise, "
        "<output_dir>/wandb); any subset, [] = none.", default_factory=list)
    parallel: Literal["ddp", "fsdp"] = _help(
        "Multi-process strategy under torchrun / --nproc: ddp (every GPU holds the whole model) or fsdp "
        "(FSDP2: weights, 4-bit codes, gradients and optimizer state sharded, for a model that does not fit one "
        "device). Same losses either way; ignored in a single process.", default="ddp")

    def problems(self, prefix: str = "train") -> list[str]:
        out = _choice_problems(self, prefix, ("optimizer", "scheduler", "dtype", "parallel"))
        out += self.select_best.problems(f"{prefix}.select_best") if isinstance(self.select_best, SelectConfig) else [
            f"{prefix}.select_best must be a mapping such as {{metric: exact_match, max_forgetting: 0.1}}, "
            f"got {self.select_best!r}"]
        positive_ints = ("micro_batch_size", "grad_accum", "log_every", "keep_checkpoints")
        for key in positive_ints:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{prefix}.{key} must be an integer >= 1, got {value!r}")
        for key in ("max_steps", "eval_every", "save_every", "warmup_steps", "early_stopping_patience"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "warmup_steps" else 1)):
                out.append(f"{prefix}.{key} must be a positive integer or null, got {value!r}")
        if not _is_number(self.lr) or self.lr <= 0:
            out.append(f"{prefix}.lr must be a number > 0, got {self.lr!r}")
        if not _is_number(self.epochs) or self.epochs <= 0:
            out.append(f"{prefix}.epochs must be > 0, got {self.epochs!r}")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            out.append(f"{prefix}.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            out.append(f"{prefix}.max_grad_norm must be > 0 or null, got {self.max_grad_norm!r}")
        if self.lora_plus_ratio is not None and (not _is_number(self.lora_plus_ratio) or self.lora_plus_ratio <= 0):
            out.append(f"{prefix}.lora_plus_ratio must be > 0 or null, got {self.lora_plus_ratio!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            out.append(f"{prefix}.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            out.append(f"{prefix}.device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        return out + _report_to_problems(self.report_to, f"{prefix}.report_to")


# train.report_to names -> (module imported, what to install): each tracker is an optional dependency
REPORTERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or mlflow)"),
    "wandb": ("wandb", "pip install wandb"),
}


def _report_to_problems(names: Any, key: str) -> list[str]:
    """Unknown names and trackers that are not installed, found before any weight loads."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return [f"{key} must be a list of tracker names ({', '.join(REPORTERS)}), got {names!r}"]
    out = []
    for name in names:
        if name not in REPORTERS:
            out.append(f"{key}: unknown tracker {name!r}; choose from {', '.join(REPORTERS)}")
        elif importlib.util.find_spec(REPORTERS[name][0]) is None:
            out.append(f"{key}: {name} is not installed: {REPORTERS[name][1]}, or pip install 'lorakit[loggers]' "
                       f"for all three (or remove {name} from {key})")
    return out


EVAL_BATCH_TOKENS = 4096  # tokens per eval-loss forward at most (RunConfig.eval_batch_rows)


@dataclass
class RunConfig:
    """One fine-tuning run: what to tune, how, on what data, and where the results go."""

    base_model: str = _help(
        "Hub id or local directory of a transformers model; 'demo' = the built-in tiny Llama.", default="demo"
    )
    revision: str | None = _help("Hub revision (branch, tag or commit) of base_model.", default=None)
    task: Literal["causal_lm", "seq_cls"] = _help("causal_lm (generation) or seq_cls (classification head).", default="causal_lm")
    num_labels: int | None = _help("Classes for seq_cls (read from the data when null).", default=None)
    method: Literal["lora", "qlora", "full"] = _help("lora, qlora (4-bit NF4 base + LoRA) or full fine-tuning.", default="lora")
    lora: LoraConfig = _help("LoRA settings (ignored for method: full).", default_factory=LoraConfig)
    quant: QuantConfig = _help("Quantization settings (used for method: qlora).", default_factory=QuantConfig)
    data: DataConfig = _help("Data settings.", default_factory=DataConfig)
    train: TrainConfig = _help("Training-loop settings.", default_factory=TrainConfig)
    eval: EvalConfig = _help("Evaluation settings (lorakit eval, and at the end of training).", default_factory=EvalConfig)
    output_dir: str = _help("Run directory: adapter/, checkpoints/, metrics.jsonl, loss.png, summary.json.", default="runs/run")

    def eval_batch_rows(self) -> int:
        """Rows per eval-loss forward (training's periodic eval, `lorakit eval`): eval.batch_size, but at most
        EVAL_BATCH_TOKENS tokens of max_seq_len rows and never fewer than train.micro_batch_size. A no-grad
        forward holds one layer's activations at a time: at 4096 tokens an 8B MLP's (4096, 14336) fp32
        intermediate is 0.22 GiB, so the eval stays below the training step's peak."""
        by_tokens = EVAL_BATCH_TOKENS // self.data.max_seq_len
        return max(self.train.micro_batch_size, min(self.eval.batch_size, by_tokens))

    def problems(self) -> list[str]:
        out = _choice_problems(self, "", ("task", "method"))
        out = [p.lstrip(".") for p in out]
        if not isinstance(self.base_model, str) or not self.base_model:
            out.append(f"base_model must be a hub id or a local directory, got {self.base_model!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            out.append(f"output_dir must be a directory path, got {self.output_dir!r}")
        out += self.lora.problems() + self.quant.problems() + self.data.problems() + self.train.problems()
        out += _method_problems(self)
        out += self.eval.problems()
        if isinstance(self.train.select_best, SelectConfig) and isinstance(self.eval.judge, JudgeConfig):
            out += self._selection_problems()
        return out

    def _selection_problems(self) -> list[str]:
        """Metrics this run cannot produce, named before any weight loads. (Whether the outputs carry labels
        or a schema is checked when training starts: the built-in task fills those settings in later.)"""
        every, metric = self.eval.every_eval, self.train.select_best.metric
        asked = [m for m in ([metric] if metric else []) + (every if isinstance(every, list) else [])
                 if m in SELECTABLE_METRICS]
        out = []
        if self.task == "seq_cls":
            out += [f"{m} is not produced by task seq_cls (a classifier head generates no text); choose from "
                    f"eval_loss, accuracy, macro_f1" for m in dict.fromkeys(asked) if m not in ("eval_loss", "accuracy", "macro_f1")]
        if "judge_score" in asked and self.eval.judge.base_url is None:
            out.append("judge_score needs a judge: set eval.judge.base_url and eval.judge.model (any OpenAI-compatible "
                       "endpoint, e.g. `lorakit serve`)")
        elif "judge_score" in asked and not self.eval.judge.during_training:
            out.append("judge_score is measured during training only with eval.judge.during_training: true")
        if metric not in (None, "eval_loss") and every is False:
            out.append(f"train.select_best.metric {metric} is measured during training only with eval.every_eval: true "
                       f"(or a list naming it)")
        elif metric in EVERY_EVAL_METRICS and isinstance(every, list) and metric not in every:
            out.append(f"train.select_best.metric {metric} is not in eval.every_eval {every}; add it to the list")
        if metric == "canary_loss" and self.eval.canary is None:
            out.append("train.select_best.metric canary_loss needs eval.canary (builtin or a file), got null")
        if metric == "eval_loss" and self.data.train is not None and self.data.eval is None and self.data.eval_fraction == 0:
            out.append("train.select_best.metric eval_loss needs eval data: set data.eval or data.eval_fraction > 0")
        return out


def _method_problems(config: RunConfig) -> list[str]:
    """Settings that only some methods accept (checked before any weight loads)."""
    out, lora = [], config.lora
    if lora.init == "loftq" and config.method != "qlora":
        out.append(f"lora.init: loftq needs method: qlora (LoftQ fits the adapter to the 4-bit quantization error "
                   f"of the base), got method: {config.method}; use method: qlora, or init: pissa for a "
                   "full-precision base")
    if config.method == "full" and (lora.use_dora or init_kind(lora.init) in WEIGHT_INITS):
        out.append(f"lora.use_dora / lora.init: {lora.init} configure adapters, but method: full trains every "
                   "weight without one; use method: lora or qlora")
    return out


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or start from defaults), apply `key.sub=value` overrides, validate everything."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    problems: list[str] = []
    config = from_dict(RunConfig, data, "", problems)
    checked = copy.deepcopy(config)
    problems += type_problems(checked)  # and resets each mistyped value to its default, so that...
    problems += checked.problems()  # ...the range checks run on every key without tripping on a type
    if problems:
        raise ConfigError(problems, source=str(path) if path else None)
    return config


def type_problems(obj: Any, prefix: str = "") -> list[str]:
    """Every field of dataclass `obj` (recursively) whose value does not match its annotation; each such
    field is reset to its default in place. Literal choices are left to `_choice_problems`."""
    out = []
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value, key = hints[f.name], getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint) and isinstance(value, hint):
            out += type_problems(value, f"{key}.")
            continue
        expected = _expected(hint, value)
        if expected is None:
            continue
        out.append(f"{key} must be {expected}, got {value!r}{_quoted_hint(value, hint)}")
        setattr(obj, f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
    return out


def _expected(hint: Any, value: Any) -> str | None:
    """None when `value` fits `hint`; else what was expected, in words."""
    arms = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    words = []
    for arm in arms:
        ok, word = _fits(arm, value)
        if ok:
            return None
        words.append(word)
    return " or ".join(words)


def _fits(hint: Any, value: Any) -> tuple[bool, str]:
    if hint is type(None):
        return value is None, "null"
    if get_origin(hint) is Literal:
        return True, ""  # checked with the allowed values by _choice_problems
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if hint is str:
        return isinstance(value, str), "a string"
    if hint is dict:
        return isinstance(value, dict), "a mapping"
    if get_origin(hint) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint), f"a mapping of {hint.__name__} keys"
    return True, ""


def _quoted_hint(value: Any, hint: Any) -> str:
    """A bool or number written in quotes in YAML arrives as a string: say so."""
    if not isinstance(value, str):
        return ""
    if value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return " (a string: write true or false without quotes)"
    try:
        float(value)
    except ValueError:
        return ""
    return " (a string: write the number without quotes)"
