"""Streamed 4-bit loading against the obvious path: load the whole model, then `quantize_model`."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import batch, build_tiny, randomize_lora
from lorakit.config import LoraConfig, QuantConfig
from lorakit.errors import ModelLoadError
from lorakit.lora import inject_lora
from lorakit.loss import causal_lm_loss_sum
from lorakit.models import load_model
from lorakit.quant import CastLinear, NF4Linear, load_quantized_model, precision_report, quantize_model
from lorakit.quant.safetensors_io import CheckpointError
from lorakit.quant.stream import streamed_load_peak_bytes

SHARD = "30KB"  # tiny models of ~60 KB: several shards, some holding one tensor only


def _save(tmp_path, kind: str, dtype: torch.dtype, sharded: bool = True, **config) -> str:
    model = build_tiny(kind)
    for key, value in config.items():
        setattr(model.config, key, value)
    if config.get("tie_word_embeddings"):
        model.tie_weights()
    with torch.no_grad():  # norms are ones at init: make every tensor carry information
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    path = tmp_path / f"{kind}-{str(dtype)[6:]}-{'sharded' if sharded else 'single'}"
    model.to(dtype).save_pretrained(path, max_shard_size=SHARD if sharded else "10GB")
    return str(path)


def _reference(path: str, compute: torch.dtype = torch.float32, task: str = "causal_lm") -> nn.Module:
    model = load_model(path, task, compute)
    quantize_model(model, QuantConfig(), compute_dtype=compute, progress=False)
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_same_model(streamed: nn.Module, reference: nn.Module, exact_dtypes: bool = False) -> None:
    """Every parameter and buffer equal (NF4 codes and scales bit for bit), and the logits."""
    got, want = streamed.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        assert not exact_dtypes or got[key].dtype == value.dtype, key
        assert torch.equal(got[key].to(value.dtype), value), key
    ids = batch(seed=3, rows=2, length=11)
    assert torch.equal(_logits(streamed, ids), _logits(reference, ids))


@pytest.mark.parametrize(
    ("kind", "dtype", "sharded"),
    [
        ("llama", torch.bfloat16, True),
        ("llama", torch.float16, False),
        ("llama", torch.float32, True),
        ("qwen2", torch.bfloat16, False),
        ("qwen2", torch.float32, True),
        ("gpt2", torch.bfloat16, True),  # Conv1D weights (in, out), tied head
    ],
)
def test_streamed_equals_load_then_quantize(tmp_path, kind, dtype, sharded):
    path = _save(tmp_path, kind, dtype, sharded)
    streamed = load_quantized_model(path, compute_dtype=torch.float32)
    reference = _reference(path)
    _assert_same_model(streamed, reference)
    names = [n for n, m in streamed.named_modules() if isinstance(m, NF4Linear)]
    assert sorted(names) == sorted(n for n, m in reference.named_modules() if isinstance(m, NF4Linear))
    assert sorted(streamed.lorakit_load.quantized) == sorted(names) and len(names) == (8 if kind == "gpt2" else 14)
    assert not any(p.device.type == "meta" for p in [*streamed.parameters(), *streamed.buffers()])
    assert not streamed.training


def test_unquantized_tensors_keep_their_storage_dtype_and_compute_in_fp32(tmp_path):
    path = _save(tmp_path, "llama", torch.bfloat16)
    model = load_quantized_model(path, compute_dtype=torch.float32)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # 2 B/weight, as on disk
    assert type(model.lm_head) is CastLinear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32  # small: stored in the compute dtype
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # recomputed, never on meta
    assert model.lorakit_load.storage == {"lm_head.weight": "bfloat16", "model.embed_tokens.weight": "bfloat16"}
    with torch.no_grad():
        assert model.model.embed_tokens(batch()).dtype == torch.float32
    as_compute = load_quantized_model(path, compute_dtype=torch.float32, storage_dtype=torch.float32)
    assert type(as_compute.lm_head) is nn.Linear and as_compute.lorakit_load.storage == {}
    _assert_same_model(as_compute, _reference(path), exact_dtypes=True)


def test_bf16_matmuls_in_an_fp32_model_and_the_precision_report(tmp_path):
    """matmul_dtype=bf16 (quant.compute_dtype auto on a CPU with AVX512-BF16): the same NF4 codes, layers that
    decode to bf16 for their matmuls, everything else as in the fp32 load; the report says so."""
    path = _save(tmp_path, "llama", torch.bfloat16)
    fp32 = load_quantized_model(path, compute_dtype=torch.float32)
    mixed = load_quantized_model(path, compute_dtype=torch.float32, matmul_dtype=torch.bfloat16)
    nf4 = [m for m in mixed.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 14 and {m.compute_dtype for m in nf4} == {torch.bfloat16}
    got, want = mixed.state_dict(), fp32.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = batch(seed=3, rows=2, length=11)
    a, b = _logits(mixed, ids), _logits(fp32, ids)
    assert a.dtype == torch.float32 and (a - b).norm() / b.norm() < 0.02  # bf16 rounding of the matmul inputs
    assert precision_report(mixed) == (
        f"4-bit base: 14 NF4 layers, {mixed.lorakit_load.nf4_bytes / 2**30:.2f} GiB, matmuls in bfloat16; kept as "
        "stored: lm_head.weight bfloat16, model.embed_tokens.weight bfloat16; everything else in float32")
    assert precision_report(build_tiny("llama")) is None


def test_bytes_reported(tmp_path):
    path = _save(tmp_path, "llama", torch.bfloat16)
    info = load_quantized_model(path).lorakit_load
    model = build_tiny("llama")
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    assert 0.5 * linear < info.nf4_bytes < 0.53 * linear  # ~0.516 B/weight
    embed_and_head = 2 * 2 * model.lm_head.weight.numel()  # two bf16 matrices
    norms = 4 * sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert info.other_bytes == embed_and_head + norms + buffers
    assert info.largest_tensor_bytes == 2 * model.lm_head.weight.numel()


@pytest.mark.parametrize("storage", [None, torch.float32])
def test_tied_embeddings_stay_tied(tmp_path, storage):
    path = _save(tmp_path, "llama", torch.bfloat16, tie_word_embeddings=True)
    assert not any("lm_head" in k for k in load_file(next(iter_shards(path))))  # saved once
    model = load_quantized_model(path, storage_dtype=storage)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same_model(model, _reference(path))


def iter_shards(path: str):
    from pathlib import Path

    yield from sorted(Path(path).glob("*.safetensors"))


def test_loss_and_lora_gradients_equal_the_reference(tmp_path):
    """The chunked loss takes the bf16 CastLinear head (cast once per step): same loss, same LoRA grads."""
    path = _save(tmp_path, "llama", torch.bfloat16)
    models = [load_quantized_model(path), _reference(path)]
    ids = batch(seed=4, rows=2, length=10)
    labels = ids.clone()
    labels[:, :3] = -100
    results = []
    for model in models:
        inject_lora(model, LoraConfig(r=4, dropout=0.0, target_modules="all-linear"))
        randomize_lora(model)
        loss = causal_lm_loss_sum(model, {"input_ids": ids}, labels)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_load_onto_cuda_equals_the_cpu_load_and_a_bf16_qlora_step_matches(tmp_path):
    """On CUDA the same loader streams onto the device (the allocator's peak within the advisor's load term),
    the codes are the CPU's, and a bf16 QLoRA step (train.dtype auto there) agrees with the fp32 CPU one."""
    path = _save(tmp_path, "llama", torch.bfloat16)
    cpu = load_quantized_model(path, compute_dtype=torch.float32)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gpu = load_quantized_model(path, compute_dtype=torch.bfloat16, device="cuda")
    info = gpu.lorakit_load
    assert torch.cuda.max_memory_allocated() - before <= streamed_load_peak_bytes(
        info.nf4_bytes, info.other_bytes, info.largest_tensor_bytes)
    assert all(t.device.type == "cuda" for t in [*gpu.parameters(), *gpu.buffers()])
    layers = {n: m for n, m in cpu.named_modules() if isinstance(m, NF4Linear)}
    assert layers and info.matmul_dtype == "bfloat16"
    for name, module in gpu.named_modules():
        if isinstance(module, NF4Linear):
            assert torch.equal(module.packed.cpu(), layers[name].packed), name  # the same rounding on every device
    ids = batch(seed=4, rows=2, length=10)
    losses, grads = [], []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        inject_lora(model, LoraConfig(r=4, dropout=0.0, target_modules="all-linear"))
        randomize_lora(model)
        model.to(device)
        loss = causal_lm_loss_sum(model, {"input_ids": ids.to(device)}, ids.to(device))
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.requires_grad]))
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.98


def test_classification_head_new_to_the_task_is_initialized(tmp_path):
    path = _save(tmp_path, "llama", torch.bfloat16)
    model = load_quantized_model(path, task="seq_cls", num_labels=3)
    reference = _reference(path, task="seq_cls")
    assert model.score.weight.shape == (3, 32) and model.score.weight.dtype == torch.float32
    assert model.score.weight.std() > 0 and model.config.pad_token_id is not None
    got, want = model.state_dict(), reference.state_dict()
    for key in want:
        if not key.startswith("score."):
            assert torch.equal(got[key].to(want[key].dtype), want[key]), key


def _rewrite_shard(path: str, key: str, change) -> str:
    """Apply `change(tensors)` to the shard holding `key`; returns that shard's file name."""
    index = json.loads((tmp := __import__("pathlib").Path(path) / "model.safetensors.index.json").read_text())
    shard = tmp.parent / index["weight_map"][key]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard.name


def test_missing_tensor_names_the_tensor_and_the_file(tmp_path):
    path = _save(tmp_path, "llama", torch.bfloat16)
    key = "model.layers.1.mlp.up_proj.weight"
    shard = _rewrite_shard(path, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"lists 1 tensors that are not in the shard.*{key}.*{shard}"):
        load_quantized_model(path)
    index_file = tmp_path / "llama-bfloat16-sharded" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][key]  # now the index agrees with the shards: the tensor is simply absent
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=rf"model.safetensors.index.json: the checkpoint has no tensor '{key}'"):
        load_quantized_model(path)


def test_wrong_shape_names_the_tensor_the_file_and_both_shapes(tmp_path):
    path = _save(tmp_path, "llama", torch.bfloat16)
    key = "model.layers.0.self_attn.k_proj.weight"  # (16, 32) with GQA 4/2

    def widen(tensors):
        tensors[key] = torch.zeros(32, 32, dtype=torch.bfloat16)

    shard = _rewrite_shard(path, key, widen)
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{key}' has shape \[32, 32\].*expects \[16, 32\]"):
        load_quantized_model(path)


def test_not_safetensors_and_not_a_directory(tmp_path, monkeypatch):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*pytorch_model.bin.*safetensors checkpoints only"):
        load_quantized_model(tmp_path / "old")

    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match=r"'org/model' is not a local directory.*no network.*hf auth login"):
        load_quantized_model("org/model")


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    path = _save(tmp_path, "qwen2", torch.bfloat16)
    calls = []

    def download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return path

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    model = load_quantized_model("org/tiny-qwen2", revision="abc123")
    assert calls == [("org/tiny-qwen2", "abc123", ["*.json", "*.safetensors"])]
    _assert_same_model(model, _reference(path))


def test_model_type_needing_weight_conversion_is_refused_clearly(tmp_path):
    config = tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=97, num_local_experts=2)
    tf.MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    with pytest.raises(ModelLoadError, match=r"model type 'mixtral'.*weight conversion.*load_model \+ quantize_model"):
        load_quantized_model(tmp_path / "mixtral")

