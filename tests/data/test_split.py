"""Hygiene: a hash split that survives appended rows, exact and near dedup, train/eval leakage."""

from __future__ import annotations

import json
import logging
import random

from families import family_tokenizer

from lorakit.config import DataConfig
from lorakit.data import prepare_data
from lorakit.data.split import dedup, hash_split, jaccard, leakage, shingles

VOCAB = [f"w{i}" for i in range(400)]


def sentence(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choices(VOCAB, k=n))


def one_word_changed(text: str, at: int = 30) -> str:
    """60 words with one replaced: 3-gram Jaccard 55/61 = 0.90, over the 0.8 threshold."""
    words = text.split()
    words[at] = "changed"
    return " ".join(words)


def test_split_is_stable_when_rows_are_appended() -> None:
    rng = random.Random(0)
    rows = [sentence(rng, 12) for _ in range(400)]
    train, evals = hash_split(rows, 0.1, seed=0)
    assert sorted(train + evals) == list(range(400)) and 20 <= len(evals) <= 60
    more = rows + [sentence(rng, 12) for _ in range(300)]
    train2, evals2 = hash_split(more, 0.1, seed=0)
    assert [i for i in evals2 if i < 400] == evals  # no old row changed side
    assert set(evals) != set(hash_split(rows, 0.1, seed=1)[1])  # the seed picks another split
    shuffled = list(reversed(rows))  # side depends on the text, not the position
    assert sorted(rows[399 - i] for i in hash_split(shuffled, 0.1, seed=0)[1]) == sorted(rows[i] for i in evals)


def test_prepare_data_keeps_the_eval_set_when_rows_are_appended(tmp_path) -> None:
    tokenizer = family_tokenizer("qwen2")
    rng = random.Random(1)
    rows = [{"prompt": f"question {i}: {sentence(rng, 6)}", "completion": sentence(rng, 4)} for i in range(120)]
    path = tmp_path / "train.jsonl"

    def eval_prompts(n: int) -> set[str]:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
        data = prepare_data(DataConfig(train=str(path), eval_fraction=0.2), tokenizer)
        return {tokenizer.decode(e.input_ids).split(":")[0] for e in data.eval}

    before = eval_prompts(80)
    after = eval_prompts(120)
    assert before and before <= after and len(after) > len(before)


def test_dedup_counts_exact_and_near_duplicates() -> None:
    rng = random.Random(2)
    base = [sentence(rng) for _ in range(12)]
    rows = base + [
        base[0].upper(),  # exact after normalization (case)
        base[1].replace(" ", ",  "),  # exact after normalization (punctuation, whitespace)
        base[2],  # verbatim
        one_word_changed(base[3]),  # near
        one_word_changed(base[4], at=10),  # near
        " ".join(base[5].split()[:30] + base[6].split()[30:]),  # half of one, half of another: neither
    ]
    assert jaccard(shingles(base[3]), shingles(rows[15])) >= 0.8
    keep, counts = dedup(rows)
    assert counts == {"exact_duplicates": 3, "near_duplicates": 2}
    assert keep == list(range(12)) + [17]  # first occurrence wins


def test_leakage_finds_exact_and_near_copies_and_shows_them() -> None:
    rng = random.Random(3)
    train = [sentence(rng) for _ in range(30)]
    clean = [sentence(rng) for _ in range(5)]
    evals = clean + ["  " + train[4].upper() + "!", one_word_changed(train[7])]
    report = leakage(train, evals)
    assert report["exact"] == 1 and report["near"] == 1
    kinds = {ex["kind"].split(" ")[0]: ex for ex in report["examples"]}
    assert kinds["exact"]["eval"] == evals[5][:160]
    assert kinds["near"]["eval"] == evals[6][:160] and kinds["near"]["train"] == train[7][:160]
    assert "jaccard 0.9" in report["examples"][1]["kind"]
    assert leakage(train, clean) == {"exact": 0, "near": 0, "examples": []}


def test_prepare_data_reports_leakage_from_a_separate_eval_file(tmp_path, caplog) -> None:
    rng = random.Random(4)
    train = [sentence(rng) for _ in range(20)]
    evals = [train[0], one_word_changed(train[1], at=10), sentence(rng)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in evals))
    config = DataConfig(train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"))
    with caplog.at_level(logging.WARNING, logger="lorakit.data"):
        data = prepare_data(config, family_tokenizer("qwen2"))
    assert data.stats["leakage"]["exact"] == 1 and data.stats["leakage"]["near"] == 1
    assert len(data.stats["leakage"]["examples"]) == 2
    assert "2 eval examples also appear in train (1 exact, 1 near)" in caplog.text


def test_prepare_data_dedups_before_splitting(tmp_path) -> None:
    rng = random.Random(5)
    texts = [sentence(rng) for _ in range(40)]
    rows = texts + [t.upper() for t in texts[:10]] + [one_word_changed(t, at=10) for t in texts[10:15]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    data = prepare_data(DataConfig(train=str(tmp_path / "train.jsonl"), eval_fraction=0.25), family_tokenizer("qwen2"))
    s = data.stats
    assert (s["rows_read"], s["exact_duplicates"], s["near_duplicates"]) == (55, 10, 5)
    assert s["train_rows"] + s["eval_rows"] == 40 and s["eval_rows"] > 0
    assert s["leakage"] == {"exact": 0, "near": 0, "examples": []}
