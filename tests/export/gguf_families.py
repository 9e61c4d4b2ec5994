"""Tiny chat models of each exportable family, built from configs with their own trained tokenizer, special
tokens and chat template (nothing downloaded).

Byte-level BPE tokenizers are trained with `tokenizers`. SentencePiece-style ones are trained with the
`sentencepiece` package into a tokenizer.model and converted by transformers (AutoTokenizer), as a
Llama-2/Gemma/Phi-3 checkpoint's tokenizer.json was: BPE with byte_fallback, the 256 '<0xXX>' tokens, merges
generated from the piece scores. `spm` picks the whitespace handling of tokenizer.json:
  prepend  Prepend('▁') + Replace(' ', '▁') normalizers (Llama-2, Mistral-v0.1, Phi-3 files on the Hub)
  gemma    Replace(' ', '▁') only, no leading '▁' (Gemma)
  first    Metaspace prepend_scheme 'first' (transformers' LlamaTokenizer, legacy=False)
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import transformers as tf

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3 = (  # Phi-3-mini-4k-instruct's template
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
CORPUS = [
    "The cat sat on the mat. It was very happy!", "Dogs ran fast, then slow; 123 4567 red-blue.",
    "Tell me about the kettle. The kettle is silver and it works perfectly.", "naïve café, déjà vu",
    "user assistant system: Hello there. How are you today?", "  indented\n\nnew lines\tand tabs",
] * 10
# texts the tests tokenize: spaces, leading and repeated spaces, new lines, digits, accents, and characters no
# tokenizer here has learnt (SentencePiece-style tokenizers fall back to their UTF-8 bytes)
TEXTS = ["Hello world, the cat sat.", "  indented\n\nnew lines\tand 12345 numbers!", "naïve café, déjà vu",
         " emoji 😀 and 漢字 ", "a  b   c\n \n"]


@dataclass(frozen=True)
class Kind:
    """One test family: model config class, tokenizer style, chat template and its special tokens."""

    name: str
    config_cls: type
    regex: str | None  # Split regex before ByteLevel; None: ByteLevel's own GPT-2 regex
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    end_of_turn: str
    extra: tuple[tuple[str, object], ...] = ()
    spm: str | None = None  # SentencePiece-style tokenizer (see the module docstring); None: byte-level BPE


KINDS = {
    "llama": Kind("llama", tf.LlamaConfig, None, CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
                  "<|endoftext|>", "<|im_end|>", (("tie_word_embeddings", True),)),
    "llama3": Kind("llama3", tf.LlamaConfig, LLAMA3_REGEX, LLAMA3,
                   ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                   "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", (("rope_theta", 500000.0),)),
    "qwen2": Kind("qwen2", tf.Qwen2Config, QWEN2_REGEX, CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
                  "<|im_end|>", "<|im_end|>"),
    "mistral": Kind("mistral", tf.MistralConfig, None, MISTRAL, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "</s>",
                    (("sliding_window", None),)),
    # SentencePiece-style tokenizers: Llama-2 and Gemma chat, Phi-3 (the special tokens SentencePiece defines are
    # <unk> <s> </s>; the chat markers are added on top, as in the released tokenizers)
    "llama2": Kind("llama2", tf.LlamaConfig, None, MISTRAL, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "</s>",
                   spm="prepend"),
    "llama2-first": Kind("llama2-first", tf.LlamaConfig, None, CHATML, ("<unk>", "<s>", "</s>", "<|im_start|>",
                         "<|im_end|>"), "<s>", "</s>", "<|im_end|>", spm="first"),
    "gemma": Kind("gemma", tf.GemmaConfig, None, GEMMA, ("<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"),
                  "<s>", "</s>", "<end_of_turn>", (("head_dim", 32), ("hidden_act", "gelu_pytorch_tanh")),
                  spm="gemma"),
    "phi3": Kind("phi3", tf.Phi3Config, None, PHI3, ("<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>",
                 "<|end|>"), "<s>", "</s>", "<|end|>", (("sliding_window", None), ("pad_token_id", 0)), spm="prepend"),
}


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def build_tokenizer(kind: Kind) -> tf.PreTrainedTokenizerFast:
    return build_spm_tokenizer(kind) if kind.spm else build_bpe_tokenizer(kind)


@cache
def sentencepiece_model() -> bytes:
    """A SentencePiece BPE tokenizer.model trained on CORPUS: <unk> <s> </s>, 256 byte tokens, pieces by score."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, model_type="bpe", vocab_size=420, byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2)
    return out.getvalue()


def build_spm_tokenizer(kind: Kind) -> tf.PreTrainedTokenizerFast:
    """tokenizer.model -> transformers' conversion (LlamaTokenizer or GemmaTokenizer) -> `kind.spm`'s whitespace
    handling and the chat markers. Saved as a plain PreTrainedTokenizerFast, so that tokenizer.json is what
    transformers runs (LlamaTokenizer rebuilds its normalizer and pre-tokenizer from its own arguments)."""
    from tokenizers import normalizers, pre_tokenizers, processors

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(sentencepiece_model())
        config = {"tokenizer_class": "GemmaTokenizer" if kind.spm == "gemma" else "LlamaTokenizer",
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        core = tf.AutoTokenizer.from_pretrained(tmp).backend_tokenizer
    if kind.spm == "prepend":  # the normalizers of the released Llama-2 tokenizer.json
        core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        core.pre_tokenizer = None
    elif kind.spm == "first":
        core.normalizer = None
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    others = [s for s in kind.specials if s not in ("<unk>", "<s>", "</s>")]
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     additional_special_tokens=others)
    tok.chat_template = kind.template
    return tok


def build_bpe_tokenizer(kind: Kind) -> tf.PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind.regex is None)
    core.pre_tokenizer = byte_level if kind.regex is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(kind.regex), behavior="isolated"), byte_level])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(kind.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    if kind.bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{kind.bos} $A", special_tokens=[(kind.bos, core.token_to_id(kind.bos))])
    others = [s for s in kind.specials if s not in (kind.bos, kind.eos)]
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token=kind.bos, eos_token=kind.eos,
                                     additional_special_tokens=others)
    tok.chat_template = kind.template
    return tok


def save_base(kind: Kind, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object) -> Path:
    """A tiny model of `kind` with its tokenizer, saved as a local model directory."""
    tok = build_tokenizer(kind)
    torch.manual_seed(seed)
    config = kind.config_cls(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **{**dict(kind.extra), **overrides},
    )
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases start at zero: make them matter
                p.normal_(0, 0.1)
            if name.endswith("norm.weight") and kind.config_cls is tf.GemmaConfig:  # Gemma's start at 0, used as
                p.normal_(0, 0.2)  # 1 + w: make w matter (the other families' near-ties stay as calibrated)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
