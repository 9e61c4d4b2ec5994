"""DoRA, PiSSA and LoftQ through the whole pipeline: config -> train -> saved adapter -> loaded again."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import save_tiny_base, write_text_data
from lorakit.config import load_run_config
from lorakit.models import load_base
from lorakit.train import train_lora


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def _config(base_dir, tmp_path, *overrides):
    data = write_text_data(tmp_path / "train.jsonl", n=32)
    return load_run_config(None, [
        f"base_model={base_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={data}", "data.eval_fraction=0.2",
        "data.max_seq_len=32", "data.packing=false", "data.dedup=false", "lora.r=4", "lora.alpha=8",
        "lora.dropout=0.1", "train.micro_batch_size=4", "train.grad_accum=1", "train.max_steps=8", "train.lr=1e-2",
        "train.log_every=1", "train.eval_every=null", "train.save_every=4", "train.warmup_ratio=0.0",
        "train.gradient_checkpointing=true", "eval.at_end=false", *overrides,
    ])


@pytest.mark.parametrize("overrides", [
    ["lora.use_dora=true"],
    ["method=qlora", "lora.use_dora=true"],
    ["lora.init=pissa"],
    ["lora.init=olora", "lora.use_dora=true"],
    ["method=qlora", "lora.init=loftq"],
], ids=["dora", "qdora", "pissa", "olora+dora", "loftq"])
def test_method_trains_and_its_saved_adapter_reproduces_the_model(base_dir, tmp_path, overrides, caplog):
    config = _config(base_dir, tmp_path, *overrides)
    with caplog.at_level(logging.WARNING):
        result = train_lora(config, progress=False)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    adapter = result.run_dir / "adapter"
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["use_dora"] is config.lora.use_dora
    converted = config.lora.init in ("pissa", "olora")
    assert peft_config["r"] == (8 if converted else 4)
    if config.lora.init == "loftq":
        assert "LoftQ (loftq_iter=1, r=4)" in caplog.text
    # what eval and generate do: the base as trained (NF4 for qlora, the ORIGINAL weights) + the saved adapter
    model, _ = load_base(str(base_dir), quant=config.quant if config.method == "qlora" else None, adapter=adapter)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
