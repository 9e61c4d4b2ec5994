"""eval/canary.py's multiple-choice rows: option log-likelihoods against a float64 loop, accuracy, row checks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_tokenizer
from lorakit.config import EvalConfig
from lorakit.errors import DataError
from lorakit.eval import run_eval
from lorakit.eval.canary import canary_rows, completion_logprobs, option_accuracy


def tiny_model():
    import transformers as tf

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id, initializer_range=0.3)
    return tf.LlamaForCausalLM(config).float().eval(), tok


def test_option_logprobs_match_a_float64_loop():
    model, tok = tiny_model()
    rows = [{"prompt": "the cat sat on the", "completion": c} for c in ("mat", "red log", "a very big dog")]
    got = completion_logprobs(model, tok, rows, batch_size=2)  # padded batches
    for row, value in zip(rows, got, strict=True):
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
        expected = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(completion))
        assert value == pytest.approx(expected, abs=1e-4)


def test_multiple_choice_rows_are_answered_by_likelihood(tmp_path):
    model, tok = tiny_model()
    options = ["mat", "red log", "dog"]
    scores = completion_logprobs(model, tok, [{"prompt": "the cat sat on the", "completion": o} for o in options])
    best = scores.index(max(scores))
    path = tmp_path / "canary.jsonl"
    rows = [{"prompt": "the cat sat on the", "options": options, "answer": best},
            {"prompt": "the cat sat on the", "options": options, "answer": options[(best + 1) % 3]},  # by text
            {"prompt": "a dog ran", "completion": " fast"}]  # an open row beside them
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = canary_rows(EvalConfig(canary=str(path)))
    assert [r.get("answer") for r in loaded] == [best, (best + 1) % 3, None]
    assert loaded[0]["completion"] == options[best]  # the loss reads the correct option
    assert option_accuracy(model, tok, loaded) == 0.5
    report = run_eval(model, tok, EvalConfig(canary=str(path)), canary=loaded)
    assert report.base["canary_accuracy"] == 0.5 and "canary_loss" in report.base


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "q", "options": ["a"], "answer": 0}, "must be a list of >= 2 strings"),
    ({"prompt": "q", "options": ["a", "b"], "answer": 2}, "must be an option's index (0..1) or its text"),
    ({"prompt": "q", "options": ["a", "b"], "answer": "c"}, "got 'c'"),
    ({"prompt": "q"}, "an open row needs a \"completion\""),
    ({"text": "q"}, "needs a \"prompt\" string"),
])
def test_bad_canary_rows_name_the_row_and_the_fix(tmp_path, row, message):
    path = tmp_path / "canary.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "completion": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="row 1") as e:
        canary_rows(EvalConfig(canary=str(path)))
    assert message in str(e.value)
