"""Split assignment: which kept row goes to train, val or test.

Contract: deterministic and stratified. Within each class, rows are ordered by a seeded
hash of their id (`split_keys`); the first share goes to val, the next to test (at least
`split.test_min_per_class`), the rest to train. The same ids, labels, split params and seed
give the same splits whatever the file order or the number of shards.
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
    their id (`split_keys`); the first share goes to val, the next to test (at least
    `split.test_min_per_class`), the rest to train. (n,) object: a SPLITS name per row."""
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
