"""PEFT-format adapter files: interop with PEFT both ways, metadata, and every load error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, build_tiny, logits, randomize_lora
from safetensors.torch import load_file

from lorakit import AdapterError, LoraConfig, inject_lora, load_lora_adapter, save_lora_adapter
from lorakit.adapters import base_fingerprint, check_adapter, export_merged, list_adapters

peft = pytest.importorskip("peft")

CASES = {
    "llama": dict(targets="all-linear", save=[]),
    "qwen2": dict(targets="attention", save=[]),
    "mistral": dict(targets="minimal", save=[]),
    "phi3": dict(targets="all-linear", save=[]),
    "gpt2": dict(targets="all-linear", save=[]),
    "bert_cls": dict(targets="all-linear", save=["classifier"]),
    "llama_cls": dict(targets="minimal", save=["score"]),
}


def _trained(kind, **kw):
    model = build_tiny(kind)
    case = CASES[kind]
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=case["targets"], modules_to_save=case["save"], **kw))
    randomize_lora(model)
    return model


@pytest.mark.parametrize("kind", list(CASES))
def test_lorakit_adapter_loads_in_peft_with_same_logits(kind, tmp_path):
    ours = _trained(kind)
    save_lora_adapter(ours, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(build_tiny(kind), tmp_path / "a").eval()
    ids = batch()
    torch.testing.assert_close(logits(ref, ids), logits(ours, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(CASES))
def test_peft_adapter_loads_in_lorakit_with_same_logits(kind, tmp_path):
    case = CASES[kind]
    is_cls = kind.endswith("_cls")
    ref_model = build_tiny(kind)
    from lorakit.lora import find_target_modules

    suffixes = sorted({n.rsplit(".", 1)[-1] for n in find_target_modules(ref_model, case["targets"])})
    ref = peft.get_peft_model(ref_model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=suffixes, modules_to_save=case["save"] or None,
        fan_in_fan_out=kind == "gpt2", task_type="SEQ_CLS" if is_cls else "CAUSAL_LM"))
    randomize_lora(ref)
    ref.save_pretrained(tmp_path / "p")
    ours = build_tiny(kind)
    load_lora_adapter(ours, tmp_path / "p")
    ids = batch()
    torch.testing.assert_close(logits(ours, ids), logits(ref.eval(), ids), rtol=0, atol=1e-5)


def test_files_keys_config_and_metadata(tmp_path):
    model = _trained("llama", use_rslora=True)
    save_lora_adapter(model, tmp_path / "a", metadata={"data_hash": "abc", "metrics": {"eval_loss": 1.5}},
                      chat_template="{{ messages }}")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 14
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is True and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    meta = json.loads((tmp_path / "a" / "lorakit.json").read_text())
    assert meta["base_model"] == base_fingerprint(build_tiny("llama"))
    assert meta["data_hash"] == "abc" and meta["lorakit_version"] and meta["created"]
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == "{{ messages }}"
    rows = list_adapters(tmp_path)
    assert rows[0]["r"] == 4 and rows[0]["data_hash"] == "abc" and rows[0]["metrics"] == {"eval_loss": 1.5}


def test_fingerprint_sees_through_wrappers_but_not_other_bases():
    plain = build_tiny("llama")
    adapted = _trained("llama")
    assert base_fingerprint(plain) == base_fingerprint(adapted)
    assert base_fingerprint(plain)["hash"] != base_fingerprint(build_tiny("qwen2"))["hash"]


def test_resave_is_atomic_and_replaces(tmp_path):
    model = _trained("llama")
    save_lora_adapter(model, tmp_path / "a")
    first = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    randomize_lora(model, seed=99)
    save_lora_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp leftovers


def test_crash_mid_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = _trained("llama")
    save_lora_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    import lorakit.adapters as adapters

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_lora_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    load_lora_adapter(build_tiny("llama"), tmp_path / "a")


def test_error_other_base(tmp_path):
    save_lora_adapter(_trained("llama"), tmp_path / "a")
    with pytest.raises(AdapterError, match=r"trained for base .* a different base model or revision"):
        load_lora_adapter(build_tiny("qwen2"), tmp_path / "a")


def test_error_wrong_shape_names_module_and_shapes(tmp_path):
    save_lora_adapter(_trained("llama"), tmp_path / "a")
    import transformers as tf

    wider = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=97))
    with pytest.raises(AdapterError) as e:
        load_lora_adapter(wider, tmp_path / "a", check_base=False)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj: expected lora_A (4, 64) and lora_B (64, 4) for this model, found (4, 32) and (32, 4)" in msg
    assert "another base or revision" in msg


def test_error_missing_module(tmp_path):
    save_lora_adapter(_trained("llama"), tmp_path / "a")
    import transformers as tf

    shallow = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=97))
    with pytest.raises(AdapterError, match=r"model.layers.1.self_attn.q_proj: no such linear layer in this model"):
        load_lora_adapter(shallow, tmp_path / "a", check_base=False)


def test_error_corrupt_and_missing_files(tmp_path):
    save_lora_adapter(_trained("llama"), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors is corrupt or truncated"):
        load_lora_adapter(build_tiny("llama"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"adapter_config.json is not valid JSON"):
        load_lora_adapter(build_tiny("llama"), tmp_path / "a")
    with pytest.raises(AdapterError, match=r"adapter_config.json not found"):
        load_lora_adapter(build_tiny("llama"), tmp_path / "nothing")
    weights.unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"pickle")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with pytest.raises(AdapterError, match=r"a pickle, which lorakit never loads"):
        load_lora_adapter(build_tiny("llama"), tmp_path / "a")


def test_check_for_vllm(tmp_path):
    model = build_tiny("llama_cls")
    inject_lora(model, LoraConfig(r=32, modules_to_save=["score"]))
    save_lora_adapter(model, tmp_path / "a")
    problems = check_adapter(tmp_path / "a", "vllm")
    assert any("rank 32 is above vLLM's default --max-lora-rank 16" in p for p in problems)
    assert any("modules_to_save ['score']" in p for p in problems)
    save_lora_adapter(_trained("llama"), tmp_path / "b")
    assert check_adapter(tmp_path / "b", "vllm") == []


def test_export_merged_is_a_plain_transformers_model(tmp_path):
    import transformers as tf

    model = _trained("llama")
    ids = batch()
    expected = logits(model, ids)
    export_merged(model, tmp_path / "merged")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
