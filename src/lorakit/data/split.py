"""Data hygiene before any processing: dedup, a stable hash split, and a train/eval leakage check.

Why a hash split: `random.shuffle` + cut moves examples between train and eval whenever rows are
appended, so eval numbers stop being comparable and, worse, yesterday's eval rows leak into today's
training. Here an example's side is a pure function of (seed, its normalized text):

    eval  iff  sha256(f"{seed}:{normalized text}")[:8] / 2^32 < eval_fraction

Near duplicates: MinHash over word 3-gram shingles (64 hashes, 16 bands × 4 rows for candidates),
confirmed by exact Jaccard >= 0.8 on the shingle sets. Candidates are found in ~linear time.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

NEAR_THRESHOLD = 0.8
_PERMS, _BANDS = 64, 16
_PRIME = (1 << 61) - 1


def normalized(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: what 'the same text' means here."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def shingles(text: str, n: int = 3) -> set[int]:
    words = normalized(text).split()
    if len(words) < n:
        return {stable_hash(" ".join(words))}
    return {stable_hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


@functools.cache
def _coefficients(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, _PRIME, _PERMS, dtype=np.uint64), rng.integers(0, _PRIME, _PERMS, dtype=np.uint64)


def minhash(shingle_set: set[int]) -> np.ndarray:
    """(64,) MinHash signature: min over the set of a·x + b (mod 2^64) for 64 random (a, b)."""
    a, b = _coefficients()
    x = np.fromiter((s % _PRIME for s in shingle_set), dtype=np.uint64, count=len(shingle_set))
    # uint64 wrap-around instead of an exact mod-p product: still a fine family of hash functions.
    # In blocks of 16k shingles: a 5 MB row has ~10^6 of them, and (10^6, 64) uint64 would be 0.5 GB at once.
    out = np.full(_PERMS, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(x), 1 << 14):
        block = x[start:start + (1 << 14)]
        out = np.minimum(out, (block[:, None] * a[None, :] + b[None, :]).min(0))
    return out


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


def near_duplicate_pairs(texts: Sequence[str], others: Sequence[str] | None = None) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) for near-duplicate pairs within `texts` (i < j), or between texts[i] and others[j]."""
    sets_a = [shingles(t) for t in texts]
    sets_b = sets_a if others is None else [shingles(t) for t in others]
    rows = _PERMS // _BANDS
    buckets: dict[tuple[int, bytes], list[tuple[int, int]]] = defaultdict(list)
    for side, sets in ((0, sets_a), (1, sets_b)) if others is not None else ((0, sets_a),):
        for i, s in enumerate(sets):
            sig = minhash(s)
            for band in range(_BANDS):
                buckets[(band, sig[band * rows:(band + 1) * rows].tobytes())].append((side, i))
    seen, pairs = set(), []
    for members in buckets.values():
        left = [i for side, i in members if side == 0]
        right = left if others is None else [i for side, i in members if side == 1]
        for i in left:
            for j in right:
                if (others is None and j <= i) or (i, j) in seen:
                    continue
                seen.add((i, j))
                score = jaccard(sets_a[i], sets_b[j])
                if score >= NEAR_THRESHOLD:
                    pairs.append((i, j, score))
    return sorted(pairs)


def dedup(texts: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """Indices to keep (first occurrence wins) and counts of exact and near duplicates removed."""
    first: dict[str, int] = {}
    exact = []
    for i, t in enumerate(texts):
        key = normalized(t)
        if key in first:
            exact.append(i)
        else:
            first[key] = i
    unique = sorted(first.values())
    near = {unique[j] for _, j, _ in near_duplicate_pairs([texts[i] for i in unique])}
    keep = [i for i in unique if i not in near]
    return keep, {"exact_duplicates": len(exact), "near_duplicates": len(near)}


def in_eval(text: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{normalized(text)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def hash_split(texts: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices); an example never changes side when rows are added."""
    train, evals = [], []
    for i, t in enumerate(texts):
        (evals if in_eval(t, fraction, seed) else train).append(i)
    return train, evals


def leakage(train: Sequence[str], evals: Sequence[str], show: int = 3) -> dict[str, object]:
    """Eval examples that also appear in train, exactly or nearly, with a few shown."""
    train_keys = {normalized(t) for t in train}
    exact = [j for j, t in enumerate(evals) if normalized(t) in train_keys]
    exact_set = set(exact)
    near = [(i, j, s) for i, j, s in near_duplicate_pairs(train, evals) if j not in exact_set]
    near_evals = sorted({j for _, j, _ in near})
    examples = [{"kind": "exact", "eval": evals[j][:160]} for j in exact[:show]]
    examples += [{"kind": f"near (jaccard {s:.2f})", "eval": evals[j][:160], "train": train[i][:160]} for i, j, s in near[:show]]
    return {"exact": len(exact), "near": len(near_evals), "examples": examples}
