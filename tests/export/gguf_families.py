"""Tiny chat models of each exportable family, built from configs with their own trained byte-level BPE
tokenizer, special tokens and chat template (nothing downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
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
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
CORPUS = [
    "The cat sat on the mat. It was very happy!", "Dogs ran fast, then slow; 123 4567 red-blue.",
    "Tell me about the kettle. The kettle is silver and it works perfectly.", "naïve café, déjà vu",
    "user assistant system: Hello there. How are you today?", "  indented\n\nnew lines\tand tabs",
] * 10


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
}


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def build_tokenizer(kind: Kind) -> tf.PreTrainedTokenizerFast:
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
    if kind.config_cls is tf.Qwen2Config:  # Qwen2's q/k/v biases start at zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
