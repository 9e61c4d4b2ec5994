"""Classification adapters carry their head (issue #15): task seq_cls trains, saves, reloads and merges it.

The oracle is PEFT (task_type=SEQ_CLS) and transformers itself. Bases are published-style checkpoints without
a head (tests/seq_cls_tiny.py), so the head transformers builds at load time is random: an adapter that did not
carry it would predict differently at every load, which is what the fresh-process reload under another seed checks.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import seq_cls_tiny as tiny
from lorakit import AdapterError, DataError, LoraConfig, QuantConfig, api, quantize_model
from lorakit.adapters import load_lora_adapter, save_lora_adapter
from lorakit.config import load_run_config
from lorakit.data import collate, prepare_data
from lorakit.heads import SavedModule, classifier_head
from lorakit.lora import adapters_disabled, inject_lora

peft = pytest.importorskip("peft")

E2E = tiny.FAMILIES  # trained end to end through lorakit.api: 4 encoders, Llama, Qwen2
NAMES = sorted(tiny.KEYWORDS)  # ['neg', 'neutral', 'pos']: the class names, in the id order training gives them
HEADS = {
    "bert": ["bert.pooler", "classifier"], "roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"],
    "deberta_v2": ["pooler", "classifier"], "llama": ["score"], "qwen2": ["score"],
}


def run_config(family: str, root: Path, *overrides: str):
    base = root / "base"
    if not base.exists():
        tiny.save_base(family, base)
    train = tiny.write_jsonl(tiny.task_rows(96, seed=0), root / "train.jsonl")
    evals = tiny.write_jsonl(tiny.task_rows(30, seed=1), root / "eval.jsonl")
    return load_run_config(None, [
        f"base_model={base}", f"output_dir={root / 'run'}", "task=seq_cls", f"data.train={train}", f"data.eval={evals}",
        "data.max_seq_len=32", "data.dedup=false", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        "train.micro_batch_size=16", "train.grad_accum=1", "train.max_steps=40", "train.lr=1e-2", "train.warmup_ratio=0.0",
        "train.eval_every=null", "train.save_every=null", "train.log_every=10", "train.gradient_checkpointing=false",
        "eval.canary=null", *overrides])


class Trained:
    """One family's finished run, and its eval rows as one batch of model inputs."""

    def __init__(self, family: str, root: Path):
        self.family, self.root = family, root
        self.config = run_config(family, root)
        self.result = api.train_lora(self.config, progress=False, memory_check=False)
        self.base, self.adapter = Path(self.config.base_model), self.result.adapter_dir
        data = prepare_data(self.config.data, self.result.tokenizer, "seq_cls")
        batch = collate(data.eval, self.result.tokenizer.pad_token_id)
        self.labels = batch.pop("labels")
        self.batch = batch
        self.result.model.eval()
        with torch.no_grad():
            self.logits = self.result.model(**batch).logits  # (rows, 3): the model as training left it


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache: dict[str, Trained] = {}

    def get(family: str) -> Trained:
        if family not in cache:
            cache[family] = Trained(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def fresh(trained, tmp_path_factory):
    """Every E2E run reloaded in one fresh process under torch seed 1234 (training used 42): lorakit and PEFT."""
    root = tmp_path_factory.mktemp("fresh")
    jobs = {}
    for family in E2E:
        run = trained(family)
        save_file(run.batch, str(root / f"{family}.safetensors"))
        jobs[family] = {"base": str(run.base), "adapter": str(run.adapter), "num_labels": 3, "seed": 1234,
                        "batch": str(root / f"{family}.safetensors")}
    (root / "jobs.json").write_text(json.dumps(jobs))
    script = Path(__file__).with_name("seq_cls_reload.py")
    subprocess.run([sys.executable, str(script), str(root / "jobs.json"), str(root / "out.safetensors")], check=True)
    return load_file(str(root / "out.safetensors"))


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family", E2E)
def test_trained_adapter_carries_the_head_under_peft_keys(family, trained):
    run = trained(family)
    keys = set(load_file(run.adapter / "adapter_model.safetensors"))
    heads = {f"base_model.model.{h}." for h in HEADS[family]}
    full = {k for k in keys if "lora_" not in k}
    assert full and all(k.startswith(tuple(heads)) for k in full) and all(any(k.startswith(h) for k in full) for h in heads)
    assert not any(".modules_to_save." in k or ".original_module." in k for k in keys)  # PEFT writes neither
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == HEADS[family]
    meta = json.loads((run.adapter / "lorakit.json").read_text())["classifier"]
    assert meta == {"num_labels": 3, "id2label": {"0": "neg", "1": "neutral", "2": "pos"}, "head": HEADS[family]}


@pytest.mark.parametrize("family", E2E)
def test_fresh_process_reload_by_lorakit_and_peft_equals_training(family, trained, fresh):
    run = trained(family)
    torch.testing.assert_close(fresh[f"{family}.lorakit"], run.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh[f"{family}.peft"], run.logits, rtol=0, atol=1e-5)
    assert torch.equal(fresh[f"{family}.lorakit"].argmax(-1), run.logits.argmax(-1))
    accuracy = (fresh[f"{family}.lorakit"].argmax(-1) == run.labels).sum().item() / len(run.labels)
    assert accuracy == pytest.approx(run.result.summary["eval"]["tuned"]["accuracy"]) and accuracy >= 0.9
    # adapters disabled: the base's own head (random at load), not the trained one
    torch.testing.assert_close(fresh[f"{family}.disabled"], fresh[f"{family}.base"], rtol=0, atol=1e-6)
    assert not torch.allclose(fresh[f"{family}.disabled"], run.logits, atol=1e-2)


@pytest.mark.parametrize("family", E2E)
def test_merge_writes_a_standard_classifier_with_head_and_label_names(family, trained, tmp_path):
    run = trained(family)
    out = api.merge(str(run.base), run.adapter, tmp_path / "merged")
    merged = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(merged).__name__.endswith("ForSequenceClassification")
    assert merged.config.id2label == dict(enumerate(NAMES)) and merged.config.label2id == {n: i for i, n in enumerate(NAMES)}
    with torch.no_grad():
        torch.testing.assert_close(merged(**run.batch).logits, run.logits, rtol=0, atol=1e-5)
    assert not any(".modules_to_save." in k or "lora_" in k for k in load_file(out / "model.safetensors"))


def test_eval_reports_accuracy_and_macro_f1_for_base_and_tuned(trained):
    run = trained("bert")
    at_end = run.result.summary["eval"]
    config = run_config("bert", run.root)  # the user's config: num_labels null, read from the adapter
    assert config.num_labels is None
    report = api.evaluate(config, out=run.root / "again")
    for side in ("base", "tuned"):
        assert {"eval_loss", "accuracy", "macro_f1"} <= set(report.json[side])
    assert report.tuned == pytest.approx(at_end["tuned"])  # reloaded: the same numbers as at the end of training
    assert report.tuned["accuracy"] >= 0.9 and report.base["accuracy"] < 0.8  # base = the random head, adapters off
    assert "macro_f1" in (run.root / "again" / "eval.md").read_text()


# --------------------------------------------------------------------------- PEFT both ways, every family


def classifier(family: str, seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    """The family's classifier built from its config: the same weights for the same seed."""
    tokenizer = tiny.tokenizer_for(family)
    torch.manual_seed(seed)
    config = tiny.base_model(family, tokenizer).config
    config.num_labels = num_labels
    torch.manual_seed(seed)
    return tf.AutoModelForSequenceClassification.from_config(config).eval()


def ids(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(5, 20, (3, 9), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def randomize_trainable(model: torch.nn.Module, seed: int = 3) -> None:
    """Every trainable tensor (LoRA factors, head copies) random, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def logits_of(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids(family)).logits


FAMILIES = tiny.ENCODERS + tiny.DECODERS


@pytest.mark.parametrize("family", FAMILIES)
def test_default_modules_to_save_is_the_head_and_lora_stays_out_of_it(family):
    model = classifier(family)
    assert classifier_head(model) == HEADS[family]
    targets = inject_lora(model, LoraConfig(r=2))
    assert not any(t.startswith(tuple(f"{h}." for h in HEADS[family])) or t in HEADS[family] for t in targets)
    assert all(isinstance(model.get_submodule(h), SavedModule) for h in HEADS[family])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save.default." in n for n in trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_seq_cls_adapter_loads_in_lorakit_with_same_logits(family, tmp_path):
    targets = ["q_proj", "v_proj"] if family in tiny.DECODERS else ["q_lin", "v_lin"] if family == "distilbert" else ["query", "value"]
    if family == "deberta_v2":
        targets = ["query_proj", "value_proj"]
    ref = peft.get_peft_model(classifier(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS"))
    randomize_trainable(ref)
    ref.save_pretrained(tmp_path / "p")
    ours = classifier(family)
    load_lora_adapter(ours, tmp_path / "p")
    torch.testing.assert_close(logits_of(ours, family), logits_of(ref.eval(), family), rtol=0, atol=1e-5)
    with adapters_disabled(ours), ref.disable_adapter():  # both give the base's own head back
        torch.testing.assert_close(logits_of(ours, family), logits_of(ref, family), rtol=0, atol=1e-6)
        torch.testing.assert_close(logits_of(ours, family), logits_of(classifier(family), family), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_lorakit_seq_cls_adapter_loads_in_peft_with_same_logits(family, tmp_path):
    ours = classifier(family)
    inject_lora(ours, LoraConfig(r=4, alpha=8, dropout=0.0))  # defaults: all-linear, the head in full
    randomize_trainable(ours)
    save_lora_adapter(ours, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(classifier(family), tmp_path / "a").eval()  # the head from the file
    torch.testing.assert_close(logits_of(ref, family), logits_of(ours, family), rtol=0, atol=1e-5)


def test_qlora_head_copy_is_full_precision_and_reloads(tmp_path):
    """RoBERTa's head holds linears that NF4 quantizes (quant.skip_modules matches `classifier` itself only): the
    trained copy is dequantized, the original stays 4-bit for adapters_disabled."""
    def quantized():
        model = classifier("roberta")
        quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
        return model

    model = quantized()
    base = logits_of(model, "roberta")
    inject_lora(model, LoraConfig(r=4, dropout=0.0))
    copy = model.classifier.modules_to_save["default"]
    assert type(copy.dense) is torch.nn.Linear and copy.dense.weight.requires_grad
    assert type(model.classifier.original_module.dense).__name__ == "NF4Linear"
    randomize_trainable(model)
    save_lora_adapter(model, tmp_path / "a")
    again = quantized()
    load_lora_adapter(again, tmp_path / "a")
    torch.testing.assert_close(logits_of(again, "roberta"), logits_of(model, "roberta"), rtol=0, atol=0)
    with adapters_disabled(again):
        torch.testing.assert_close(logits_of(again, "roberta"), base, rtol=0, atol=0)


# --------------------------------------------------------------------------- refusals


def test_no_head_is_warned_at_training_and_refused_at_load(tmp_path, caplog):
    model = classifier("bert")
    with caplog.at_level(logging.WARNING, logger="lorakit.lora"):
        inject_lora(model, LoraConfig(r=2, modules_to_save=[]))
    assert "lora.modules_to_save=[] trains no classification head of this BertForSequenceClassification" in caplog.text
    assert "Leave lora.modules_to_save unset (null) to train and save ['bert.pooler', 'classifier']" in caplog.text
    save_lora_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match=r"carries no classification head \(no classifier/score weights in "
                                           r"adapter_model.safetensors\), but BertForSequenceClassification predicts "
                                           r"through one: .* Retrain with lora.modules_to_save unset"):
        load_lora_adapter(classifier("bert"), tmp_path / "a")
    load_lora_adapter(classifier("bert"), tmp_path / "a", require_head=False)  # the base's head is the one meant


def test_num_labels_mismatch_with_the_model_is_refused(tmp_path):
    model = classifier("llama")
    inject_lora(model, LoraConfig(r=2))
    save_lora_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match=r"classifies into 3 labels \['LABEL_0', 'LABEL_1', 'LABEL_2'\], but this "
                                           r"LlamaForSequenceClassification has num_labels=2; load the base with "
                                           r"num_labels=3 \(`num_labels: 3` in the run config"):
        load_lora_adapter(classifier("llama", num_labels=2), tmp_path / "a")


def test_num_labels_mismatch_with_the_data_is_refused_before_loading(tmp_path):
    config = run_config("bert", tmp_path, "num_labels=2")
    with pytest.raises(DataError, match=r"the data has 3 classes \['neg', 'neutral', 'pos'\], but num_labels in the "
                                        r"config is 2 \(class ids 0..1\); fix the labels, or set num_labels to null"):
        api.train_lora(config, progress=False, memory_check=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_eval_data_with_classes_the_adapter_never_saw_is_refused(trained, tmp_path):
    run = trained("llama")
    rows = tiny.task_rows(6, seed=2) + [{"text": "sad bad", "label": "angry"}]
    evals = tiny.write_jsonl(rows, tmp_path / "eval.jsonl")
    config = load_run_config(run.root / "run" / "config.yaml", [f"data.eval={evals}"])
    with pytest.raises(DataError, match=r"labels \['angry'\] are not among the classes the model was trained on "
                                        r"\(\['neg', 'neutral', 'pos'\], the adapter's id2label\)"):
        api.evaluate(config, out=tmp_path / "eval")


# --------------------------------------------------------------------------- encoders in the data pipeline


def pair_config(tmp_path, rows, *overrides):
    data = tiny.write_jsonl(rows, tmp_path / "pairs.jsonl")
    return load_run_config(None, [f"data.train={data}", "data.eval_fraction=0", "data.dedup=false", "task=seq_cls",
                                  *overrides]).data


def test_text_pairs_tokenize_as_cls_a_sep_b_sep_with_segment_ids(tmp_path):
    tokenizer = tiny.wordpiece_tokenizer()
    rows = [{"text": "sad slow", "text_pair": "happy", "label": "contradiction"},
            {"text": "red", "text_pair": "red log", "label": "entailment"}]
    data = prepare_data(pair_config(tmp_path, rows), tokenizer, "seq_cls")
    assert data.chat_template is None and data.label_names == ["contradiction", "entailment"]
    first = data.train[0]
    assert tokenizer.convert_ids_to_tokens(first.input_ids) == ["[CLS]", "sad", "slow", "[SEP]", "happy", "[SEP]"]
    assert first.token_type_ids == [0, 0, 0, 0, 1, 1] and first.labels == 0
    batch = collate(data.train, tokenizer.pad_token_id)
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 6] and batch["labels"].tolist() == [0, 1]
    plain = tiny.wordpiece_tokenizer(segment_ids=False)  # DistilBERT/RoBERTa: no token types
    data = prepare_data(pair_config(tmp_path, rows), plain, "seq_cls")
    assert data.train[0].token_type_ids is None and "token_type_ids" not in collate(data.train, plain.pad_token_id)


def test_truncation_keeps_the_closing_sep(tmp_path):
    tokenizer = tiny.wordpiece_tokenizer()
    rows = [{"text": "sad slow bad small sad slow", "text_pair": "happy fast big good", "label": 1}]
    data = prepare_data(pair_config(tmp_path, rows, "data.max_seq_len=8"), tokenizer, "seq_cls")
    tokens = tokenizer.convert_ids_to_tokens(data.train[0].input_ids)
    assert len(tokens) == 8 and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
    assert data.stats["train"]["truncated"] == 1 and data.stats["train"]["tokens_lost_to_truncation"] == 13 - 8


def test_a_head_named_otherwise_is_named_by_the_user_and_then_loads(tmp_path, caplog):
    """T5's head is `classification_head`, which PEFT's SEQ_CLS names do not match: the default warns and says to
    name it; named, it is trained and saved, and the adapter is not refused for lacking a head."""
    config = tf.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=50, num_labels=3,
                         decoder_start_token_id=0)

    def t5() -> torch.nn.Module:
        torch.manual_seed(0)
        return tf.T5ForSequenceClassification(config).eval()

    with caplog.at_level(logging.WARNING, logger="lorakit.lora"):
        inject_lora(t5(), LoraConfig(r=2, target_modules=["q", "v"]))  # NOTE: T5's FFN reads wo.weight itself
    assert "Name the module that computes the logits in lora.modules_to_save" in caplog.text
    model = t5()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorakit.lora"):
        inject_lora(model, LoraConfig(r=2, dropout=0.0, target_modules=["q", "v"], modules_to_save=["classification_head"]))
    assert caplog.text == ""
    randomize_trainable(model)
    save_lora_adapter(model, tmp_path / "a")
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = config.eos_token_id  # T5 classifies from the <eos> representation
    again = t5()
    load_lora_adapter(again, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(t5(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(ref(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_fingerprint_ignores_class_names_and_head_wrappers():
    """Class names are the task's, not the base's: an adapter trained with names loads on a base loaded without."""
    from lorakit.adapters import base_fingerprint
    from lorakit.heads import set_label_names

    plain, named = classifier("bert"), classifier("bert")
    set_label_names(named, NAMES)
    inject_lora(named, LoraConfig(r=2))
    assert named.config.id2label == dict(enumerate(NAMES))
    assert base_fingerprint(named) == base_fingerprint(plain)
    assert base_fingerprint(classifier("bert", num_labels=2))["hash"] != base_fingerprint(plain)["hash"]
