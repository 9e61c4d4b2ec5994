"""evaluate.py: metrics against hand-computed values, eval_loss against float64, base vs tuned, canary."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, build_tiny
from lorakit.demo import DEMO_SCHEMA, demo_canary, demo_eval_settings, resolve_demo
from lorakit.eval import (
    EvalReport,
    EvalSettings,
    accuracy,
    canary_check,
    check_thresholds,
    compare,
    eval_classifier,
    eval_loss,
    exact_match,
    json_valid,
    lcs_length,
    macro_f1,
    markdown_table,
    normalize_answer,
    parse_thresholds,
    predicted_label,
    prompts_from_examples,
    prompts_from_rows,
    rouge_l,
    run_eval,
    schema_errors,
    schema_valid,
    score_generations,
    token_f1,
)
from lorakit.generate import GenerationConfig
from lorakit.lora import lora_layers
from test_demo import chat_batches, load_demo, read_jsonl, train_adapter, trained_demo

# --------------------------------------------------------------------------- text metrics


def test_normalized_exact_match():
    assert normalize_answer("  The Cat, sat   on a MAT! ") == "cat sat on mat"
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match('{"sentiment": "positive"}', ' {"Sentiment": "positive"}.') == 1.0
    assert exact_match('{"sentiment":"positive"}', '{"sentiment": "positive"}') == 0.0  # SQuAD deletes punctuation
    assert exact_match("a dog", "cat") == 0.0


def test_token_f1_by_hand():
    # normalized: "cat sat on mat" vs "cat is on mat": 3 shared tokens, P = R = 3/4
    assert token_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.75)
    # "cat cat dog" vs "cat": shared = min(2, 1) = 1; P = 1/3, R = 1 -> F = 0.5
    assert token_f1("cat cat dog", "cat") == pytest.approx(0.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "cat") == 0.0


def test_rouge_l_by_hand():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = "the cat on the mat" (5 of 6 each)
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2; P = 2/3, R = 2/2 -> F = 0.8
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)
    assert rouge_l("x", "y") == 0.0 and rouge_l("", "y") == 0.0


def test_json_validity_and_schema():
    assert json_valid('{"a": 1}') and json_valid(' {"a": 1}\n') and json_valid("[1, 2]")
    assert not json_valid('Sure: {"a": 1}') and not json_valid('```json\n{"a": 1}\n```') and not json_valid("{'a': 1}")
    assert schema_errors({"sentiment": "positive"}, DEMO_SCHEMA) == []
    assert schema_errors({"sentiment": "meh"}, DEMO_SCHEMA) == ["$.sentiment: 'meh' is not one of ['positive', 'negative']"]
    assert schema_errors({}, DEMO_SCHEMA) == ["$: missing required key 'sentiment'"]
    assert schema_errors(["positive"], DEMO_SCHEMA)[0].startswith("$: expected object, got list")
    assert schema_errors({"sentiment": 3}, DEMO_SCHEMA)[0].startswith("$.sentiment: expected string")
    schema = {"type": "array", "items": {"type": ["integer", "null"]}}
    assert schema_errors([1, None, 2], schema) == []
    assert schema_errors([1, True, 2.5], schema) == ["$[1]: expected integer or null, got bool True",
                                                     "$[2]: expected integer or null, got float 2.5"]
    assert schema_valid('{"sentiment": "negative"}', DEMO_SCHEMA)
    assert not schema_valid('{"sentiment": "negative"', DEMO_SCHEMA)  # invalid JSON is never compliant


def test_accuracy_and_macro_f1_by_hand():
    preds, labels = ["a", "a", "b", "c"], ["a", "b", "b", "c"]
    assert accuracy(preds, labels) == 0.75
    # a: tp1 fp1 fn0 -> 2/3; b: tp1 fp0 fn1 -> 2/3; c: 1 -> mean 7/9
    assert macro_f1(preds, labels) == pytest.approx(7 / 9)
    # an invalid answer is a miss for its class (a: F1 0), not a class of its own
    assert macro_f1(["<invalid>", "b"], ["a", "b"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equally many"):
        accuracy(["a"], ["a", "b"])


def test_score_generations_by_hand():
    refs = ['{"sentiment": "positive"}', '{"sentiment": "negative"}', '{"sentiment": "negative"}']
    preds = ['{"sentiment": "positive"}', '{"sentiment": "positive"}', "Thank you for your review."]
    scores = score_generations(preds, refs, schema=DEMO_SCHEMA, label_key="sentiment")
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["json_valid"] == pytest.approx(2 / 3) and scores["schema_valid"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(1 / 3)
    # positive: tp1 fp1 fn0 -> 2/3; negative: tp0 fn2 -> 0
    assert scores["macro_f1"] == pytest.approx(1 / 3)
    # token F1: 1, then "sentiment positive" vs "sentiment negative" = 1/2, then 0
    assert scores["token_f1"] == pytest.approx(0.5)
    assert predicted_label(preds[2], "sentiment") == "<invalid>"
    plain = score_generations(["Paris", "berlin"], ["Paris.", "Rome"], labels=["paris", "rome"])
    assert "json_valid" not in plain and plain["accuracy"] == 0.5 and plain["exact_match"] == 0.5


# --------------------------------------------------------------------------- loss


def lm_batch(seed: int, rows: int, length: int, pad_to: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with a masked prompt part; labels -100 on prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, pad_to), generator=g)
    mask = torch.zeros(rows, pad_to, dtype=torch.long)
    labels = torch.full((rows, pad_to), -100)
    for r in range(rows):
        n = length - r
        mask[r, :n] = 1
        labels[r, 3:n] = ids[r, 3:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def oracle_loss(model, batches) -> float:
    """Mean CE over every supervised token of every batch, in float64.

    use_cache=False as in training: transformers separates packed documents by their position_ids only
    without a cache (with one, a row of two documents attends across the boundary)."""
    model = copy.deepcopy(model).double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            logp = model(**inputs, use_cache=False).logits.log_softmax(-1)[:, :-1]
            target = b["labels"][:, 1:]
            keep = target != -100
            total -= logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].sum().item()
            count += int(keep.sum())
    return total / count


def test_eval_loss_is_token_weighted_and_matches_float64():
    model = build_tiny("llama")
    model.config.attention_dropout = 0.5  # dropout would change the loss if eval mode were not set
    model.train()
    batches = [lm_batch(1, 3, 12, 14), lm_batch(2, 2, 7, 9)]  # different token counts per batch
    result = eval_loss(model, batches)
    assert result["loss"] == pytest.approx(oracle_loss(model, batches), rel=1e-6)
    assert result["tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert model.training  # restored for the training loop
    mean_of_means = sum(eval_loss(model, [b])["loss"] for b in batches) / 2
    assert abs(mean_of_means - result["loss"]) > 1e-4  # not a mean of per-batch means


def test_eval_loss_passes_position_ids_of_packed_rows():
    model = build_tiny("llama")
    batch = lm_batch(3, 1, 10, 10)
    batch.pop("attention_mask")
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])  # two documents in one row
    assert eval_loss(model, iter([batch]))["loss"] == pytest.approx(oracle_loss(model, [batch]), rel=1e-6)


def test_eval_loss_classification_and_classifier_metrics():
    model = build_tiny("llama_cls")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, VOCAB, (4, 6), generator=g), "labels": torch.tensor([0, 1, 2, 1])},
               {"input_ids": torch.randint(3, VOCAB, (2, 6), generator=g), "labels": torch.tensor([2, 0])}]
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"]).logits for b in batches]).double()
    labels = torch.cat([b["labels"] for b in batches])
    expected = F.cross_entropy(logits, labels).item()
    assert eval_loss(model, batches)["loss"] == pytest.approx(expected, rel=1e-6)
    scores = eval_classifier(model, batches)
    preds = logits.argmax(-1).tolist()
    assert scores["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert scores["accuracy"] == accuracy(preds, labels.tolist())
    assert scores["macro_f1"] == pytest.approx(macro_f1(preds, labels.tolist()))


def test_eval_loss_without_supervised_tokens_is_an_error():
    batch = lm_batch(1, 2, 5, 5)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no supervised tokens"):
        eval_loss(build_tiny("llama"), [batch])


# --------------------------------------------------------------------------- report, canary, fail-below


def test_compare_markdown_json_and_chart(tmp_path):
    base = {"eval_loss": 2.0, "perplexity": math.exp(2.0), "exact_match": 0.1, "json_valid": 0.0}
    tuned = {"eval_loss": 0.5, "perplexity": math.exp(0.5), "exact_match": 0.9, "json_valid": 1.0}
    rows = compare(base, tuned)
    assert [(r.metric, r.delta) for r in rows][2:] == [("exact_match", pytest.approx(0.8)), ("json_valid", 1.0)]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| metric | base | tuned | delta |"
    assert table[2] == "| eval_loss ↓ | 2.0000 | 0.5000 | -1.5000 |"
    report = EvalReport(base, tuned, canary_check(1.0, 1.02), [{"prompt": "p", "reference": "r", "base": "b", "tuned": "t"}])
    paths = report.save(tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["tuned"]["exact_match"] == 0.9 and saved["canary"]["degraded"] is False
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| exact_match | 0.1000 | 0.9000 | +0.8000 |" in paths["markdown"].read_text()
    assert "ok: canary perplexity" in report.markdown
    assert [r.tuned for r in compare(base, None)] == [None] * 4  # base only (no adapter)


def test_canary_check_by_hand():
    # ppl ratio = exp(1.2 - 1.0) = 1.2214 -> +22.1% > 10%
    flagged = canary_check(1.0, 1.2, max_increase=0.10)
    assert flagged.increase == pytest.approx(math.exp(0.2) - 1) and flagged.degraded
    assert flagged.base_perplexity == pytest.approx(math.e) and "FORGETTING" in flagged.message()
    assert not canary_check(1.0, 1.09, 0.10).degraded  # +9.4%
    assert not canary_check(1.0, 0.5, 0.10).degraded  # better is never flagged


def test_fail_below_thresholds():
    assert parse_thresholds(["exact_match=0.8", "json_valid=1"]) == {"exact_match": 0.8, "json_valid": 1.0}
    for bad, message in [("exact_match", "METRIC=VALUE"), ("exact_match=high", "METRIC=VALUE"),
                         ("exactmatch=0.5", "unknown metric"), ("eval_loss=1.0", "lower-is-better")]:
        with pytest.raises(ValueError, match=message):
            parse_thresholds([bad])
    scores = {"exact_match": 0.75, "json_valid": 1.0, "accuracy": float("nan")}
    assert check_thresholds(scores, ["json_valid=1.0", "exact_match=0.7"]) == []
    failures = check_thresholds(scores, ["exact_match=0.8", "accuracy=0.5", "schema_valid=0.9"])
    assert failures[0] == "exact_match = 0.7500 is below the required 0.8"
    assert "accuracy = nan" in failures[1] and "schema_valid was not computed" in failures[2]
    report = EvalReport({"exact_match": 0.0}, {"exact_match": 0.9}, canary_check(1.0, 2.0))
    assert report.failures(["exact_match=0.8"]) == []  # thresholds apply to the tuned model
    assert report.failures(["exact_match=0.95"]) and report.failures([], fail_on_forgetting=True)
    assert EvalReport({"exact_match": 0.5}).failures({"exact_match": 0.6})  # base only: base scores


def test_prompts_from_examples_and_rows():
    from test_generate import tokenizer

    tok = tokenizer()
    prompt, answer = tok("Tell me about the lamp.")["input_ids"], tok("The lamp is red.")["input_ids"]
    eos = tok.eos_token_id
    ex = SimpleNamespace(input_ids=prompt + answer + [eos], labels=[-100] * len(prompt) + answer + [eos])
    everything = SimpleNamespace(input_ids=answer, labels=answer)  # train_on: all -> no prompt, skipped
    prompts = prompts_from_examples([ex, everything], tok)
    assert prompts.prompt_ids == [prompt] and prompts.references == ["The lamp is red."]
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "label": "x"},
            {"prompt": "A", "reference": "B", "label": "y"}]
    got = prompts_from_rows(rows, tok)
    assert [tok.decode(p) for p in got.prompt_ids] == ["[hi]>", "A"]
    assert got.references == ["yo", "B"] and got.labels == ["x", "y"]
    with pytest.raises(ValueError, match="no 'reference'"):
        prompts_from_rows([{"prompt": "A"}], tok)


# --------------------------------------------------------------------------- base vs tuned on the demo task


def demo_report(run) -> EvalReport:
    settings = demo_eval_settings()
    settings.generation = GenerationConfig(max_new_tokens=16)
    eval_rows = read_jsonl(run.setup.paths["eval"])
    loss_batches = chat_batches(run.tokenizer, eval_rows)
    prompts = prompts_from_rows(read_jsonl(run.setup.paths["prompts"]), run.tokenizer)
    return run_eval(run.model, run.tokenizer, settings, loss_batches=lambda: loss_batches, prompts=prompts,
                    canary=demo_canary())


def test_trained_adapter_beats_the_base_on_its_task(tmp_path):
    run = trained_demo()
    run.model.train()
    report = demo_report(run)
    base, tuned = report.base, report.tuned
    print("\n" + report.markdown)
    assert tuned["eval_loss"] < base["eval_loss"] / 5
    assert tuned["exact_match"] >= 0.8 and base["exact_match"] <= 0.05
    assert tuned["json_valid"] == 1.0 and base["json_valid"] == 0.0
    assert tuned["schema_valid"] == 1.0 and tuned["accuracy"] >= 0.8 and tuned["macro_f1"] >= 0.75
    assert report.samples[0]["tuned"] == '{"sentiment": "' + json.loads(report.samples[0]["reference"])["sentiment"] + '"}'
    assert report.failures(["exact_match=0.75", "json_valid=1.0"]) == []
    assert report.failures(["exact_match=0.99"])  # CI gate trips
    assert run.model.training and not any(layer.disabled for _, layer in lora_layers(run.model))  # state restored
    assert set(report.save(tmp_path)) == {"json", "markdown", "chart"}


def test_canary_catches_an_overtrained_adapter():
    run = trained_demo()
    settings = EvalSettings(canary_max_increase=0.10)
    healthy = run_eval(run.model, run.tokenizer, settings, canary=demo_canary()).canary
    model, tokenizer = load_demo(quantize=True)
    train_adapter(model, tokenizer, read_jsonl(run.setup.paths["train"]), steps=25, lr=5e-2, batch=8)
    report = run_eval(model, tokenizer, settings, canary=demo_canary())
    print(f"\n[canary] healthy adapter: {healthy.message()}\n[canary] over-trained: {report.canary.message()}")
    assert report.canary.degraded and report.canary.increase > 3 * max(healthy.increase, 0.1)
    assert report.failures([], fail_on_forgetting=True) == [report.canary.message()]


def test_evaluate_run_end_to_end(tmp_path):
    """Load the base as trained (NF4), attach the saved adapter, eval the run's data, write eval.*."""
    from lorakit.adapters import save_lora_adapter
    from lorakit.config import DataConfig, RunConfig, TrainConfig
    from lorakit.eval import evaluate_run

    run = trained_demo()
    adapter = save_lora_adapter(run.model, tmp_path / "adapter", chat_template=run.tokenizer.chat_template)
    config = RunConfig(base_model=str(run.setup.model_dir), method="qlora",
                       data=DataConfig(train=str(run.setup.paths["train"]), eval=str(run.setup.paths["eval"]),
                                       max_seq_len=256, packing=False),
                       train=TrainConfig(micro_batch_size=16, dtype="float32", device="cpu"), output_dir=str(tmp_path))
    resolved = resolve_demo(copy.deepcopy(config))  # the entry point's step: eval at defaults on demo data
    settings = demo_eval_settings()
    assert resolved.eval.label_key == "sentiment" and resolved.eval.schema == settings.schema
    settings.max_prompts, settings.generation.max_new_tokens = 32, 16
    report = evaluate_run(config, adapter, tmp_path / "eval", settings=settings, progress=False)
    assert report.tuned["exact_match"] >= 0.75 and report.base["exact_match"] <= 0.05
    assert report.tuned["exact_match"] == pytest.approx(demo_report(run).tuned["exact_match"], abs=0.1)
    assert report.tuned["eval_loss"] < report.base["eval_loss"] / 5 and report.canary is not None
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"eval.json", "eval.md", "eval.png"}


def test_eval_batch_rows_by_hand():
    from lorakit.config import DataConfig, EvalConfig, RunConfig, TrainConfig

    def rows(micro: int, eval_batch: int, seq: int) -> int:
        return RunConfig(train=TrainConfig(micro_batch_size=micro), eval=EvalConfig(batch_size=eval_batch),
                         data=DataConfig(max_seq_len=seq)).eval_batch_rows()

    assert rows(1, 16, 64) == 16  # batch-1 training still evaluates 16 rows per forward
    assert rows(1, 16, 1024) == 4  # at most 4096 tokens per no-grad forward
    assert rows(1, 16, 8192) == 1 and rows(8, 16, 8192) == 8  # never fewer rows than a training micro-batch


def test_eval_loss_runs_in_eval_batches_and_equals_the_row_by_row_loss():
    """`lorakit eval`'s loss pass: ⌈rows / eval_batch_rows⌉ forwards at micro-batch 1, and the same token-weighted
    loss as one forward per row (padding changes nothing)."""
    from lorakit.config import DataConfig, EvalConfig, RunConfig, TrainConfig
    from lorakit.data import prepare_data
    from lorakit.eval.run import _loss_batch_factory
    from test_demo import demo_setup

    setup = demo_setup()
    model, tokenizer = load_demo(quantize=False)
    data_config = DataConfig(train=str(setup.paths["train"]), eval=str(setup.paths["eval"]), max_seq_len=256,
                             packing=False)
    examples = prepare_data(data_config, tokenizer, "causal_lm", 1).eval[:40]
    per_batch = RunConfig(data=data_config, train=TrainConfig(micro_batch_size=1), eval=EvalConfig(batch_size=16))
    per_row = RunConfig(data=data_config, train=TrainConfig(micro_batch_size=1), eval=EvalConfig(batch_size=1))
    batched = list(_loss_batch_factory(per_batch, examples, tokenizer)())
    assert len(examples) == 40 and [len(b["input_ids"]) for b in batched] == [16, 16, 8]
    want = eval_loss(model, _loss_batch_factory(per_row, examples, tokenizer)())["loss"]
    assert eval_loss(model, batched)["loss"] == pytest.approx(want, rel=1e-5)
