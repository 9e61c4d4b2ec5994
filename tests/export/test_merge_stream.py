"""Shard-streamed merge against the in-memory merge (`export_merged`), tensor for tensor and in logits."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from conftest import batch, build_tiny, randomize_lora
from lorakit.adapters import export_merged, load_lora_adapter, save_lora_adapter
from lorakit.config import LoraConfig, QuantConfig
from lorakit.errors import AdapterError
from lorakit.export.merge_stream import merge_adapter_streaming
from lorakit.lora import inject_lora
from lorakit.models import load_model
from lorakit.quant import quantize_model


def _base(tmp_path, kind: str, dtype: torch.dtype = torch.bfloat16) -> str:
    model = build_tiny(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    path = tmp_path / f"base-{kind}"
    model.to(dtype).save_pretrained(path, max_shard_size="30KB")
    return str(path)


def _adapter(tmp_path, base: str, targets, task: str = "causal_lm", save=()) -> str:
    model = load_model(base, task, torch.float32)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets, modules_to_save=list(save)))
    randomize_lora(model)
    return str(save_lora_adapter(model, tmp_path / "adapter"))


def _in_memory(tmp_path, base: str, adapter: str, nf4: bool, task: str = "causal_lm") -> str:
    model = load_model(base, task, torch.bfloat16)
    if nf4:
        quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    load_lora_adapter(model, adapter)
    return str(export_merged(model, tmp_path / "in-memory"))


def _tensors(path: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out |= load_file(file)
    return out


def _assert_same(streamed: str, reference: str, task: str = "causal_lm") -> None:
    got, want = _tensors(streamed), _tensors(reference)
    if "lm_head.weight" in got and "lm_head.weight" not in want:  # a tied head saved once by transformers
        assert torch.equal(got.pop("lm_head.weight"), want["model.embed_tokens.weight"])
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    cls = tf.AutoModelForCausalLM if task == "causal_lm" else tf.AutoModelForSequenceClassification
    models = [cls.from_pretrained(p, dtype=torch.bfloat16).eval() for p in (streamed, reference)]
    ids = batch(seed=5)
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in models]
    assert torch.equal(*logits)


@pytest.mark.parametrize("base_kind", ["full", "nf4"])
def test_llama_merge_equals_in_memory(tmp_path, base_kind):
    base = _base(tmp_path, "llama")
    adapter = _adapter(tmp_path, base, "all-linear")
    out = merge_adapter_streaming(base, adapter, tmp_path / "streamed", base=base_kind)
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    _assert_same(str(out), _in_memory(tmp_path, base, adapter, nf4=base_kind == "nf4"))
    assert not torch.equal(_tensors(str(out))["model.layers.0.mlp.up_proj.weight"],
                           _tensors(base)["model.layers.0.mlp.up_proj.weight"])  # the merge changed something


def test_gpt2_conv1d_and_unadapted_4bit_layers(tmp_path):
    """Conv1D weights are (in, out); with base="nf4" the 4-bit layers without an adapter are dequantized too."""
    base = _base(tmp_path, "gpt2")
    adapter = _adapter(tmp_path, base, "minimal")  # c_attn only: c_proj, c_fc carry no adapter
    out = merge_adapter_streaming(base, adapter, tmp_path / "streamed", base="nf4")
    _assert_same(str(out), _in_memory(tmp_path, base, adapter, nf4=True))


def test_trained_head_the_base_lacks_goes_to_an_extra_shard(tmp_path):
    base = _base(tmp_path, "llama")
    adapter = _adapter(tmp_path, base, "minimal", task="seq_cls", save=["score"])
    out = merge_adapter_streaming(base, adapter, tmp_path / "streamed", task="seq_cls")
    assert (out / "model-lorakit-trained.safetensors").is_file()
    want = _in_memory(tmp_path, base, adapter, nf4=False, task="seq_cls")
    got, ref = _tensors(str(out)), _tensors(want)
    got.pop("lm_head.weight")  # the causal-LM base's head stays in the files; the classifier ignores it
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    models = [tf.AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.bfloat16).eval()
              for p in (out, want)]
    with torch.no_grad():
        assert torch.equal(*[m(input_ids=batch(seed=6)).logits for m in models])


def test_adapter_for_another_base_leaves_the_previous_output(tmp_path):
    base = _base(tmp_path, "llama")
    adapter = _adapter(tmp_path, base, "all-linear")
    out = merge_adapter_streaming(base, adapter, tmp_path / "streamed")
    before = _tensors(str(out))
    other = _base(tmp_path, "gpt2")
    with pytest.raises(AdapterError, match=r"adapts \['model.layers.0.mlp.down_proj'.*another base model"):
        merge_adapter_streaming(other, adapter, tmp_path / "streamed", force=True)  # refused even when forced
    after = _tensors(str(out))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
