"""PEFT-format adapter files: interop with PEFT both ways, metadata, and every load error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import batch, build_tiny, logits, randomize_lora, tiny_qlora_some_targets
from lorakit import (
    AdapterError,
    LoraConfig,
    QuantConfig,
    adapter_rows,
    inject_lora,
    load_lora_adapter,
    quantize_model,
    save_lora_adapter,
    set_adapter,
)
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
        r=4, lora_alpha=8, target_modules=suffixes, modules_to_save=list(case["save"]) or None,  # a copy: PEFT appends to it
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


def test_fingerprint_ignores_what_training_and_loading_change(tmp_path):
    """A classifier's first forward with labels sets config.problem_type; the saved adapter must still
    load on a fresh copy of the base."""
    model = _trained("bert_cls")
    model.train()
    model(input_ids=batch(), labels=torch.tensor([0, 2])).loss.backward()
    assert model.config.problem_type == "single_label_classification"
    model.config.architectures = ["BertForSequenceClassification"]  # what save_pretrained writes
    save_lora_adapter(model, tmp_path / "a")
    load_lora_adapter(build_tiny("bert_cls"), tmp_path / "a")


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


def assert_export_reloads_with_same_logits(model: torch.nn.Module, directory) -> None:
    """export_merged writes a plain transformers model that computes what the adapted model computed."""
    import transformers as tf

    ids = batch()
    expected = logits(model, ids)
    export_merged(model, directory)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(directory).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_export_merged_is_a_plain_transformers_model(tmp_path):
    model = _trained("llama")
    assert_export_reloads_with_same_logits(model, tmp_path / "merged")


# --------------------------------------------------------------------------- more interop


def test_rslora_and_gaussian_adapters_round_trip_with_peft(tmp_path):
    ours = _trained("mistral", use_rslora=True, init="gaussian")
    save_lora_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["init_lora_weights"] == "gaussian"
    assert config["lora_alpha"] == 8 and isinstance(config["lora_alpha"], int)  # what vLLM's PEFTHelper types
    ids = batch()
    ref = peft.PeftModel.from_pretrained(build_tiny("mistral"), tmp_path / "a").eval()
    torch.testing.assert_close(logits(ref, ids), logits(ours, ids), rtol=0, atol=1e-5)
    ref.save_pretrained(tmp_path / "p")  # and PEFT's own rsLoRA file back into lorakit
    back = build_tiny("mistral")
    load_lora_adapter(back, tmp_path / "p")
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_qlora_adapter_loads_on_the_full_precision_base(kind, tmp_path):
    """An adapter trained on the 4-bit base fits the full-precision base (same fingerprint, biases
    included), in lorakit and in PEFT; GPT-2's file says fan_in_fan_out, as PEFT writes it."""
    quantized = build_tiny(kind)
    quantize_model(quantized, QuantConfig(), compute_dtype=torch.float32, progress=False)
    inject_lora(quantized, LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_lora(quantized)
    save_lora_adapter(quantized, tmp_path / "a")
    assert base_fingerprint(quantized) == base_fingerprint(build_tiny(kind))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    ours = build_tiny(kind)
    load_lora_adapter(ours, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(build_tiny(kind), tmp_path / "a").eval()
    ids = batch()
    torch.testing.assert_close(logits(ref, ids), logits(ours, ids), rtol=0, atol=1e-5)
    again = build_tiny(kind)  # and back onto a 4-bit base, as `lorakit eval` loads it
    quantize_model(again, QuantConfig(), compute_dtype=torch.float32, progress=False)
    load_lora_adapter(again, tmp_path / "a")
    assert torch.equal(logits(again, ids), logits(quantized, ids))


def test_two_adapters_saved_and_loaded_by_name(tmp_path):
    model = build_tiny("llama_cls")
    inject_lora(model, LoraConfig(r=4, dropout=0.0, modules_to_save=["score"]), "a")
    inject_lora(model, LoraConfig(r=2, dropout=0.0, target_modules="minimal", modules_to_save=[]), "b")
    randomize_lora(model)  # b's factors (the active adapter)
    set_adapter(model, "a")
    randomize_lora(model, seed=8)  # a's factors and its head copy
    save_lora_adapter(model, tmp_path / "a", adapter_name="a")
    save_lora_adapter(model, tmp_path / "b", adapter_name="b")
    keys_b = set(load_file(tmp_path / "b" / "adapter_model.safetensors"))
    assert len(keys_b) == 2 * 4 and "base_model.model.score.weight" not in keys_b
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["modules_to_save"] is None
    assert "base_model.model.score.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    fresh = build_tiny("llama_cls")
    load_lora_adapter(fresh, tmp_path / "a", adapter_name="a")
    with pytest.raises(AdapterError, match=r"carries no classification head \(no classifier/score weights"):
        load_lora_adapter(fresh, tmp_path / "b", adapter_name="b")
    load_lora_adapter(fresh, tmp_path / "b", adapter_name="b", require_head=False)  # b predicts with the base's head
    ids = batch(rows=2)
    with adapter_rows(model, ["a", "b"]):  # row 0: a's LoRA and head; row 1: b's LoRA and the base's head
        want = logits(model, ids)
    set_adapter(model, "a")
    torch.testing.assert_close(want[0], logits(model, ids[:1])[0], rtol=0, atol=1e-6)
    with adapter_rows(fresh, ["a", "b"]):
        torch.testing.assert_close(logits(fresh, ids), want, rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match=r"no adapter named 'c' on this model; adapters here: \['a', 'b'\]"):
        save_lora_adapter(fresh, tmp_path / "c", adapter_name="c")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_export_merged_qlora_reloads_as_plain_transformers_model(kind, tmp_path):
    """Targets that cover only some layers: every 4-bit layer is dequantized, GPT-2 keeps Conv1D."""
    model = tiny_qlora_some_targets(kind)
    assert_export_reloads_with_same_logits(model, tmp_path / "merged")


# --------------------------------------------------------------------------- more errors


def test_error_wrong_head_shape_names_parameter_and_shapes(tmp_path):
    save_lora_adapter(_trained("bert_cls"), tmp_path / "a")
    import transformers as tf

    config = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=97, max_position_embeddings=128, num_labels=2)
    two_labels = tf.BertForSequenceClassification(config)
    with pytest.raises(AdapterError, match=r"classifies into 3 labels \['LABEL_0', 'LABEL_1', 'LABEL_2'\], but this "
                                           r"BertForSequenceClassification has num_labels=2; load the base with num_labels=3"):
        load_lora_adapter(two_labels, tmp_path / "a")  # before the fingerprint, which the head's shape also changes
    (tmp_path / "a" / "lorakit.json").unlink()  # as PEFT saves it: the shapes tell
    with pytest.raises(AdapterError) as e:
        load_lora_adapter(two_labels, tmp_path / "a")
    assert "classifier.weight: expected shape (2, 32), found (3, 32)" in str(e.value)
    assert "classifier.bias: expected shape (2,), found (3,)" in str(e.value)


def test_error_rank_in_config_disagrees_with_weights(tmp_path):
    save_lora_adapter(_trained("llama"), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))
    with pytest.raises(AdapterError) as e:
        load_lora_adapter(build_tiny("llama"), tmp_path / "a")
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj: expected lora_A (8, 32) and lora_B (32, 8) for this model, found (4, 32) and (32, 4)" in msg
    assert "adapter_config.json and adapter_model.safetensors do not belong together" in msg


def test_error_weights_without_lora_tensors_or_with_half_a_pair(tmp_path):
    save_lora_adapter(_trained("llama"), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({"base_model.model.lm_head.weight": torch.zeros(97, 32)}, str(weights))
    with pytest.raises(AdapterError, match=r"holds no lora_A/lora_B tensors .* not a LoRA adapter"):
        load_lora_adapter(build_tiny("llama"), tmp_path / "a")
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match=r"model.layers.0.self_attn.q_proj has lora_A but not its pair"):
        load_lora_adapter(build_tiny("llama"), tmp_path / "a")


def test_error_corrupt_metadata_is_named_and_listed(tmp_path):
    save_lora_adapter(_trained("llama"), tmp_path / "a")
    (tmp_path / "a" / "lorakit.json").write_text("{oops")
    with pytest.raises(AdapterError, match=r"lorakit.json is not valid JSON .* delete lorakit.json to load it as a plain PEFT"):
        load_lora_adapter(build_tiny("llama"), tmp_path / "a")
    (row,) = list_adapters(tmp_path)
    assert "lorakit.json is not valid JSON" in row["error"]
    (tmp_path / "a" / "lorakit.json").unlink()
    load_lora_adapter(build_tiny("llama"), tmp_path / "a")  # a plain PEFT adapter now


def test_check_for_vllm_rank_choices_and_other_rejections(tmp_path):
    model = build_tiny("gpt2")
    inject_lora(model, LoraConfig(r=24))
    save_lora_adapter(model, tmp_path / "a")
    problems = check_adapter(tmp_path / "a")
    assert any("rank 24 is above vLLM's default --max-lora-rank 16; start vLLM with --max-lora-rank 32" in p for p in problems)
    assert any("fan_in_fan_out (GPT-2 Conv1D)" in p for p in problems)
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 1024, "bias": "all"}))
    problems = check_adapter(tmp_path / "a")
    assert any("rank 1024 is above the largest --max-lora-rank vLLM accepts (512)" in p for p in problems)
    assert any("bias='all'" in p for p in problems)
    assert "adapter_config.json not found" in check_adapter(tmp_path / "missing")[0]
    with pytest.raises(ValueError, match=r"check_adapter target must be one of vllm; got 'tgi'"):
        check_adapter(tmp_path / "a", "tgi")
