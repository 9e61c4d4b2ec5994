"""The loss mask: exactly each assistant reply plus its end-of-turn token, for five families' chat templates."""

from __future__ import annotations

import pytest
from families import FAMILIES, family_tokenizer, supervised_runs

from lorakit.data import BUILTIN_TEMPLATES, IGNORE, DataError, encode_record
from lorakit.data.formats import Record
from lorakit.data.templates import chat_spans

CONVERSATION = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "And the cat?"},
    {"role": "assistant", "content": "The cat sat on the mat.\nIt was very happy: ✓ {\"json\": true}"},
]
SYSTEM = {"role": "system", "content": "Answer in one line."}


def chat(messages: list[dict[str, str]]) -> Record:
    return Record("chat", "data.jsonl:7", messages=messages)


def expected_replies(name: str, messages: list[dict[str, str]]) -> list[str]:
    """What the mask must cover: every reply as the template renders it, then the family's end token."""
    fam = FAMILIES[name]
    replies = [m["content"].strip() if fam.trims else m["content"] for m in messages if m["role"] == "assistant"]
    out = [reply + fam.end for reply in replies]
    if messages[-1]["role"] == "assistant":
        out[-1] += fam.closing
    return out


def assert_labels_consistent(ids: list[int], labels: list[int]) -> None:
    assert len(ids) == len(labels)
    assert all(y in (IGNORE, t) for t, y in zip(ids, labels, strict=True))


@pytest.mark.parametrize(("name", "with_system"),  # Mistral and Gemma refuse a system message (tested below)
                         [(name, s) for name in FAMILIES for s in (False, True) if FAMILIES[name].system or not s])
def test_mask_is_exactly_each_reply_and_its_end_token(name: str, with_system: bool) -> None:
    tokenizer = family_tokenizer(name)
    messages = [SYSTEM] * with_system + CONVERSATION
    ex = encode_record(chat(messages), tokenizer, tokenizer.chat_template)
    assert_labels_consistent(ex.input_ids, ex.labels)
    assert supervised_runs(tokenizer, ex.input_ids, ex.labels) == expected_replies(name, messages)
    # the ids are the template's text, tokenized once: BOS from the template, never doubled
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ex.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
    if FAMILIES[name].bos is not None:
        assert ex.input_ids.count(tokenizer.bos_token_id) == text.count(FAMILIES[name].bos)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_character_spans_end_on_the_end_token_not_the_newline_after_it(name: str) -> None:
    tokenizer = family_tokenizer(name)
    full, spans = chat_spans(tokenizer, CONVERSATION, tokenizer.chat_template, "x")
    assert [full[a:b] for a, b in spans] == expected_replies(name, CONVERSATION)
    for a, b in spans:
        assert not full[b - 1].isspace()
        assert a == 0 or not full[a - 1].isalnum()


def test_phi3_mid_conversation_reply_stops_before_the_next_turn() -> None:
    """Phi-3 ends a conversation with <|endoftext|>; the next turn opens with <|user|>. Both start with
    '<|', and the character diff of the two renders must not hand <|user|> to the reply before it."""
    tokenizer = family_tokenizer("phi-3")
    ex = encode_record(chat(CONVERSATION), tokenizer, tokenizer.chat_template)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    assert all(y == IGNORE for t, y in zip(ex.input_ids, ex.labels, strict=True) if t == user)


def test_qwen2_default_system_prompt_is_rendered_but_not_learned() -> None:
    tokenizer = family_tokenizer("qwen2")
    ex = encode_record(chat(CONVERSATION), tokenizer, tokenizer.chat_template)
    assert "You are a helpful assistant." in tokenizer.decode(ex.input_ids)
    assert not any("helpful" in run for run in supervised_runs(tokenizer, ex.input_ids, ex.labels))


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("qwen2", "four.\n", "four.\n<|im_end|>"),  # ChatML keeps the content verbatim, trailing newline included
    ("llama-3", "  four.  ", "four.<|eot_id|>"),  # Llama-3 and Gemma trim it
    ("gemma", "\nfour.\n", "four.<end_of_turn>"),
    ("mistral", "four. ", "four. </s>"),
])
def test_whitespace_inside_a_reply_stays_whitespace_after_the_end_token_goes(name: str, content: str, expected: str) -> None:
    tokenizer = family_tokenizer(name)
    messages = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": content},
                {"role": "user", "content": "Thanks."}]
    ex = encode_record(chat(messages), tokenizer, tokenizer.chat_template)
    assert supervised_runs(tokenizer, ex.input_ids, ex.labels) == [expected]


def test_special_tokens_that_swallow_the_following_newline() -> None:
    """Phi-3 registers its chat tokens with rstrip: the newline after <|end|> joins that token's offsets."""
    from tokenizers import AddedToken

    tokenizer = family_tokenizer("phi-3")
    tokenizer.backend_tokenizer.add_special_tokens(
        [AddedToken(t, rstrip=True, normalized=False, special=True) for t in ("<|user|>", "<|assistant|>", "<|end|>")])
    ex = encode_record(chat(CONVERSATION), tokenizer, tokenizer.chat_template)
    assert supervised_runs(tokenizer, ex.input_ids, ex.labels) == [
        "Two plus two is four.<|end|>", "The cat sat on the mat.\nIt was very happy: ✓ {\"json\": true}<|end|><|endoftext|>"]
    # a reply starting with a space: <|assistant|> swallows "\n " and reaches into the reply, yet is not learned
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": " hello world"}]
    ex = encode_record(chat(messages), tokenizer, tokenizer.chat_template)
    assert supervised_runs(tokenizer, ex.input_ids, ex.labels) == ["hello world<|end|><|endoftext|>"]


def test_a_token_starting_on_the_prompts_trailing_space_is_the_replys_first_word() -> None:
    """Vicuna-style prompts end in a space ('ASSISTANT: '); byte-level BPE and SentencePiece glue that space to
    the reply's first word, and that token must be learned."""
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ASSISTANT: ' }}"
                "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    tokenizer = family_tokenizer("mistral")
    ex = encode_record(chat(CONVERSATION[:2]), tokenizer, template)
    assert supervised_runs(tokenizer, ex.input_ids, ex.labels) == [" Two plus two is four.</s>"]


@pytest.mark.parametrize(("name", "messages", "message"), [
    ("mistral", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "Conversation roles must alternate"),
    ("mistral", [{"role": "user", "content": "a"}, SYSTEM], "Only user and assistant roles are supported"),
    ("gemma", [SYSTEM] + CONVERSATION, "System role not supported"),
])
def test_a_template_refusing_the_conversation_names_the_row(name: str, messages: list, message: str) -> None:
    tokenizer = family_tokenizer(name)
    with pytest.raises(DataError, match=message) as err:
        encode_record(chat(messages), tokenizer, tokenizer.chat_template)
    assert str(err.value).startswith("data.jsonl:7: the chat template rejected this conversation")
    assert "data.chat_template" in str(err.value)  # and says what else to do


@pytest.mark.parametrize(("builtin", "end"), [("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>"),
                                              ("mistral", "</s>"), ("alpaca", "</s>")])
def test_builtin_templates_mask_replies_and_end_token(builtin: str, end: str) -> None:
    tokenizer = family_tokenizer("mistral")  # eos </s>, bos <s>; every family's specials are in the vocabulary
    ex = encode_record(chat(CONVERSATION), tokenizer, BUILTIN_TEMPLATES[builtin])
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert supervised_runs(tokenizer, ex.input_ids, ex.labels) == [r + end for r in replies]


def test_train_on_all_supervises_every_token() -> None:
    tokenizer = family_tokenizer("llama-3")
    ex = encode_record(chat(CONVERSATION), tokenizer, tokenizer.chat_template, train_on="all")
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize("name", ["llama-3", "phi-3"])  # pad == eos in both
def test_pad_equal_to_eos_keeps_the_eos_of_text_and_completion_rows_supervised(name: str) -> None:
    from lorakit.data import collate

    tokenizer = family_tokenizer(name)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    text = encode_record(Record("text", "t:1", response="The cat sat on the mat."), tokenizer, None)
    completion = encode_record(Record("completion", "t:2", prompt="What is two plus two?", response=" Four."), tokenizer, None)
    for ex in (text, completion):
        assert ex.input_ids[-1] == eos and ex.labels[-1] == eos
    assert supervised_runs(tokenizer, completion.input_ids, completion.labels) == [" Four." + tokenizer.eos_token]
    batch = collate([text, completion], pad_id=tokenizer.pad_token_id)
    for b, ex in enumerate((text, completion)):
        n = len(ex)
        assert batch["labels"][b, n - 1] == eos  # the real EOS: learned
        assert (batch["labels"][b, n:] == IGNORE).all()  # the padding (same id): not learned
        assert (batch["input_ids"][b, n:] == eos).all()


def test_text_rows_start_with_bos_when_the_tokenizer_adds_one() -> None:
    """Llama-3 adds <|begin_of_text|> in its post-processor (add_bos_token is False); raw text and
    completion rows must start with it as inference prompts will, and it is never a target."""
    tokenizer = family_tokenizer("llama-3")
    bos = tokenizer.bos_token_id
    assert tokenizer("hello")["input_ids"][0] == bos
    for record in (Record("text", "t:1", response="hello"), Record("completion", "t:2", prompt="hi", response="yo")):
        ex = encode_record(record, tokenizer, None)
        assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1 and ex.labels[0] == IGNORE
    qwen = family_tokenizer("qwen2")  # no BOS at all
    assert encode_record(Record("text", "t:1", response="hello"), qwen, None).input_ids == qwen("hello")["input_ids"] + [
        qwen.eos_token_id]


def test_completion_prompt_is_masked_unless_train_on_all() -> None:
    tokenizer = family_tokenizer("qwen2")
    record = Record("completion", "t:1", prompt="What is two plus two?", response=" Four.")
    masked = encode_record(record, tokenizer, None)
    assert supervised_runs(tokenizer, masked.input_ids, masked.labels) == [" Four.<|im_end|>"]
    assert encode_record(record, tokenizer, None, train_on="all").labels == masked.input_ids
