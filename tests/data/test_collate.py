"""Packing: best-fit rows, per-document positions and attention, and the same loss as unpacked batches."""

from __future__ import annotations

import random

import pytest
import torch
from families import CORPUS, family_tokenizer

from lorakit.data import IGNORE, Example, PackedRow, collate, encode_record, model_inputs, pack_examples
from lorakit.data.formats import Record
from lorakit.train import loss_sum


def random_examples(n: int, seed: int = 0, low: int = 3, high: int = 40, vocab: int = 300) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(5, vocab) for _ in range(rng.randint(low, high))]
        cut = rng.randrange(len(ids))  # a prompt of `cut` tokens, then the supervised reply
        out.append(Example(ids, [IGNORE] * cut + ids[cut:], f"rows.jsonl:{i + 1}"))
    return out


def chat_examples(tokenizer, n: int, seed: int = 0) -> list[Example]:
    """Real rendered conversations (1-3 turns) and raw text rows, of varied lengths."""
    rng = random.Random(seed)
    sentences = [s for text in CORPUS for s in text.replace("?", "?|").replace(".", ".|").split("|") if s.strip()]
    out = []
    for i in range(n):
        if i % 4 == 3:
            record = Record("text", f"d:{i}", response=" ".join(rng.choices(sentences, k=rng.randint(1, 4))))
        else:
            messages = []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": rng.choice(sentences).strip()},
                             {"role": "assistant", "content": " ".join(rng.choices(sentences, k=rng.randint(1, 3))).strip()}]
            record = Record("chat", f"d:{i}", messages=messages)
        out.append(encode_record(record, tokenizer, tokenizer.chat_template))
    return out


def test_best_fit_packing_keeps_every_example_once_within_max_len() -> None:
    examples = random_examples(60)
    rows = pack_examples(examples, max_seq_len=64)
    assert all(isinstance(r, PackedRow) and len(r) <= 64 and sum(r.lengths) == len(r) for r in rows)
    packed_docs = sorted(tuple(r.input_ids[s:s + n]) for r in rows for s, n in zip(_starts(r.lengths), r.lengths, strict=True))
    assert packed_docs == sorted(tuple(e.input_ids) for e in examples)
    total = sum(len(e) for e in examples)
    assert len(rows) <= -(-total // 64) + 2  # best fit: close to the lower bound ceil(total / max_len)
    assert [r.input_ids for r in pack_examples(examples, 64)] == [r.input_ids for r in rows]  # deterministic


def _starts(lengths: list[int]) -> list[int]:
    return [sum(lengths[:j]) for j in range(len(lengths))]


def test_packed_rows_restart_positions_block_attention_and_mask_first_labels() -> None:
    a = Example([11, 12, 13], [11, 12, 13])
    b = Example([21, 22], [21, 22])
    c = Example([31, 32, 33, 34], [IGNORE, IGNORE, 33, 34])
    rows = [PackedRow([11, 12, 13, 21, 22], [IGNORE, 12, 13, IGNORE, 22], [3, 2]), pack_examples([c], 8)[0]]
    assert pack_examples([a, b], 8)[0].labels == rows[0].labels  # the first label of every document is -100
    batch = collate(rows, pad_id=0, packing=True, max_seq_len=8)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22], [IGNORE, IGNORE, 33, 34, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    doc = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]])
    for r in range(2):
        for q in range(5):
            for k in range(5):
                pad_self = doc[r, q] == -1 and q == k
                want = bool((doc[r, q] == doc[r, k] and doc[r, q] >= 0 and k <= q) or pad_self)
                assert mask[r, 0, q, k].item() == want, (r, q, k)


def test_unpacked_collate_pads_right_and_ignores_padding() -> None:
    rows = [Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])]
    batch = collate(rows, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert "position_ids" not in batch


def test_model_inputs_turns_the_bool_mask_into_an_additive_one() -> None:
    model = _tiny_llama(vocab=64, attn="eager")
    batch = collate(pack_examples(random_examples(4, high=6, vocab=64), 16), pad_id=0)
    inputs = model_inputs(batch, model)
    mask = inputs["attention_mask"]
    assert "labels" not in inputs and mask.dtype == torch.float32
    assert torch.equal(mask == 0, batch["attention_mask"])
    assert (mask[~batch["attention_mask"]] == torch.finfo(torch.float32).min).all()


def _tiny_llama(vocab: int, attn: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                            initializer_range=0.3)  # large weights: attention patterns move the loss visibly
    config._attn_implementation = attn
    return tf.LlamaForCausalLM(config).float().eval()


def _mean_loss(model: torch.nn.Module, rows: list, pad_id: int, size: int) -> tuple[float, int]:
    """Token-weighted mean over all rows: Σ losses / Σ supervised targets, as training accumulates it."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for i in range(0, len(rows), size):
            batch = collate(rows[i:i + size], pad_id=pad_id)
            total += loss_sum(model, batch).double()
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return (total / count).item(), count


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked_loss(attn: str) -> None:
    tokenizer = family_tokenizer("llama-3")  # pad == eos, BOS from the template and the post-processor
    examples = chat_examples(tokenizer, 24)
    model = _tiny_llama(len(tokenizer), attn)
    rows = pack_examples(examples, max_seq_len=max(len(e) for e in examples) * 2)
    assert len(rows) < len(examples) and max(len(r.lengths) for r in rows) >= 3
    unpacked, n_unpacked = _mean_loss(model, examples, tokenizer.pad_token_id, size=5)
    packed, n_packed = _mean_loss(model, rows, tokenizer.pad_token_id, size=3)
    assert n_packed == n_unpacked  # the same supervised targets...
    assert abs(packed - unpacked) <= 1e-5  # ...with the same loss

    # the check has teeth: one causal mask over the whole row (documents see each other) changes the loss
    leaky = [Example(r.input_ids, r.labels) for r in rows]
    assert abs(_mean_loss(model, leaky, tokenizer.pad_token_id, size=3)[0] - unpacked) > 1e-3
