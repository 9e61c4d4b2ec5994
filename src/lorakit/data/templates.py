"""Records -> token ids and labels, with loss only where the model must learn.

The mask is derived from the rendered text, never from one family's marker strings, so it works for
any chat template. For a conversation m_1..m_n, with render(·) the template and an assistant turn i:

    start_i = len(render(m_<i, add_generation_prompt=True))     where the reply begins
    end_i   = common prefix of render(m_≤i) and render(m_1..m_n)  where the turn (with its end token) ends

end_i is then moved back twice. (1) When the divergence falls inside a token, that token belongs to what
follows: Phi-3 closes a conversation with "<|endoftext|>" while the next turn opens with "<|user|>", so
the two renders agree on "<|" past the true end. (2) Trailing whitespace is dropped ("<|im_end|>\n"
-> "<|im_end|>"): the separator between turns is the template's, not the reply's.

Characters in [start_i, end_i) are supervised; a token is supervised when its characters overlap that
span (the tokenizer's offset mapping gives each token's characters) -- a token sticking out of the span
only when its part inside is more than whitespace (see `_learned`). The template's end-of-turn
token lies inside the span, so the model learns to stop. Completion and text rows get the tokenizer's
EOS appended and supervised; labels are built from spans, never by comparing ids with the pad id, so
the EOS stays supervised when pad == eos.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from lorakit.data.formats import DataError, Record

log = logging.getLogger(__name__)
IGNORE = -100
# Characters kept per token of max_seq_len before tokenizing. A token covers at least part of one character,
# so the first max_seq_len tokens lie far inside this budget (~4 characters per token in English); a 5 MB
# row is then never tokenized whole (offset mappings of millions of tokens: gigabytes).
CHARS_PER_TOKEN = 32

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% else %}{{ m['content'] + '\n\n' }}"
        "{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


@dataclass
class Example:
    """One tokenized example. input_ids and labels have the same length; labels are -100 where no loss."""

    input_ids: list[int]
    labels: list[int] | int  # an int class id for seq_cls
    origin: str = ""
    token_type_ids: list[int] | None = None  # seq_cls with a tokenizer that makes them (BERT: 0 = text, 1 = pair)

    def __len__(self) -> int:
        return len(self.input_ids)

    def supervised(self) -> int:
        return 1 if isinstance(self.labels, int) else sum(y != IGNORE for y in self.labels)


def resolve_template(tokenizer: Any, name: str | None) -> str:
    """The template to train with: a named built-in, else the tokenizer's own, else chatml (with a warning)."""
    if name is not None:
        if name not in BUILTIN_TEMPLATES:
            raise DataError(f"data.chat_template {name!r} is not a built-in template; choose one of "
                            f"{', '.join(BUILTIN_TEMPLATES)} or null for the tokenizer's own")
        if tokenizer.chat_template:
            log.warning("data.chat_template=%s overrides the tokenizer's own chat template", name)
        return BUILTIN_TEMPLATES[name]
    if tokenizer.chat_template:
        return tokenizer.chat_template
    log.warning("the tokenizer has no chat template; using the built-in chatml template "
                "(set data.chat_template to choose another: %s)", ", ".join(BUILTIN_TEMPLATES))
    return BUILTIN_TEMPLATES["chatml"]


def render(tokenizer: Any, messages: list[dict[str, str]], template: str, generation_prompt: bool, origin: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises TemplateError (e.g. "roles must alternate") or anything a template raises
        raise DataError(f"{origin}: the chat template rejected this conversation: {e}. Fix the row, or set "
                        f"data.chat_template to a built-in template that accepts it ({', '.join(BUILTIN_TEMPLATES)})") from None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chat_spans(tokenizer: Any, messages: list[dict[str, str]], template: str, origin: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, character spans of every assistant turn) -- see the module docstring."""
    full = render(tokenizer, messages, template, False, origin)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_starts = [s for s, _ in offsets]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], template, True, origin) if i else ""
        if not full.startswith(prompt):
            raise DataError(f"{origin}: the chat template renders turn {i} differently inside the whole conversation "
                            "than as a prefix, so the reply cannot be located; set data.chat_template to a built-in "
                            f"template ({', '.join(BUILTIN_TEMPLATES)})")
        through = render(tokenizer, messages[: i + 1], template, False, origin)
        start = len(prompt)
        spans.append((start, _turn_end(full, start, _common_prefix(through, full), offsets, token_starts)))
    return full, spans


def _turn_end(full: str, start: int, end: int, offsets: list[tuple[int, int]], token_starts: list[int]) -> int:
    """`end` moved back to the start of a token it cuts through, then past trailing whitespace."""
    k = bisect.bisect_left(token_starts, end) - 1  # the last token starting before `end`
    if k >= 0 and offsets[k][1] > end and token_starts[k] > start:
        end = token_starts[k]
    while end > start and full[end - 1].isspace():
        end -= 1
    return end


def tokenize_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]], train_on_all: bool) -> tuple[list[int], list[int]]:
    """Token ids of `text` and labels that keep the tokens inside or overlapping `spans` (see `_learned`)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_all:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        if any(_learned(text, s, e, a, b) for a, b in spans):
            labels[t] = ids[t]
    return ids, labels


def _learned(text: str, s: int, e: int, a: int, b: int) -> bool:
    """Token [s, e) carries loss for span [a, b) when it overlaps it -- and, when it sticks out, only if its part
    inside is more than whitespace: a special token with rstrip (Phi-3's <|assistant|>) swallows the reply's
    leading space, while SentencePiece's '▁Hello' starts on the prompt's space and is the reply's first word."""
    lo, hi = max(s, a), min(e, b)
    return lo < hi and ((a <= s and e <= b) or not text[lo:hi].isspace())


def clip_record(record: Record, max_chars: int) -> tuple[Record, bool]:
    """`record` with its text cut to `max_chars` characters in reading order, and whether anything was cut.

    What is cut lies beyond max_seq_len tokens and would be truncated anyway; the message list keeps its
    shape (later turns become empty), so the chat template renders it as before.
    NOTE: a tokenizer whose tokens average more than CHARS_PER_TOKEN characters could lose text it would
    have kept."""
    if record.format == "chat":
        left, messages, cut = max_chars, [], False
        for m in record.messages:
            content = m.get("content")
            if isinstance(content, str) and len(content) > left:
                m, cut = {**m, "content": content[:left]}, True
            left = max(0, left - len(m.get("content") or ""))
            messages.append(m)
        return (dataclasses.replace(record, messages=messages), True) if cut else (record, False)
    if len(record.prompt) + len(record.response) <= max_chars:
        return record, False
    prompt = record.prompt[:max_chars]
    return dataclasses.replace(record, prompt=prompt, response=record.response[:max_chars - len(prompt)]), True


def encode_record(record: Record, tokenizer: Any, template: str | None, train_on: str = "assistant") -> Example:
    """A Record as token ids with the loss mask of `train_on` (assistant | all)."""
    if record.label is not None:  # classification: the whole text in, one class out
        return encode_classification(record, tokenizer)
    if record.format == "chat":
        text, spans = chat_spans(tokenizer, record.messages, template, record.origin)
        ids, labels = tokenize_spans(tokenizer, text, spans, train_on == "all")
        return Example(ids, labels, record.origin)
    prompt = _bos(tokenizer) + tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    if record.format == "text":  # raw text: every token after BOS is learned
        return Example(prompt + response, [IGNORE] * len(prompt) + response, record.origin)
    labels = list(prompt) if train_on == "all" else [IGNORE] * len(prompt)
    return Example(prompt + response, labels + response, record.origin)


def encode_classification(record: Record, tokenizer: Any, max_len: int | None = None) -> Example:
    """A classification row framed by the tokenizer itself, no chat template: `[CLS] text [SEP]`, or
    `[CLS] text [SEP] text_pair [SEP]` with token_type_ids 0…0 1…1 for an encoder; BOS + text for a decoder.
    With `max_len` the tokenizer truncates (longest text first), keeping the closing [SEP]."""
    cut = {"truncation": "longest_first", "max_length": max_len} if max_len else {}
    enc = tokenizer(record.response, record.text_pair, **cut)
    types = enc.get("token_type_ids")
    return Example(list(enc["input_ids"]), record.label, record.origin, list(types) if types is not None else None)


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer starts its own encodings with it, so text and completion rows begin the way
    prompts will at inference. Asked by encoding, not by `add_bos_token`: Llama-3's post-processor adds
    <|begin_of_text|> while add_bos_token says False."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _eos(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so the model cannot learn where an answer ends; "
                        "set tokenizer.eos_token before training")
    return [tokenizer.eos_token_id]
