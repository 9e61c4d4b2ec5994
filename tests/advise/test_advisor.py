"""lorakit.advise.advisor and report through the command line: JSON fields, the YAML config, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from advise_tiny import fixed_rates_fixture, llama3_8b_by_hand, predicted, run_config, tiny_dir_fixture  # noqa: F401

from lorakit.advise import memory_model
from lorakit.cli import main as cli_main
from lorakit.config import dump_yaml, load_run_config


def test_cli_json_has_the_numbers(tiny_dir, capsys):
    assert cli_main(["advise", "--model", tiny_dir, "--memory", "8GiB", "--device", "cpu",
                     "--examples", "1000", "--price-per-hour", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_available_bytes"] == 8 * 2**30
    assert isinstance(out["peak_memory_bytes"], int) and out["peak_memory_bytes"] > 0
    assert out["step_time_s"] > 0 and out["eval_time_s"] > 0 and out["evals"] >= 1
    assert out["total_time_s"] == pytest.approx(out["total_steps"] * out["step_time_s"] + out["evals"] * out["eval_time_s"])
    assert out["cost"] == pytest.approx(out["total_time_s"] / 3600 * 2)
    for term in ("weights", "lora_params", "optimizer_states", "activations", "logits_loss", "framework_overhead"):
        assert out["memory_terms"][term]["explanation"]
    assert {"forward", "backward", "optimizer_step", "eval", "save"} <= set(out["phases_bytes"])
    assert all(r["reason"] for r in out["recommendations"])


def test_cli_config_yaml_loads_back(tiny_dir, tmp_path, capsys):
    assert cli_main(["advise", "--model", tiny_dir, "--memory", "8GB", "--device", "cpu", "--task", "qa"]) == 0
    text = capsys.readouterr().out
    assert "Recommendations:" in text and "Memory (peak" in text and "Time:" in text
    yaml_text = text.split("Config (lorakit train config.yaml):\n", 1)[1]
    (tmp_path / "run.yaml").write_text(yaml_text)
    config = load_run_config(tmp_path / "run.yaml")
    assert config.base_model == tiny_dir and config.lora.r == 8 and config.lora.alpha == 16


def test_cli_predicts_a_given_config_as_is(tiny_dir, tmp_path, capsys):
    config = run_config(tiny_dir, gc=True)
    dump_yaml(config, tmp_path / "run.yaml")
    assert cli_main(["advise", "--config", str(tmp_path / "run.yaml"), "--memory", "8GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    w, shape = predicted(config, masked=True)
    assert out["peak_memory_bytes"] == memory_model(w, shape).peak_bytes
    assert load_run_config(tmp_path / "run.yaml") == config  # untouched


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "8B", "--memory", "abc"], "memory 'abc' is not a size"),
    (["--model", "8B", "--memory", "0GB"], "more than 0 bytes"),
    (["--model", "500B", "--memory", "24GB"], "no named family near 500B"),
    (["--model", "8B", "--memory", "24GB", "--task", "poetry"], "task 'poetry' is not one of"),
    (["--model", "8B", "--gpu", "RTX 9999"], "gpu 'RTX 9999' is not one of"),
])
def test_cli_bad_inputs_are_user_errors(args, message, capsys):
    assert cli_main(["advise", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_model_directory_without_config(tmp_path, capsys):
    assert cli_main(["advise", "--model", str(tmp_path), "--memory", "8GB"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_cli_8b_qlora_fits_a_24_gib_machine(capsys):
    """`lorakit advise --model 8B --memory 24GB --set method=qlora`: NF4 weights + bf16 embeddings and head +
    activations fit; the load (streamed) is not the peak, and the notes say what is streamed. (base_model=8B
    too: the CLI resolves the config's default base_model, the demo, even when --model replaces it.)"""
    hand = llama3_8b_by_hand()
    assert cli_main(["advise", "--model", "8B", "--memory", "24GB", "--set", "method=qlora", "--set", "base_model=8B",
                     "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["peak_memory_bytes"] <= 24 * 10**9 and out["peak_phase"] != "load"
    assert out["memory_terms"]["weights"]["bytes"] == hand["nf4"] + hand["unquantized"]
    assert out["phases_bytes"]["load"] < 7 * 2**30
    assert any("the QLoRA load is streamed" in note and "bfloat16" in note for note in out["notes"])
    assert {r["key"]: r["value"] for r in out["recommendations"]}["method"] == "qlora"


def test_the_advisor_knows_no_demo():
    """The built-in demo is an application of the library: entry points turn `base_model: demo` into its
    directory before they ask the advisor, which neither imports nor names it."""
    package = Path(sys.modules["lorakit.advise"].__file__).parent
    assert [p.name for p in package.glob("*.py") if "demo" in p.read_text(encoding="utf-8")] == []
