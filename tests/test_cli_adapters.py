"""`lorakit adapters list DIR` and `lorakit adapters check DIR --for vllm`, through cli.main."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny, randomize_lora
from lorakit import LoraConfig, inject_lora, save_lora_adapter
from lorakit.cli import main


@pytest.fixture
def adapters_dir(tmp_path):
    """runs/good: a clean r=8 Llama adapter with data hash and metrics; runs/deep/big: r=32 + a head."""
    good = build_tiny("llama")
    inject_lora(good, LoraConfig(r=8, target_modules="attention"))
    randomize_lora(good)
    save_lora_adapter(good, tmp_path / "runs" / "good",
                      metadata={"data_hash": "d41d8cd9", "metrics": {"eval_loss": 1.25}})
    big = build_tiny("llama_cls")
    inject_lora(big, LoraConfig(r=32, target_modules="minimal", modules_to_save=["score"]))
    save_lora_adapter(big, tmp_path / "runs" / "deep" / "big")
    return tmp_path / "runs"


def test_list_shows_base_rank_targets_data_hash_created_metrics(adapters_dir, capsys):
    assert main(["adapters", "list", str(adapters_dir)]) == 0
    out = capsys.readouterr().out
    good = out[out.index(str(adapters_dir / "good")):]
    assert "base=LlamaForCausalLM r=8 alpha=32 targets=k_proj,o_proj,q_proj,v_proj" in good
    assert "data_hash=d41d8cd9" in good and "metrics={'eval_loss': 1.25}" in good
    meta = json.loads((adapters_dir / "good" / "lorakit.json").read_text())
    assert f"created={meta['created']}" in good
    assert str(adapters_dir / "deep" / "big") in out and "r=32" in out  # nested directories are found


def test_list_json_and_empty_and_broken(adapters_dir, tmp_path, capsys):
    assert main(["adapters", "list", str(adapters_dir), "--json"]) == 0
    rows = {row["path"]: row for row in json.loads(capsys.readouterr().out)}
    good = rows[str(adapters_dir / "good")]
    assert good["r"] == 8 and good["data_hash"] == "d41d8cd9" and good["metrics"] == {"eval_loss": 1.25}
    assert good["targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and good["created"]
    (tmp_path / "empty").mkdir()
    assert main(["adapters", "list", str(tmp_path / "empty")]) == 0
    assert "no adapters (adapter_config.json) under" in capsys.readouterr().out
    (adapters_dir / "good" / "adapter_config.json").write_text("{broken")
    assert main(["adapters", "list", str(adapters_dir)]) == 0
    assert f"{adapters_dir / 'good'}: unreadable adapter_config.json" in capsys.readouterr().out


def test_check_for_vllm_reports_rank_and_extra_modules(adapters_dir, capsys):
    assert main(["adapters", "check", str(adapters_dir / "deep" / "big"), "--for", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "- rank 32 is above vLLM's default --max-lora-rank 16; start vLLM with --max-lora-rank 32" in out
    assert "- modules_to_save ['score'] (extra trainable modules) are rejected by vLLM" in out
    assert "non-LoRA tensors ['base_model.model.score.weight'] in the weights file" in out


def test_check_clean_adapter_and_missing_dir(adapters_dir, tmp_path, capsys):
    assert main(["adapters", "check", str(adapters_dir / "good")]) == 0  # --for defaults to vllm
    assert "no problems found for vllm" in capsys.readouterr().out
    assert main(["adapters", "check", str(tmp_path / "nope")]) == 1
    assert "adapter_config.json not found" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: only engines we know
        main(["adapters", "check", str(adapters_dir / "good"), "--for", "tgi"])
    assert "invalid choice: 'tgi'" in capsys.readouterr().err
