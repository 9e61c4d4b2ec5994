"""Tiny sequence-classification bases and a separable task, built from configs (never downloaded).

Each base is saved the way a pretrained checkpoint is published -- BertModel, LlamaForCausalLM, ... without a
classification head -- so `lorakit train` with task seq_cls gets a head that transformers initializes at random
at load time, exactly the situation of a user with a real pretrained base.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers as tf

FILLER = "the a on and then it was very so of".split()
KEYWORDS = {"neg": ["sad", "slow", "small", "bad"], "neutral": ["red", "blue", "log", "mat"],
            "pos": ["happy", "fast", "big", "good"]}
WORDS = FILLER + [w for ws in KEYWORDS.values() for w in ws] + ["cat", "dog", "sat", "ran"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ENCODERS = ("bert", "roberta", "distilbert", "deberta_v2")
DECODERS = ("llama", "qwen2")
FAMILIES = ENCODERS + DECODERS
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             initializer_range=0.2)  # 0.02 makes every tiny random encoder map all rows to almost one vector


def wordpiece_tokenizer(segment_ids: bool = True) -> tf.PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer for this task's words, framing rows as BERT's does: [CLS] a [SEP] and
    [CLS] a [SEP] b [SEP] (token types 0…0 1…1 when `segment_ids`). Its vocabulary is written out (the words,
    and letters for anything else) rather than trained: WordPieceTrainer's result varies from one process to the
    next, and the fresh-process reload needs the same ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    letters = sorted(set("".join(WORDS)))
    pieces = SPECIALS + WORDS + letters + [f"##{c}" for c in letters]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    names = ["input_ids", "token_type_ids", "attention_mask"] if segment_ids else ["input_ids", "attention_mask"]
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]", model_input_names=names)


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer for the decoders: BOS + words, no closing token (the last word is read)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", model_input_names=["input_ids", "attention_mask"])


def bpe_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer, as Qwen2's (transformers loads any Qwen2 checkpoint's tokenizer as
    Qwen2Tokenizer, which rebuilds a byte-level BPE from the saved vocabulary and merges): no BOS, no EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      model_input_names=["input_ids", "attention_mask"])


def tokenizer_for(family: str) -> tf.PreTrainedTokenizerFast:
    if family == "qwen2":
        return bpe_tokenizer()
    return word_tokenizer() if family in DECODERS else wordpiece_tokenizer(segment_ids=family == "bert")


def base_model(family: str, tokenizer: tf.PreTrainedTokenizerFast) -> torch.nn.Module:
    """The family's backbone as published: no classification head (DeBERTa's pooler is part of the head)."""
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    if family == "bert":
        return tf.BertModel(tf.BertConfig(**SMALL, vocab_size=vocab, pad_token_id=pad, max_position_embeddings=64))
    if family == "roberta":  # positions start after the padding index, as RoBERTa's do
        return tf.RobertaModel(tf.RobertaConfig(**SMALL, vocab_size=vocab, pad_token_id=pad, max_position_embeddings=72,
                                                type_vocab_size=1), add_pooling_layer=False)
    if family == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=vocab, initializer_range=0.2,
                                                      pad_token_id=pad, max_position_embeddings=64))
    if family == "deberta_v2":
        return tf.DebertaV2Model(tf.DebertaV2Config(**SMALL, vocab_size=vocab, pad_token_id=pad, max_position_embeddings=64,
                                                    pooler_hidden_size=32, relative_attention=True, position_buckets=16))
    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    return model_cls(config_cls(**SMALL, num_key_value_heads=2, vocab_size=vocab, pad_token_id=pad,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                max_position_embeddings=64))


def save_base(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny published-style base directory (weights + tokenizer) for `family`."""
    tokenizer = tokenizer_for(family)
    torch.manual_seed(seed)
    base_model(family, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def task_rows(n: int, seed: int) -> list[dict]:
    """Three classes with their own words: 3-6 words of the class, one filler word among them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(KEYWORDS)[i % 3]
        words = [rng.choice(KEYWORDS[label]) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(FILLER))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
