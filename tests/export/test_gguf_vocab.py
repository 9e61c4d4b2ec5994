"""SentencePiece-style tokenizers in GGUF: a tokenizer.model on its own, and the tokenizer.json files llama.cpp's
SentencePiece tokenizer cannot reproduce (refused, not written with other ids). The families' own tokenizers
are checked against the runtime in test_gguf.py (token ids, logits, greedy text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers as tf
from gguf_families import CORPUS, KINDS, TEXTS, save_base, sentencepiece_model
from llama_runtime import LlamaCpp

from lorakit.errors import ExportError
from lorakit.export.gguf import export_gguf


def test_a_tokenizer_model_alone_is_converted_as_transformers_does(tmp_path):
    """A model directory with tokenizer.model and no tokenizer.json (older Llama-2 checkpoints): the export runs
    transformers' own conversion, and llama.cpp tokenizes as the converted tokenizer."""
    base = save_base(KINDS["llama2"], tmp_path / "base")
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    (base / "tokenizer.model").write_bytes(sentencepiece_model())
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "legacy": True}))
    tok = tf.AutoTokenizer.from_pretrained(base)
    result = export_gguf(base, tmp_path / "out", dtype="f32", progress=False)
    runtime = LlamaCpp(result.files[0])
    try:
        for text in [t for t in TEXTS if not t.startswith(" ")]:  # see the Metaspace 'always' note below
            assert runtime.tokenize(text, add_bos=True) == tok(text)["input_ids"], text
    finally:
        runtime.close()
    assert any("prepend_scheme 'always'" in note for note in result.notes)


def _with_backend(base: Path, edit) -> Path:
    """`base` with its tokenizer.json edited (a dict -> dict function)."""
    path = base / "tokenizer.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return base


def test_tokenizers_llama_cpp_would_read_differently_are_refused(tmp_path):
    base = save_base(KINDS["llama2"], tmp_path / "base")
    original = (base / "tokenizer.json").read_text()

    def restore_and(edit):
        (base / "tokenizer.json").write_text(original)
        return _with_backend(base, edit)

    cases = [
        (lambda j: {**j, "model": {**j["model"], "merges": j["model"]["merges"][: len(j["model"]["merges"]) // 2]}},
         "merges are not closed"),
        (lambda j: {**j, "normalizer": {"type": "NFKC"}}, "llama.cpp applies no normalizer"),
        (lambda j: {**j, "normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁",
                                                               "prepend_scheme": "always", "split": True}},
         "neither splits words at spaces"),
        (lambda j: {**j, "normalizer": None}, "spells spaces '▁'"),
        (lambda j: {**j, "model": {**j["model"], "vocab": {k: v for k, v in j["model"]["vocab"].items()
                                                           if k != "<0x0A>"}}}, "lacks the byte tokens"),
    ]
    for edit, words in cases:
        restore_and(edit)
        with pytest.raises(ExportError, match=words):
            export_gguf(base, tmp_path / "o", progress=False)


def test_unigram_is_refused_with_the_reason(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, trainers

    base = save_base(KINDS["llama2"], tmp_path / "base")
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Replace(" ", "▁")
    unigram.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                                unk_token="<unk>", byte_fallback=True, show_progress=False))
    tf.PreTrainedTokenizerFast(tokenizer_object=unigram, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>").save_pretrained(base)
    with pytest.raises(ExportError, match="Unigram.*Viterbi.*Supported: byte-level BPE"):
        export_gguf(base, tmp_path / "o", progress=False)
