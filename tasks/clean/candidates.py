"""Near-duplicate candidates (tasks/clean/near_duplicates.py): pairs of rows whose 64-bit
dHashes (tasks/clean/image_numbers.py's `dhash`) are within clean.near_duplicate_distance
bits. Cheap, and coarse on purpose: the confirmation decides.

Contract: `near_duplicate_pairs` returns every pair (i, j), i < j, within the distance,
each once, sorted, whichever scheme it picks; memory stays a few row-sized arrays plus
the pairs found.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs (i, j), i < j, whose 64-bit hashes differ in at most `max_distance` bits.

    Multi-index hashing: split the hash into max_distance + k chunks; two hashes that close
    agree exactly on at least k of them (pigeonhole), so only rows sharing the values of k
    chunks are compared, and a pair only in the bucket of the first k chunks it agrees on
    (so it is found once). k = 1 is the classic scheme; real hashes are far from uniform
    (at 1M images one 13-bit chunk value can be shared by 2% of them, and comparisons grow
    with the square of the dataset), where k = 2 or 3 compares 10-40x fewer pairs for 3-7x
    the sorting (1M procedural images: 2.1 s instead of 27 s). Whichever k (1-3) looks
    cheapest on a sample of the hashes is used: the pairs are the same.
    Returns an (n_pairs, 2) int64 array, sorted.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    k = min((1, 2, 3), key=lambda k: _scheme_cost(hashes, max_distance, k))
    found: list[np.ndarray] = []
    for keys, differ in _chunk_keys(hashes, max_distance, k):
        order, starts, sizes = _shared_buckets(keys)
        del keys  # one row-sized array fewer while the buckets are compared
        # Buckets of up to _SMALL_BUCKET rows: all their pairs at once, grouped by size.
        for size in np.unique(sizes[sizes <= _SMALL_BUCKET]):
            found.extend(
                _bucket_pairs(order, starts[sizes == size], int(size), hashes, max_distance, differ)
            )
        for start, size in zip(
            starts[sizes > _SMALL_BUCKET], sizes[sizes > _SMALL_BUCKET], strict=True
        ):
            found.append(_close_pairs(order[start : start + size], hashes, max_distance, differ))
        del order, starts, sizes
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def crop_pairs(hashes: np.ndarray, crop_hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs (i, j), i != j, where row i's crop key (tasks/clean/image_numbers.py's
    `crop_dhash`) is within `max_distance` bits of row j's dHash: j may be a copy of i
    cropped on every side. The pairs of `near_duplicate_pairs` over both sets of hashes
    that join a crop key to a dHash. Returns an (n_pairs, 2) int64 array of (i, j), sorted.
    """
    n = len(hashes)
    both = np.concatenate([np.asarray(hashes, np.uint64), np.asarray(crop_hashes, np.uint64)])
    pairs = near_duplicate_pairs(both, max_distance)
    pairs = pairs[(pairs[:, 0] < n) & (pairs[:, 1] >= n)]  # (dHash of j, crop key of i)
    pairs = np.stack([pairs[:, 1] - n, pairs[:, 0]], axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


_SMALL_BUCKET = 128  # larger buckets go through _close_pairs, a block at a time
_PAIRS_PER_STEP = 1 << 20  # bounds the candidate pairs _bucket_pairs holds at once
_COST_SAMPLE = 16384  # hashes sampled to choose the scheme
_SORT_COST = 12  # one row sorted once costs about as much as this many pairs compared


def _shared_buckets(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by key: (order, starts, sizes) such that order[start : start + size]
    are the rows of one key, for each key that two or more rows share (a row-sized
    array at a time besides `order`: at 1M rows this runs 35 times)."""
    order = np.argsort(keys)  # not stable: the order within a bucket does not matter
    ordered = keys[order]
    first = np.empty(len(keys), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    del ordered
    starts = np.flatnonzero(first)
    del first
    sizes = np.diff(starts, append=len(keys))
    shared = sizes > 1
    return order, starts[shared], sizes[shared]


def _chunk_keys(
    hashes: np.ndarray, max_distance: int, k: int
) -> Iterator[tuple[np.ndarray, list[np.uint64]]]:
    """Per combination of k of the max_distance + k chunks: each hash's bits in those
    chunks, and the masks of the earlier chunks outside the combination (a pair agreeing on
    one of those belongs to an earlier combination)."""
    n_chunks = max_distance + k
    bounds = np.linspace(0, 64, n_chunks + 1).astype(int)
    masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    for combo in itertools.combinations(range(n_chunks), k):
        key_mask = np.uint64(sum(masks[c] for c in combo))
        differ = [np.uint64(masks[c]) for c in range(combo[-1]) if c not in combo]
        yield hashes & key_mask, differ


def _scheme_cost(hashes: np.ndarray, max_distance: int, k: int) -> float:
    """Estimated work of `near_duplicate_pairs` with k agreeing chunks: rows sorted per
    combination, plus pairs sharing a bucket (counted on an evenly spaced sample)."""
    n = len(hashes)
    if k > 1 and (max_distance + k > 10 or n < 2):
        return float("inf")  # too many combinations (or nothing to compare)
    sample = hashes[:: max(1, n // _COST_SAMPLE)]
    scale = (n / len(sample)) ** 2 if len(sample) else 0.0
    combos = 0
    pairs = 0.0
    for keys, _ in _chunk_keys(sample, max_distance, k):
        counts = np.unique(keys, return_counts=True)[1].astype(np.float64)
        pairs += float((counts * (counts - 1) / 2).sum()) * scale
        combos += 1
    return pairs + _SORT_COST * combos * n


def _is_pair(xor: np.ndarray, max_distance: int, differ: list[np.uint64]) -> np.ndarray:
    """Which hash differences `xor` are close, with a set bit under every `differ` mask."""
    ok = np.bitwise_count(xor) <= max_distance
    for mask in differ:
        ok &= (xor & mask) != 0
    return ok


def _bucket_pairs(
    order: np.ndarray,
    starts: np.ndarray,
    size: int,
    hashes: np.ndarray,
    max_distance: int,
    differ: list[np.uint64],
) -> list[np.ndarray]:
    """`_close_pairs` of every bucket `order[start : start + size]`, buckets of one size at
    a time: the same pairs, (smaller index, larger index), without a call per bucket."""
    first, second = np.triu_indices(size, 1)
    out = []
    step = max(1, _PAIRS_PER_STEP // len(first))
    for lo in range(0, len(starts), step):
        base = starts[lo : lo + step, None]
        a = order[base + first].ravel()
        b = order[base + second].ravel()
        close = _is_pair(hashes[a] ^ hashes[b], max_distance, differ)
        a, b = a[close], b[close]
        out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64))
    return out


def _close_pairs(
    members: np.ndarray, hashes: np.ndarray, max_distance: int, differ: list[np.uint64]
) -> np.ndarray:
    members = np.sort(members)
    out = [np.empty((0, 2), dtype=np.int64)]
    block = 1024  # a large bucket's distance matrix is computed block x block at a time (8 MiB)
    for lo in range(0, len(members), block):
        rows = members[lo : lo + block]
        for start in range(lo, len(members), block):  # earlier members are smaller: no pair
            later = members[start : start + block]
            close = _is_pair(hashes[rows, None] ^ hashes[None, later], max_distance, differ)
            i, j = np.nonzero(close & (rows[:, None] < later[None, :]))
            out.append(np.stack([rows[i], later[j]], axis=1))
    return np.concatenate(out).astype(np.int64)
