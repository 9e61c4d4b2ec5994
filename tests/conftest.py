"""Tiny models built from configs (never downloaded), shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

VOCAB = 97


def _llama_like(config_cls, model_cls, **extra):
    config = config_cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, **extra,
    )
    return model_cls(config)


def build_tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialized tiny model of one family, in fp32, eval mode."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = _llama_like(tf.LlamaConfig, tf.LlamaForCausalLM)
    elif kind == "qwen2":
        model = _llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM)
    elif kind == "mistral":
        model = _llama_like(tf.MistralConfig, tf.MistralForCausalLM)
    elif kind == "phi3":
        model = _llama_like(tf.Phi3Config, tf.Phi3ForCausalLM)
    elif kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                               bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(config)
    elif kind == "bert_cls":
        config = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=VOCAB, max_position_embeddings=128, num_labels=3)
        model = tf.BertForSequenceClassification(config)
    elif kind == "llama_cls":
        model = _llama_like(tf.LlamaConfig, tf.LlamaForSequenceClassification, num_labels=3)
    else:
        raise ValueError(kind)
    return model.float().eval()


CAUSAL_KINDS = ["llama", "qwen2", "mistral", "phi3", "gpt2"]
ALL_KINDS = CAUSAL_KINDS + ["bert_cls", "llama_cls"]


def batch(seed: int = 1, rows: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=g)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_lora(model: torch.nn.Module, seed: int = 7) -> None:
    """Give every LoRA factor (and fully trained head) random non-zero values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def tiny_qlora_some_targets(kind: str) -> torch.nn.Module:
    """A tiny model with an NF4 base and trained-looking r=4 adapters on the 'minimal' targets only, so that
    some 4-bit layers carry no adapter (what merge and export must handle)."""
    from lorakit import LoraConfig, QuantConfig, inject_lora, quantize_model

    model = build_tiny(kind)
    quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    inject_lora(model, LoraConfig(r=4, dropout=0.0, target_modules="minimal"))
    randomize_lora(model)
    return model


@pytest.fixture
def tiny():
    return build_tiny


WORDS = "the a cat dog sat ran on mat log red blue big small fast slow and then it was very happy sad".split()


def tiny_tokenizer():
    """Word-level tokenizer with ChatML special tokens and chat template, trained on nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["user", "assistant", "system", ":", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return fast


def save_tiny_base(path, seed: int = 0):
    """A tiny Llama + tokenizer saved as a local model directory (what a hub id resolves to)."""
    import transformers as tf

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            initializer_range=0.2)  # HF's 0.02 caps |logits| < 1 behind the frozen head
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_text_data(path, n: int = 48, seed: int = 0):
    """JSONL of short raw-text rows of varying length (different supervised-token counts per row).

    Each row walks WORDS in order from a random start, so the next word is learnable."""
    import json
    import random

    rng = random.Random(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            start = rng.randrange(len(WORDS))
            words = [WORDS[(start + k) % len(WORDS)] for k in range(3 + (i * 7) % 11)]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path
