"""The tokenizer as llama.cpp reads it: `tokenizer.ggml.*` keys from a Hugging Face fast tokenizer.

Byte-level BPE (GPT-2, Llama-3, Qwen2 and the demo's tokenizer) is written as llama.cpp's `gpt2` model: the
token strings in their byte-level spelling ('Ġthe'), the merges, and `tokenizer.ggml.pre`, the name of the
regex that splits text into words before BPE. llama.cpp cannot read the regex from the file -- it knows a
fixed set by name -- so the exporter recognizes the regexes it knows and refuses any other, which would
tokenize differently without an error.

SentencePiece-style BPE (Llama-2, Mistral-v0.1, Gemma, Phi-3: `byte_fallback`, spaces spelled '▁', the 256
'<0xXX>' byte tokens) is written as llama.cpp's `llama` model, as its converter does: tokens, a score per
token and no merges. llama.cpp's SentencePiece tokenizer starts from single characters and keeps merging
the adjacent pair whose concatenation is the vocabulary token of highest score (leftmost on ties); what
is left that is no token becomes its UTF-8 bytes. Hugging Face's BPE merges the adjacent pair of lowest
merge rank instead. The two agree when

    score(t) = -(rank of the first merge that makes t)       (merges are ordered by SentencePiece score)

and the merges are *closed*: every split t = l + r of a token into two tokens is itself a merge, as in a
tokenizer.json converted from SentencePiece's tokenizer.model (transformers' generate_merges). A BPE trained
with the `tokenizers` library lacks most of those merges; llama.cpp would merge pairs it never does, so
such a tokenizer is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorakit.errors import ExportError

# Pre-tokenizer regexes as they appear in tokenizer.json, by llama.cpp's name for them.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe",  # Llama-3
    _WORDS + r"\p{N}" + _REST: "qwen2",
    GPT2_REGEX: "gpt-2",
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
SPACE = "\u2581"  # '▁', SentencePiece's spelling of a space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # llama.cpp looks bytes up as '<0x%02X>': upper-case hex only
NO_MERGE_SCORE = -1e9  # tokens no merge makes (bytes, specials): below every merged token


@dataclass
class Vocab:
    """Everything `tokenizer.ggml.*` holds; ids index `tokens`."""

    model: Literal["gpt2", "llama"]  # byte-level BPE, or SentencePiece-style (see the module docstring)
    pre: str  # the pre-tokenizer's name ('default' for `llama`)
    tokens: list[str]
    types: list[int]
    merges: list[str]  # `gpt2` only
    scores: list[float] | None  # `llama` only: the merge priority of each token
    add_space_prefix: bool | None  # `llama` only: '▁' before text that starts a prompt or follows a special token
    special_ids: dict[str, int]  # bos, eos, eot, unk, pad -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    notes: list[str] = field(default_factory=list)  # where llama.cpp may still tokenize differently

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def load_tokenizer(model_dir: Path) -> Any:
    """The fast tokenizer of `model_dir`: its tokenizer.json, or one transformers converts from tokenizer.model."""
    from transformers import AutoTokenizer

    has_json, has_spm = (model_dir / "tokenizer.json").is_file(), (model_dir / "tokenizer.model").is_file()
    if not has_json and not has_spm:
        raise ExportError(f"{model_dir}: no tokenizer.json (nor a SentencePiece tokenizer.model), which the GGUF "
                          "export reads; save the tokenizer beside the model (tokenizer.save_pretrained(dir))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, ImportError) as e:
        hint = ("; converting tokenizer.model needs `pip install sentencepiece protobuf`, or save tokenizer.json "
                "with AutoTokenizer.from_pretrained(dir).save_pretrained(dir) where they are installed") if not has_json else ""
        raise ExportError(f"{model_dir}: cannot load the tokenizer ({e}){hint}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(f"{model_dir}: {type(tokenizer).__name__} is a slow (Python) tokenizer; the GGUF export "
                          "reads a fast one: install `tokenizers` and save tokenizer.json (tokenizer.save_pretrained)")
    return tokenizer


def build_vocab(tokenizer: Any, n_vocab: int, chat_template: str | None, eot_token: str | None) -> Vocab:
    """The GGUF vocabulary of `tokenizer`, padded to the model's `n_vocab` embedding rows."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ExportError(_unsupported_model(model))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    sentencepiece = bool(model.get("byte_fallback"))
    tokens, types = _tokens(tokenizer, model["vocab"], n_vocab, sentencepiece)
    if sentencepiece:  # written as llama.cpp's `llama` model: scores instead of merges (see the module docstring)
        prefix, notes = space_prefix(spec.get("normalizer"), spec.get("pre_tokenizer"))
        kind = {"model": "llama", "pre": "default", "merges": [], "scores": merge_scores(tokens, types, merges),
                "add_space_prefix": prefix, "notes": notes}
    else:
        kind = {"model": "gpt2", "pre": pre_tokenizer_name(spec.get("pre_tokenizer")), "merges": merges,
                "scores": None, "add_space_prefix": None}
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return Vocab(
        tokens=tokens, types=types, special_ids=_special_ids(tokenizer, eot_token),
        add_bos=len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id,
        add_eos=len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id,
        chat_template=chat_template or tokenizer.chat_template, **kind,
    )


def _unsupported_model(model: dict[str, Any]) -> str:
    kind = model.get("type")
    why = {
        "Unigram": "a Unigram model segments by Viterbi over piece scores; llama.cpp's SentencePiece tokenizer "
                   "(`llama`) merges pairs greedily and would give other ids, and its Unigram tokenizer (`t5`) needs "
                   "SentencePiece's compiled normalizer, which tokenizer.json does not hold",
        "WordPiece": "WordPiece is an encoder (BERT) tokenizer; no supported causal LM family uses it",
    }.get(kind, "llama.cpp has no tokenizer for it")
    return (f"tokenizer model {kind!r} (tokenizer.json model.type) is not supported by the GGUF export: {why}. Supported: "
            "byte-level BPE (GPT-2, Llama-3, Qwen2 style) and SentencePiece-style BPE with byte_fallback "
            "(Llama-2, Mistral, Gemma, Phi-3 style)")


def _tokens(tokenizer: Any, vocab: dict[str, int], n_vocab: int, sentencepiece: bool) -> tuple[list[str], list[int]]:
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    top = max([*vocab.values(), *added])
    if top >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {top} but the model's embedding has only {n_vocab} rows; "
                          "the tokenizer does not belong to this model")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, BYTE if sentencepiece and _BYTE_TOKEN.fullmatch(text) else NORMAL
    for i, tok in added.items():
        tokens[i], types[i] = tok.content, CONTROL if tok.special else USER_DEFINED
    if sentencepiece:
        _check_byte_tokens(tokens, types)
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = UNKNOWN  # as SentencePiece marks it (llama.cpp's converter copies that)
    return tokens, types


def _check_byte_tokens(tokens: list[str], types: list[int]) -> None:
    have = {t for t, k in zip(tokens, types, strict=True) if k == BYTE}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in have]
    if missing:
        raise ExportError(f"the tokenizer has byte_fallback but lacks the byte tokens {missing[:4]}{'...' if len(missing) > 4 else ''} "
                          f"({len(missing)} of 256, spelled '<0xXX>' with upper-case hex): llama.cpp falls back to "
                          "exactly those tokens for text no token covers")


def space_prefix(normalizer: dict[str, Any] | None, pre: dict[str, Any] | None) -> tuple[bool, list[str]]:
    """llama.cpp's `add_space_prefix` for a SentencePiece-style tokenizer.json, and notes on what may differ.

    Spaces must become '▁' (a Replace normalizer, or a Metaspace pre-tokenizer). A Prepend('▁') normalizer
    puts '▁' before every piece of text, as llama.cpp does before the prompt and after each special token.
    Metaspace's prepend_scheme 'always' does so unless the text already starts with a space; 'first' only at
    the very start of the input, so text after a special token gets none. llama.cpp has one flag for both
    places, and 'first' is written as False: chat prompts, whose text all follows a special token, then
    tokenize alike."""
    steps = (normalizer or {}).get("normalizers", [normalizer] if normalizer else [])
    names = [_describe(n) for n in steps]
    if any(name not in ("Prepend(▁)", "Replace(' ' -> ▁)") for name in names):
        raise ExportError(_spm_refusal(f"normalizer {names}", "llama.cpp applies no normalizer of its own"))
    replaced, prefix, notes = "Replace(' ' -> ▁)" in names, "Prepend(▁)" in names, []
    if pre and pre.get("type") == "Metaspace":
        if pre.get("replacement") != SPACE or pre.get("split"):
            raise ExportError(_spm_refusal(f"Metaspace pre-tokenizer {json.dumps(pre)}", "llama.cpp neither splits "
                                           "words at spaces before merging nor uses another replacement than '▁'"))
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        replaced, prefix = True, scheme == "always"
        if scheme == "always":
            notes.append("tokenizer: a space at the start of a prompt or right after a special token becomes one "
                         "more '▁' in llama.cpp (Metaspace prepend_scheme 'always' adds none before a space)")
        if scheme == "first":
            notes.append("tokenizer: a prompt that starts with plain text, not a special token, gets no leading '▁' "
                         "in llama.cpp (Metaspace prepend_scheme 'first'); chat prompts tokenize as in training")
    elif pre is not None and not (pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " "):
        raise ExportError(_spm_refusal(f"pre-tokenizer {json.dumps(pre)[:200]}", "llama.cpp's SentencePiece "
                                       "tokenizer does not split text before merging"))
    if not replaced:
        raise ExportError(_spm_refusal("no Replace(' ', '▁') normalizer or Metaspace pre-tokenizer",
                                       "llama.cpp spells spaces '▁' in SentencePiece vocabularies"))
    return prefix, notes


def _describe(step: dict[str, Any]) -> str:
    kind = step.get("type")
    if kind == "Prepend" and step.get("prepend") == SPACE:
        return "Prepend(▁)"
    if kind == "Replace" and (step.get("pattern") or {}).get("String") == " " and step.get("content") == SPACE:
        return "Replace(' ' -> ▁)"
    return json.dumps(step)[:120]


def _spm_refusal(found: str, why: str) -> str:
    return (f"the SentencePiece-style tokenizer (BPE with byte_fallback) has {found}, which llama.cpp cannot "
            f"reproduce: {why}. Supported: spaces replaced by '▁' (Replace normalizer or Metaspace without split), "
            "with or without a leading '▁' (Prepend normalizer or Metaspace prepend_scheme)")


def merge_scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """score(t) = -(rank of the first merge making t); bytes, specials and padding: NO_MERGE_SCORE.

    Refuses merges that are not closed (see the module docstring): a token t = l + r with l and r normal
    tokens and (l, r) not a merge would be made by llama.cpp where Hugging Face never makes it."""
    rank: dict[str, int] = {}
    pairs = set()
    for r, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        pairs.add((left, right))
        rank.setdefault(left + right, r)
    normal = {t for t, k in zip(tokens, types, strict=True) if k == NORMAL}
    missing = [(t[:i], t[i:]) for t in normal for i in range(1, len(t))
               if t[:i] in normal and t[i:] in normal and (t[:i], t[i:]) not in pairs]
    if missing:
        raise ExportError(
            f"the SentencePiece-style tokenizer's merges are not closed: {len(missing)} splits of tokens into two "
            f"tokens are no merge (e.g. {' + '.join(missing[0])}). llama.cpp's SentencePiece tokenizer merges every "
            "adjacent pair that forms a token, so it would tokenize differently from transformers. Such a "
            "tokenizer comes from training BPE with `tokenizers` rather than converting a SentencePiece "
            "tokenizer.model; export with a converted tokenizer (AutoTokenizer on the tokenizer.model)")
    return [-float(rank[t]) if t in rank and k == NORMAL else NO_MERGE_SCORE for t, k in zip(tokens, types, strict=True)]


def _special_ids(tokenizer: Any, eot_token: str | None) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    if eot_token is not None:
        eot = tokenizer.convert_tokens_to_ids(eot_token)
        ids["eot"] = eot if eot != tokenizer.unk_token_id else None
    return {k: int(v) for k, v in ids.items() if v is not None}


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or an ExportError naming what it found."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space")):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:300]}) is not one llama.cpp knows by name; supported: "
        f"ByteLevel (gpt-2) and the Llama-3 and Qwen2 split regexes. A different split would tokenize differently "
        "in llama.cpp without an error, so the export stops here"
    )
