"""prepare_data end to end (truncation, dropping, stats) and `lorakit data inspect` through the CLI."""

from __future__ import annotations

import json
import logging

import pytest
from families import family_tokenizer, supervised_runs

from lorakit.cli import main
from lorakit.config import DataConfig
from lorakit.data import DataError, inspect_data, prepare_data

QUESTION = " ".join(f"What is {i} plus {i}?" for i in range(8))  # ~50 tokens of prompt


def chat_row(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(train: str, **kw) -> DataConfig:
    return DataConfig(train=train, **{"eval_fraction": 0.0, **kw})


def test_prepare_data_renders_with_the_tokenizers_own_template(tmp_path) -> None:
    tokenizer = family_tokenizer("gemma")
    rows = [chat_row("Hello world, how are you today?", "I am fine, thank you."), {"text": "The cat sat on the mat."},
            {"instruction": "What is two plus two?", "output": "Two plus two is four."}]
    data = prepare_data(config(write_jsonl(tmp_path / "t.jsonl", rows)), tokenizer)
    assert data.chat_template == tokenizer.chat_template and data.eval == []
    assert [supervised_runs(tokenizer, e.input_ids, e.labels) for e in data.train] == [
        ["I am fine, thank you.<end_of_turn>"], ["The cat sat on the mat.<eos>"], ["Two plus two is four.<end_of_turn>"]]
    s = data.stats
    assert (s["rows_read"], s["train_rows"], s["eval_rows"], s["split"]) == (3, 3, 0, "no eval set")
    assert s["tokens"] == sum(len(e) for e in data.train) and 0 < s["supervised_fraction"] < 1
    assert s["length_percentiles"]["max"] == max(len(e) for e in data.train) and s["packed_rows"] == 1
    assert len(s["data_hash"]) == 16


def test_train_on_all(tmp_path) -> None:
    tokenizer = family_tokenizer("qwen2")
    data = prepare_data(config(write_jsonl(tmp_path / "t.jsonl", [chat_row("Hi?", "Hello.")]), train_on="all"), tokenizer)
    assert data.train[0].labels == data.train[0].input_ids and data.stats["supervised_fraction"] == 1.0


def test_truncation_is_counted(tmp_path) -> None:
    tokenizer = family_tokenizer("qwen2")
    rows = [{"text": " ".join(f"The cat {i} sat on mat {i}." for i in range(k))} for k in (1, 4, 8)]
    lengths = [len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows]  # + EOS
    data = prepare_data(config(write_jsonl(tmp_path / "t.jsonl", rows), max_seq_len=20), tokenizer)
    assert [len(e) for e in data.train] == [min(n, 20) for n in lengths]
    assert data.stats["train"]["truncated"] == sum(n > 20 for n in lengths) == 2
    assert data.stats["train"]["tokens_lost_to_truncation"] == sum(max(0, n - 20) for n in lengths)
    dropped = prepare_data(config(write_jsonl(tmp_path / "t.jsonl", rows), max_seq_len=20, truncation="drop"), tokenizer)
    assert [len(e) for e in dropped.train] == [lengths[0]]
    assert dropped.stats["train"]["dropped_too_long"] == 2 and dropped.stats["train"]["truncated"] == 0


def test_examples_left_without_supervision_are_dropped_and_counted(tmp_path, caplog) -> None:
    tokenizer = family_tokenizer("llama-3")
    rows = [chat_row("Hi?", "Hello."), chat_row(QUESTION, "Four."), chat_row(QUESTION, "Six."), chat_row("Hey?", "Hi.")]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lorakit.data"):
        data = prepare_data(config(path, max_seq_len=24, dedup=False), tokenizer)
    assert len(data.train) == 2 and all(e.supervised() > 0 for e in data.train)
    stats = data.stats["train"]
    assert stats["dropped_no_supervised_tokens"] == 2 and stats["dropped_examples"] == [f"{path}:2", f"{path}:3"]
    assert f"dropped 2 examples with no supervised token after truncation (e.g. {path}:2" in caplog.text
    only_long = write_jsonl(tmp_path / "long.jsonl", rows[1:3])
    with pytest.raises(DataError, match="no training example has a supervised token left.*raise data.max_seq_len"):
        prepare_data(config(only_long, max_seq_len=24, dedup=False), tokenizer)


def test_a_split_leaving_no_training_rows_is_an_error(tmp_path) -> None:
    from lorakit.data.split import in_eval

    text = next(t for t in (f"row {i}" for i in range(100)) if in_eval(t, 0.5, 0))
    with pytest.raises(DataError, match=r"put all 1 rows in the eval set \(data.eval_fraction=0.5\)"):
        prepare_data(config(write_jsonl(tmp_path / "t.jsonl", [{"text": text}]), eval_fraction=0.5), family_tokenizer("qwen2"))


def test_inspect_data_marks_supervised_tokens(tmp_path) -> None:
    tokenizer = family_tokenizer("qwen2")
    path = write_jsonl(tmp_path / "t.jsonl", [chat_row("Hi?", "Hello."), chat_row("And you?", "Fine.")])
    out = inspect_data(config(path), tokenizer, n=1)
    assert "<|im_start|>assistant\n⟦Hello.<|im_end|>⟧\n" in out and "Fine." not in out.split("--- statistics")[0]
    assert f"--- example 0 ({path}:1," in out


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def run_config(tmp_path):
    """A run config whose base_model is a local directory holding only a (Qwen2-style) tokenizer."""
    family_tokenizer("qwen2").save_pretrained(tmp_path / "model")
    rows = [chat_row("What is two plus two?", "Two plus two is four."), {"text": "The cat sat on the mat."},
            {"prompt": "Hello world,", "completion": " how are you today?"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    path = tmp_path / "run.yaml"
    path.write_text(f"base_model: {tmp_path / 'model'}\noutput_dir: {tmp_path / 'run'}\n"
                    f"data:\n  train: {train}\n  eval_fraction: 0.0\n  max_seq_len: 64\n")
    return path


def test_cli_data_inspect_prints_marked_examples_and_stats(run_config, capsys) -> None:
    assert main(["data", "inspect", str(run_config), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "First 2 training examples as the model sees them" in out
    assert "<|im_start|>assistant\n⟦Two plus two is four.<|im_end|>⟧" in out
    assert "⟦The cat sat on the mat.<|im_end|>⟧" in out and "how are you" not in out.split("--- statistics")[0]
    stats = json.loads(out.split("--- statistics\n", 1)[1])
    assert stats["rows_read"] == 3 and stats["train"]["examples"] == 3


def test_cli_data_inspect_json(run_config, capsys) -> None:
    assert main(["data", "inspect", str(run_config), "--json", "--set", "data.train_on=all"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"stats", "examples"} and report["stats"]["train"]["examples"] == 3
    tokenizer = family_tokenizer("qwen2")
    for ex in report["examples"]:
        assert {"input_ids", "labels", "text"} <= set(ex)
        assert ex["labels"] == ex["input_ids"]  # train_on=all, from --set
        assert ex["text"] == tokenizer.decode(ex["input_ids"])
    assert report["examples"][2]["text"] == "Hello world, how are you today?<|im_end|>"


def test_cli_bad_data_file_exits_2_with_the_message_and_no_traceback(run_config, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert main(["data", "inspect", str(run_config), "--set", f"data.train={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: not valid JSON") and "Traceback" not in err
