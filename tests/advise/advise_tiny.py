"""Shared by tests/advise: a tiny Llama written as config.json only (the advisor never reads weights),
the run configs predicted on it, the model lorakit.train would build from them, and fixed rates in place
of a calibration. Each test module imports the fixtures (`*_fixture`): a nested conftest.py would shadow
tests/conftest.py, which other tests import as `conftest`."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from torch import nn

from lorakit.advise import model_shape, resolve_workload, timing
from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.train import adapt_for_method

RATES = {"matmul_flops": {"32": 2e10, "128": 5e10, "512": 8e10, "2048": 9e10}, "bandwidth": 2e10,
         "dequant_s": 2e-9, "adamw_s": 3e-9, "op_s": 2e-5, "bernoulli_s": 9e-9, "softmax_s": 2e-8,
         "measured": "fixed for tests"}
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, pad_token_id=0)
B, T = 2, 32


@pytest.fixture(name="fixed_rates", autouse=True)
def fixed_rates_fixture(monkeypatch, tmp_path):
    """No calibration: an empty cache and fixed rates (import this into a test module to use it)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(timing, "calibrate", lambda *args, **kwargs: RATES)


@pytest.fixture(name="tiny_dir")
def tiny_dir_fixture(tmp_path):
    """A tiny Llama as a model directory holding config.json only."""
    path = tmp_path / "tiny"
    tf.LlamaConfig(**TINY).save_pretrained(path)
    return str(path)


def run_config(model_dir: str, method: str = "lora", targets="all-linear", dropout: float = 0.05,
               gc: bool = False, r: int = 4) -> RunConfig:
    return RunConfig(base_model=model_dir, method=method,
                     lora=LoraConfig(r=r, alpha=2 * r, dropout=dropout, target_modules=targets),
                     data=DataConfig(max_seq_len=T),
                     train=TrainConfig(micro_batch_size=B, gradient_checkpointing=gc, device="cpu", dtype="float32"))


def real_model(config: RunConfig, tied: bool = False) -> nn.Module:
    """The model lorakit.train.prepare_model would build (random weights, fp32, CPU)."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, tie_word_embeddings=tied)).float()
    return adapt_for_method(model, config, progress=False).train()


def predicted(config: RunConfig, masked: bool):
    shape = model_shape(config.base_model)
    return resolve_workload(config, shape, "cpu", masked=masked), shape


def nf4_by_hand(n: int, blocksize: int = 64) -> int:
    """NF4 with double quant for n weights (n a multiple of 64): n/2 bytes of codes, one 8-bit absmax per
    64, one fp32 scale per 256 absmax blocks, one fp32 offset."""
    blocks = n // blocksize
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4


def llama3_8b_by_hand() -> dict[str, int]:
    """Llama-3-8B from its published shapes (hidden 4096, intermediate 14336, 32 layers, 32 query / 8 KV heads
    of 128, vocab 128256, untied head, bf16 checkpoint): what QLoRA stores and streams."""
    d, i, layers, kv, vocab = 4096, 14336, 32, 8 * 128, 128256
    linears = [d * d, d * kv, d * kv, d * d, d * i, d * i, i * d]  # q, k, v, o, gate, up, down
    unquantized = 2 * vocab * d + layers * 2 * d + d  # embedding, head, 2 RMSNorms per layer, final norm
    return {"nf4": layers * sum(nf4_by_hand(n) for n in linears), "unquantized": 2 * unquantized,
            "largest": d * i, "params": layers * sum(linears) + unquantized}
