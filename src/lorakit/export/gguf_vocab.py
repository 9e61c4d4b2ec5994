"""The tokenizer as llama.cpp reads it: `tokenizer.ggml.*` keys from a Hugging Face fast tokenizer.

Byte-level BPE (GPT-2, Llama-3, Qwen2 and the demo's tokenizer) is written as llama.cpp's `gpt2` model: the
token strings in their byte-level spelling ('Ġthe'), the merges, and `tokenizer.ggml.pre`, the name of the
regex that splits text into words before BPE. llama.cpp cannot read the regex from the file -- it knows a
fixed set by name -- so the exporter recognizes the regexes it knows and refuses any other, which would
tokenize differently without an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType


@dataclass
class Vocab:
    """Everything `tokenizer.ggml.*` holds; ids index `tokens`."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, eot, unk, pad -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        has_spm = (model_dir / "tokenizer.model").is_file()
        raise ExportError(
            f"{model_dir}: no tokenizer.json, which the GGUF export reads"
            + ("; it has only a SentencePiece tokenizer.model, which this exporter does not convert yet -- save the "
               "tokenizer with AutoTokenizer.from_pretrained(dir).save_pretrained(dir) to write tokenizer.json"
               if has_spm else "; save the tokenizer beside the model (tokenizer.save_pretrained(dir))")
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ExportError(f"{model_dir}: cannot load the tokenizer ({e})") from None


def build_vocab(tokenizer: Any, n_vocab: int, chat_template: str | None, eot_token: str | None) -> Vocab:
    """The GGUF vocabulary of `tokenizer`, padded to the model's `n_vocab` embedding rows."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            f"tokenizer model {model.get('type')!r}{' with byte_fallback (SentencePiece-style)' if model.get('byte_fallback') else ''} "
            "is not supported by the GGUF export yet; supported: byte-level BPE (GPT-2, Llama-3, Qwen2 style)"
        )
    tokens, types = _tokens(tokenizer, model["vocab"], n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return Vocab(
        pre=pre_tokenizer_name(spec.get("pre_tokenizer")), tokens=tokens, types=types, merges=merges,
        special_ids=_special_ids(tokenizer, eot_token),
        add_bos=len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id,
        add_eos=len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id,
        chat_template=chat_template or tokenizer.chat_template,
    )


def _tokens(tokenizer: Any, vocab: dict[str, int], n_vocab: int) -> tuple[list[str], list[int]]:
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    top = max([*vocab.values(), *added])
    if top >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {top} but the model's embedding has only {n_vocab} rows; "
                          "the tokenizer does not belong to this model")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, NORMAL
    for i, tok in added.items():
        tokens[i], types[i] = tok.content, CONTROL if tok.special else USER_DEFINED
    return tokens, types


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
