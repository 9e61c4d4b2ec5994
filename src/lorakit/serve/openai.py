"""OpenAI's wire format: the error shape (`ServeError`), request fields -> a validated `Plan`, and the
response and stream-chunk shapes. Pure functions of the body, the tokenizer and the settings; the
adapter lookup and the HTTP plumbing live in `app.py`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from lorakit.generate import GenerationConfig, encode_prompts, render_chat_prompt
from lorakit.serve.settings import ServeSettings

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_CHOICES = 64  # prompts × n in one request
MAX_STOP_STRINGS = 16

class ServeError(Exception):
    """A request the server refuses; `body()` is OpenAI's error shape, which every client parses."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, param=param)



@dataclass
class Plan:
    """A validated request: which adapter, which prompts (token ids), and how to sample."""

    kind: Literal["completion", "chat"]
    model: str
    adapter: Any  # the bank's Adapter, None = the base (typed Any: bank.py imports this module, not the reverse)
    prompts: list[list[int]]
    config: GenerationConfig
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


# Fields OpenAI defines that this server does not implement, with the value that means "off".
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "logit_bias": (None, {}), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"})}


def _number(body: dict, key: str, default: float, low: float, high: float | None = None,
            low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}]"
        raise bad_request(f"{key} must be a number in {span}, got {value!r}", key)
    return float(value)


def integer_field(body: dict, key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise bad_request(f"{key} must be an integer in [{low}, {high if high is not None else '∞'}], got {value!r}",
                          key)
    return value


def flag_field(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{key} must be true or false, got {value!r}", key)
    return bool(value)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
                          f"got {body.get('stop')!r}", "stop")
    return stop


def _refuse_unsupported(body: dict) -> None:
    for key, off in UNSUPPORTED.items():
        if key in body and body[key] not in off:
            raise bad_request(f"{key}={body[key]!r} is not supported by this server; leave it out", key)


def sampling_config(body: dict, settings: ServeSettings) -> tuple[GenerationConfig, int | None]:
    """GenerationConfig from OpenAI's fields (plus vLLM's top_k and repetition_penalty), and the
    max_tokens asked for (None = not given, filled in once the prompt length is known)."""
    _refuse_unsupported(body)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = integer_field(body, key, None, 1)
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise bad_request(f"{key}={max_tokens} is above this server's limit of {settings.max_tokens}; ask for fewer "
                          "tokens (or start the server with a higher --max-tokens)", key)
    top_k = integer_field(body, "top_k", 0, -1)
    config = GenerationConfig(
        max_new_tokens=max_tokens or 1,
        temperature=_number(body, "temperature", 1.0, 0.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # vLLM spells "off" as -1
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, low_open=True),
        stop=_stop_strings(body),
        seed=integer_field(body, "seed", None, 0, 2**63 - 1),
    )
    return config, max_tokens


def completion_prompts(body: dict, tokenizer: Any, vocab: int) -> list[list[int]]:
    """`prompt` as OpenAI allows it: a string, a list of strings, a token list, or a list of token lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise bad_request(f"prompt must be a string, a list of strings, or token ids; got {short_repr(prompt)}", "prompt")
    if any(isinstance(p, list) for p in prompts) and not all(isinstance(p, list) for p in prompts):
        raise bad_request("prompt mixes strings and token lists; send one kind", "prompt")
    if all(isinstance(p, list) for p in prompts):
        for p in prompts:
            if not p or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
                raise bad_request(f"token-id prompts must be non-empty lists of ids in [0, {vocab}); "
                                  f"got {short_repr(p)}", "prompt")
        return [list(p) for p in prompts]
    rows = encode_prompts(tokenizer, prompts)
    if not all(rows):
        raise bad_request("a prompt encodes to no tokens (an empty string?); give at least one word", "prompt")
    return rows


def chat_prompt(body: dict, tokenizer: Any, template: str | None) -> list[int]:
    """The conversation rendered with `template` (the adapter's saved chat template), else the tokenizer's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"messages must be a non-empty list of {{role, content}} objects; got {short_repr(messages)}",
                          "messages")
    plain = [_plain_message(m, i) for i, m in enumerate(messages)]
    try:
        text = render_chat_prompt(tokenizer, plain, template)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # noqa: BLE001 - jinja's raise_exception() in a template ("roles must alternate")
        raise bad_request(f"the chat template refused these messages: {e}", "messages") from None
    return encode_prompts(tokenizer, [text])[0]


def _plain_message(message: Any, i: int) -> dict[str, str]:
    """{role, content: str}; content parts of type text are joined, anything else refused."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad_request(f"messages[{i}] must be an object with a string role; got {short_repr(message)}", "messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad_request(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                              "messages")
        content = "".join(p["text"] for p in content)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad_request(f"messages[{i}].content must be a string or a list of text parts; got {short_repr(content)}",
                          "messages")
    return {"role": message["role"], "content": content}


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fit_max_tokens(plan: Plan, asked: int | None, settings: ServeSettings, context: int | None) -> None:
    """Check each prompt's length; fill in max_tokens when not given (the rest of the context, capped)."""
    longest = max(len(p) for p in plan.prompts)
    if longest > settings.max_prompt_tokens:
        raise bad_request(f"the prompt has {longest} tokens; this server accepts at most {settings.max_prompt_tokens} "
                          "(--max-prompt-tokens); shorten it", "messages" if plan.kind == "chat" else "prompt")
    default = DEFAULT_COMPLETION_TOKENS if plan.kind == "completion" else settings.max_tokens
    wanted = asked if asked is not None else default
    if context is not None and longest + wanted > context:
        if asked is not None or longest >= context:
            raise bad_request(f"This model's maximum context length is {context} tokens. However, you requested "
                              f"{longest + wanted} tokens ({longest} in the prompt, {wanted} for the completion). "
                              "Please reduce the length of the prompt or of max_tokens.", "max_tokens")
        wanted = context - longest
    plan.config.max_new_tokens = min(wanted, settings.max_tokens)



def response_choice(plan: Plan, index: int, text: str, finish: str | None) -> dict[str, Any]:
    if plan.kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def chunk_choice(plan: Plan, index: int, text: str, finish: str | None, role: bool = False) -> dict[str, Any]:
    if plan.kind == "chat":
        delta = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def usage(plan: Plan, completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(p) for p in plan.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def envelope(plan: Plan, rid: str, created: int, chunk: bool) -> dict[str, Any]:
    obj = {"chat": "chat.completion", "completion": "text_completion"}[plan.kind]
    return {"id": rid, "object": obj + (".chunk" if chunk and plan.kind == "chat" else ""), "created": created,
            "model": plan.model}



def sse_line(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


