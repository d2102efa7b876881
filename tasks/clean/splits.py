"""Split assignment: which kept row goes to train, val or test.

Contract: deterministic and stratified. Within each class, rows are ordered by a seeded
hash of their id (`split_keys`); the first rows go to val, the next to test, the rest to
train, in the numbers `SplitConfig.counts` gives a class of n rows: training keeps
`train_floor(n)` = min(n - v, max(2, ceil(split.train_min_share * n))) rows whatever else
asks (v: the class's one val row, where the val fraction gives one); val gets round(n * val)
of the rest, test max(round(n * test), split.test_min_per_class) of what is then left, and
train the remainder. A short class thus keeps its training data and its test split is what
remains: clean's report gives each class's test count and the accuracy points one test
image is worth. The same ids, labels, split params and seed give the same splits whatever
the file order or the number of shards.
"""

from __future__ import annotations

import hashlib

import numpy as np

from synthloop.config import SplitConfig

SPLITS = ("train", "val", "test")


def split_keys(ids: list[str] | np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint64: each id's seeded split hash (the first 8 bytes of blake2b("seed:id"),
    big-endian, so keys order exactly as their hex digests do)."""
    digests = b"".join(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def assign_splits(
    ids: np.ndarray,
    labels: np.ndarray,
    split: SplitConfig,
    seed: int,
) -> np.ndarray:
    """Deterministic stratified split: within each class, rows ordered by a seeded hash of
    their id (`split_keys`); the first `split.counts` val rows go to val, the next test rows
    to test, the rest (at least `split.train_floor`) to train. (n,) object: a SPLITS name
    per row."""
    codes = split_codes(labels, split, split_keys(ids, seed))
    return np.array(SPLITS, dtype=object)[codes]


def split_codes(labels: np.ndarray, split: SplitConfig, keys: np.ndarray) -> np.ndarray:
    """`assign_splits` from the rows' `split_keys` computed beforehand: (n,) int8, an index
    into SPLITS per row (a byte a row, where names would take eight)."""
    codes = np.empty(len(labels), dtype=np.int8)
    val, test, train = (SPLITS.index(s) for s in ("val", "test", "train"))
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = rows[np.argsort(keys[rows], kind="stable")]
        n_val, n_test = split.counts(len(rows))
        codes[rows[:n_val]] = val
        codes[rows[n_val : n_val + n_test]] = test
        codes[rows[n_val + n_test :]] = train
    return codes
