"""Tiny models built from configs (never downloaded), shared by the whole suite."""

from __future__ import annotations

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


@pytest.fixture
def tiny():
    return build_tiny
