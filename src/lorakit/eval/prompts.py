"""Generation prompts and their references: from a prompt file (rendered with the training chat template)
or derived from the eval split's token ids; the JSON schema answers are checked against.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.config import EvalConfig
from lorakit.errors import ConfigError, DataError
from lorakit.generate import encode_prompts, render_chat_prompt

EvalSettings = EvalConfig  # the run config's `eval` section (config.py documents every field)


def load_schema(schema: str | dict | None) -> dict[str, Any] | None:
    if schema is None or isinstance(schema, dict):
        return schema
    try:
        return json.loads(Path(schema).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"eval.schema {schema}: could not read a JSON schema ({e})") from None


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
            raise DataError(f"eval prompt row {i} has no 'reference' (nor a final assistant message); fields: {sorted(row)}")
        if messages:
            texts.append(render_chat_prompt(tokenizer, messages, chat_template))
        elif "prompt" in row:
            texts.append(row["prompt"])
        else:
            raise DataError(f"eval prompt row {i} has neither 'messages' nor 'prompt'; fields: {sorted(row)}")
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
