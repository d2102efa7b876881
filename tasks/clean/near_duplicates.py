"""Near-duplicates: a cheap candidate search, a confirmation that removes copies (re-encoded,
resized, recompressed, cropped by a few pixels, brightened) but not look-alikes (sparse
drawings of one character, product photos with one silhouette, photos that differ only in
colour), and a sheet of what was removed.

Contract (clean's `near_duplicate` rule; docs/data.md's table of quarantine reasons):
  candidates    64-bit dHashes (`dhash`, a bit a step of over DHASH_MARGIN grey levels)
                within clean.near_duplicate_distance bits (`near_duplicate_pairs`):
                cheap, and coarse on purpose.
  confirmation  on thumbnails (`thumbnail`): grey, of side s = min(clean.
                near_duplicate_size, clean.image_size), plus for RGB images two colour-
                opponent planes of side s / 4 (`colour_planes`). Grey rows are each
                standardised (mean removed, divided by its pixel std) and compared plain
                (their mean absolute difference) and, from s = ALIGN_MIN_SIDE up, also
                blurred and aligned for a crop of up to CROP of each edge (that difference
                over ALIGNED); the smaller is at most clean.near_duplicate_difference, the
                larger std over the smaller at most clean.near_duplicate_contrast, and for
                RGB the colour planes, aligned the same way, nowhere differ by more than
                COLOUR (`pair_differences`); and, from s = ALIGN_MIN_SIDE, no LOCAL_BOX-
                square window of the blurred comparison further apart than
                clean.near_duplicate_local (`local_differences`, `confirmed_pairs`).
  survivor      rows ranked by id: of a confirmed pair the later one goes, unless the
                earlier one has already gone (`drop_order`).

Why relative: a mostly white image (a handwritten character) has a mostly white 8x8
thumbnail, so an absolute threshold on it cannot tell two people's drawings of the same
character apart. Its strokes are its content and its pixel std measures how much of it
there is: standardised, two drawings of one character typically differ by 0.15 or more
(mean, in std units, on 16x16 thumbnails of 28x28 images), while a re-encoded, resized or
alpha-channel copy differs by under 0.04. Standardising also makes a brightness shift
cost nothing where no pixel clips, and on strokes on white even where the white clips (the
strokes' contrast only scales); the contrast bound keeps an image and a washed-out version
of it distinct.
Why aligned: a copy cropped by 1-3 px of 105 and scaled back is the original shifted by
under a pixel and magnified by a few per cent; on thin strokes that differs, plain, about
as much as another hand does (0.06-0.26 on 28 px thumbnails). Blurred (sigma BLUR of the
side) and aligned by the crop whose profiles match best, such copies differ by under 0.09
and drawings of one character by 0.12 and up, hence a bound ALIGNED = 2.5 times the plain
one. Below ALIGN_MIN_SIDE px (the demo's 8x8 digits) too little is left to align: distinct
drawings of a 1 come within 0.08 of each other there, so those thumbnails are compared
plain only, as before.
Why colour: a photo and the same photo with a shape moved across a background of its own
brightness have nearly equal grey thumbnails; their colour planes differ by 20-100 where
the shape was and is, re-encoded or brightened copies by under 16.
Why local: two real product photos on black with one silhouette (Fashion-MNIST: a plain
dress and a printed one) are within the mean bound once blurred and aligned, since the
silhouette dominates the mean; they differ in one place. A copy differs little everywhere.
The price: a copy cropped by 1-3% of each edge, aligned, keeps a residual along its edges,
and about 4 in 10 such crops are now kept (docs/measurements.md's near-duplicate table, from
benchmarks/near_duplicates.py, gives every transform's recall on procedural and real images).

Cost: candidate pairs within ALIGN_WITHIN plain but over the bound are blurred and aligned
(16 crops per axis chosen on 1-D profiles, two gathers per pair): most candidates differ
by far more and cost one comparison. Memory: pass 1 keeps a thumbnail row per kept row in
a row file that only candidates are read back from: s * s bytes for grey (784 at 28x28,
64 for the demo's 8x8), s * s * 9 / 8 for RGB (1152 at 32x32).

One module, long by design: clean's one rule, whose thresholds (ALIGNED, CROP, COLOUR,
LOCAL_BOX, ...) were measured together and are read, and set by the tests, as this
module's attributes; its sections follow the contract above in order (per-image numbers,
candidates, confirmation and survivors, the sheet). Only clean runs it.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

MIN_SCALE = 1.0  # std floor (0-255): a constant thumbnail divides by this, not by 0
# Candidate pairs compared at once: 4M floats (16 MiB) a row-sized array of the block, a
# few of which are alive at once, whatever the thumbnail size.
_CONFIRM_FLOATS = 1 << 22


def thumbnail_side(image_size: int, size: int) -> int:
    """The confirmation thumbnail's side: clean.near_duplicate_size, never more than the
    cleaned image (a thumbnail larger than the image would only repeat its pixels)."""
    return min(image_size, size)


def colour_side(side: int) -> int:
    """The side of an RGB row's two colour planes: a quarter of the grey thumbnail's."""
    return max(1, side // 4)


def row_width(side: int, channels: int) -> int:
    """Bytes a row's thumbnail takes: the grey side x side, plus for RGB images two
    colour_side(side)-square colour-opponent planes (`colour_planes`)."""
    return side * side + (2 * colour_side(side) ** 2 if channels == 3 else 0)


def thumbnail(pixels: np.ndarray, side: int) -> np.ndarray:
    """A row's thumbnail, flattened (`row_width` bytes): a side x side grey thumbnail and,
    for an RGB image, its colour planes. BOX resampling: each thumbnail pixel is the mean
    of the pixels it covers."""
    gray = pixels if pixels.ndim == 2 else pixels.mean(axis=2).astype(np.uint8)
    parts = [_box(gray, side)]
    if pixels.ndim == 3:
        parts += [_box(plane[0], colour_side(side)) for plane in colour_planes(pixels[None])]
    return np.concatenate(parts)


def _box(plane: np.ndarray, side: int) -> np.ndarray:
    if plane.shape == (side, side):
        return plane.ravel()
    return np.asarray(Image.fromarray(plane).resize((side, side), Image.Resampling.BOX)).ravel()


# A dHash bit needs a step of more than this many grey levels (0-255): on a flat region (a
# photo's black background) neighbouring cells are within a level or two of each other, and
# JPEG's ringing flips such bits at random; with the margin a flat pair of cells reads 0.
DHASH_MARGIN = 2


def dhash(pixels: np.ndarray) -> int:
    """64-bit difference hash: is each of 8x8 cells brighter than its right neighbour by
    more than DHASH_MARGIN."""
    gray = pixels if pixels.ndim == 2 else pixels.mean(axis=2).astype(np.uint8)
    small = np.asarray(Image.fromarray(gray).resize((9, 8), Image.Resampling.BILINEAR), np.int16)
    bits = (small[:, 1:] > small[:, :-1] + DHASH_MARGIN).ravel()
    return int(np.packbits(bits, bitorder="little").view("<u8")[0])


# --- the same per-image numbers for many same-shape images at once ----------------------
# Pass 1 computes these on chunks of rows; each equals, row by row, the per-image function
# above (tests/test_near_duplicates.py checks it), only without a Python call per image.


def grays(pixels: np.ndarray) -> np.ndarray:
    """(m, H, W) grey of an (m, H, W) or (m, H, W, 3) stack, as in `thumbnail`/`dhash`.

    mean(axis=2) of three uint8 values is an exact float sum / 3, and astype(uint8)
    truncates it: that is the integer sum // 3.
    """
    if pixels.ndim == 3:
        return pixels
    total = pixels[..., 0].astype(np.uint16)
    total += pixels[..., 1]
    total += pixels[..., 2]
    total //= 3
    return total.astype(np.uint8)


def _resize_many(gray: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize each (H, W) image of an (m, H, W) uint8 stack to `size` (w, h), equal to
    `Image.fromarray(gray[i]).resize(size, resample)` for every i.

    Pillow resamples in two separable passes, horizontal then vertical, rounding to uint8
    in between, with coefficients that depend only on the sizes. So the horizontal pass is
    run on the images stacked vertically (rows are filtered independently) and the vertical
    pass on them side by side (columns are filtered independently).
    """
    m, h, w = gray.shape
    out_w, out_h = size
    if (w, h) == (out_w, out_h):
        return gray.copy()
    out = gray
    if out_w != w:
        tall = Image.fromarray(np.ascontiguousarray(out.reshape(m * h, w)))
        out = _array(tall.resize((out_w, m * h), resample)).reshape(m, h, out_w)
    if out_h != h:
        wide = np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(h, m * out_w)
        wide = _array(Image.fromarray(wide).resize((m * out_w, out_h), resample))
        out = wide.reshape(out_h, m, out_w).transpose(1, 0, 2)
    return np.ascontiguousarray(out)


def _array(image: Image.Image) -> np.ndarray:
    width, height = image.size
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(height, width)


def thumbnails(pixels: np.ndarray, side: int) -> np.ndarray:
    """(m, row_width) uint8: `thumbnail` of each image of an (m, H, W) grey or (m, H, W, 3)
    RGB stack."""
    m = len(pixels)
    grey = _resize_many(grays(pixels), (side, side), Image.Resampling.BOX).reshape(m, -1)
    if pixels.ndim == 3:
        return grey
    c = colour_side(side)
    planes = [_resize_many(p, (c, c), Image.Resampling.BOX) for p in colour_planes(pixels)]
    return np.concatenate([grey] + [p.reshape(m, c * c) for p in planes], axis=1)


def colour_planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two (m, H, W) uint8 colour-opponent planes of an RGB stack, 128 for grey:
    (R - B) / 2 + 128 and (R + B - 2G) / 4 + 128, rounded down. What the grey
    thumbnail cannot see: a shape moved across a background of its own brightness."""
    r, g, b = (rgb[..., k].astype(np.int16) for k in range(3))
    red_blue = ((r - b + 256) // 2).astype(np.uint8)
    yellow_green = ((r + b - 2 * g + 512) // 4).astype(np.uint8)
    return red_blue, yellow_green


def dhashes(gray: np.ndarray) -> np.ndarray:
    """(m,) uint64: `dhash` of each image."""
    small = _resize_many(gray, (9, 8), Image.Resampling.BILINEAR).astype(np.int16)
    bits = (small[:, :, 1:] > small[:, :, :-1] + DHASH_MARGIN).reshape(len(gray), 64)
    return np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel()


# --- candidates: dHashes within a few bits -----------------------------------------------


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


# --- confirmation and survivors ----------------------------------------------------------


def relative_difference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row pair of (m, row_width) thumbnails: `pair_differences` of a[i] and b[i]."""
    m = len(a)
    both = np.concatenate([np.asarray(a, np.uint8), np.asarray(b, np.uint8)])
    return pair_differences(both, np.arange(m), np.arange(m, 2 * m))


# The aligned comparison (see `pair_differences`).
ALIGNED = 2.5  # its bound, as a multiple of clean.near_duplicate_difference
ALIGN_MIN_SIDE = 24  # thumbnails smaller than this are compared plain only
BLUR = 1 / 28  # the Gaussian both rows are blurred with, its sigma as a share of the side
CROP = 0.03  # share of a side a copy may have lost at each edge: the alignments tried
MARGIN = 0.07  # share of the side left out at each edge: what a crop and the blur change
_CROP_STEPS = 4  # crops tried per edge, 0 to CROP: 16 per axis
ALIGN_WITHIN = 0.35  # pairs aligned: plain within this (few-pixel crops: under 0.26)
COLOUR = 16.0  # largest colour-plane difference (0-255 opponent units) of RGB copies
LOCAL_BOX = 3  # side (px) of the windows whose mean difference `local` takes the largest of


def pair_differences(
    thumbs: np.ndarray, first: np.ndarray, second: np.ndarray, bound: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(difference, contrast ratio, colour), float64 (m,), of rows thumbs[first] and
    thumbs[second] (`thumbnail` rows: grey, plus colour planes for RGB).

    difference: the smaller of two comparisons of the grey thumbnails, each row
    standardised once however many pairs it is in (mean removed, divided by its pixel std
    floored at MIN_SCALE):
      plain    the mean absolute difference of the two rows: 0 for identical rows and
               for a brightness or contrast change, ~0.15 and up for two drawings of one
               character on 16x16 thumbnails.
      aligned  (thumbnails of ALIGN_MIN_SIDE px or more, pairs over `bound` but within
               ALIGN_WITHIN plain; `_aligned`) the rows blurred, one aligned to the other
               for a crop of up to CROP of each edge, compared on their inner region;
               divided by ALIGNED, so that a pair is confirmed when either comparison is
               within clean.near_duplicate_difference (`confirmed_pairs` passes it as
               `bound`: a pair within it plain needs no alignment). Why: a
               copy cropped by a few pixels and scaled back is a shifted, slightly
               magnified original, and on thin strokes half a pixel of shift differs as
               much as another hand does (plain, such copies differ by 0.06-0.26); aligned
               and blurred they differ by under 0.09, two drawings of one character by
               0.12 and up (28 px images; benchmarks/near_duplicates.py). Below
               ALIGN_MIN_SIDE there is too little left to align (on 8x8 digits distinct
               drawings of a 1 come within 0.08 of each other aligned).
    contrast ratio: the larger grey pixel std over the smaller (>= 1), which bounds the
    contrast change the difference ignores.
    colour: for RGB rows, the largest absolute difference (0-255 opponent units) of the
    colour planes over their inner cells, aligned as the comparison that counted; 0 for
    grey rows. It sees what grey cannot: a shape moved across a background of its own
    brightness.
    """
    side, c = _layout(np.shape(thumbs)[1])
    rows = np.asarray(thumbs[:, : side * side], dtype=np.float32)
    rows -= rows.mean(axis=1, keepdims=True)
    std = np.maximum(np.sqrt((rows * rows).mean(axis=1)), np.float32(MIN_SCALE))
    rows /= std[:, None]
    delta = rows[first]
    delta -= rows[second]
    np.abs(delta, out=delta)
    difference = delta.mean(axis=1, dtype=np.float64)
    del delta
    colour = np.zeros(len(first))
    planes = None
    if c:
        planes = np.asarray(thumbs[:, side * side :], dtype=np.float32).reshape(-1, 2, c, c)
        colour = _colour_gap(planes[first], planes[second])
    near = np.flatnonzero((difference > bound) & (difference <= ALIGN_WITHIN))
    if side >= ALIGN_MIN_SIDE and len(near):
        members, index = np.unique(np.stack([first[near], second[near]]), return_inverse=True)
        index = index.reshape(2, -1)
        aligned, aligned_colour, _ = _aligned(
            rows[members].reshape(-1, side, side),
            None if planes is None else planes[members],
            index[0],
            index[1],
        )
        better = aligned / ALIGNED < difference[near]
        difference[near[better]] = aligned[better] / ALIGNED
        colour[near[better]] = aligned_colour[better]
    ratio = std[first] / std[second]
    return difference, np.maximum(ratio, 1 / ratio).astype(np.float64), colour


def local_differences(thumbs: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """float64 (m,): how far rows thumbs[first] and thumbs[second] are apart where they
    differ most. Thumbnails of ALIGN_MIN_SIDE px or more are blurred and compared as
    `_aligned` compares them (as they are, or aligned either way, whichever is closest on
    the mean); the largest mean absolute difference over a LOCAL_BOX-square window of
    that comparison counts (`_local_gap`). Smaller thumbnails give 0: too few pixels to
    tell texture.
    Why: a copy differs little everywhere, while two photos of look-alike products (two
    dresses on black, one plain and one printed) match in their silhouettes, which
    dominate the mean difference, and differ in one place, a print or a strap. (Letting
    each window take its best shift by a pixel forgives a crop's imperfect alignment, but
    also look-alike textures: on Fashion-MNIST it removed 8x as many distinct photos.)
    """
    side, _ = _layout(np.shape(thumbs)[1])
    if side < ALIGN_MIN_SIDE or not len(first):
        return np.zeros(len(first))
    rows = np.asarray(thumbs[:, : side * side], dtype=np.float32)
    rows -= rows.mean(axis=1, keepdims=True)
    rows /= np.maximum(np.sqrt((rows * rows).mean(axis=1)), np.float32(MIN_SCALE))[:, None]
    return _aligned(rows.reshape(-1, side, side), None, first, second, local=True)[2]


def _aligned(
    rows: np.ndarray,
    planes: np.ndarray | None,
    first: np.ndarray,
    second: np.ndarray,
    local: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(difference, colour, local) of standardised (m, side, side) grey rows, blurred
    (BLUR) and compared on their inner region (MARGIN left out at each edge),
    restandardised there: as they are and aligned both ways round, one to the other, per
    axis by the crop of up to CROP of each edge whose warped profile (the row's mean along
    the other axis) best matches the other row's (`_best_maps`). The smallest of the three
    counts; colour is the colour-plane gap (`_colour_gap`) and, when asked for, local the
    largest window gap (`_local_gap`) of that same comparison."""
    side = rows.shape[1]
    rows = _blurred(rows)
    inner = slice(_margin(side), side - _margin(side))
    centres = _standardised(rows[:, inner, inner])  # what each row is compared on
    difference = _mean_gap(centres[first], centres[second])
    gaps = _local_gap(centres[first], centres[second]) if local else None
    colour = np.zeros(len(first))
    if planes is not None:
        colour = _colour_gap(planes[first], planes[second])
    maps = _crop_maps(side)
    cols, lines = rows.mean(axis=1), rows.mean(axis=2)  # profiles along x and along y
    for a, b in ((first, second), (second, first)):
        kx = _best_maps(maps, cols[a], cols[b])
        ky = _best_maps(maps, lines[a], lines[b])
        warped = _warp(rows[a], maps, ky, kx)  # transposed: so is what it is compared with
        way = _mean_gap(_standardised(warped[:, inner, inner]), centres[b].swapaxes(1, 2))
        better = way < difference
        difference[better] = way[better]
        if gaps is not None:
            gaps[better] = _local_gap(
                _standardised(warped[better][:, inner, inner]), centres[b[better]].swapaxes(1, 2)
            )
        if planes is not None:
            c = planes.shape[-1]
            moved = _warp(planes[a].reshape(-1, c, c), _crop_maps(c), ky.repeat(2), kx.repeat(2))
            gap = _colour_gap(moved.reshape(-1, 2, c, c), planes[b].swapaxes(2, 3))
            colour[better] = gap[better]
    return difference, colour, gaps


def _mean_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m,) float64: the mean absolute difference of each (h, w) pair."""
    delta = a - b
    np.abs(delta, out=delta)
    return delta.mean(axis=(1, 2), dtype=np.float64)


def _local_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m,) float64: the largest mean absolute difference of each (h, w) pair over a
    LOCAL_BOX-square window inside it (box sums by a summed-area table)."""
    delta = np.abs(a - b, dtype=np.float64)
    if not len(delta):
        return np.zeros(0)
    table = np.zeros((len(delta), delta.shape[1] + 1, delta.shape[2] + 1))
    table[:, 1:, 1:] = delta.cumsum(axis=1).cumsum(axis=2)
    k = LOCAL_BOX
    sums = table[:, k:, k:] - table[:, :-k, k:] - table[:, k:, :-k] + table[:, :-k, :-k]
    return sums.reshape(len(delta), -1).max(axis=1) / (k * k)


def _colour_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m,) float64: the largest absolute difference of (2, c, c) colour planes over their
    inner cells (an edge cell is what a crop changes most)."""
    inner = slice(1, -1) if a.shape[-1] > 2 else slice(None)
    return np.abs(a - b)[:, :, inner, inner].max(axis=(1, 2, 3)).astype(np.float64)


def _layout(width: int) -> tuple[int, int]:
    """(grey side, colour side or 0) of a `row_width`-byte thumbnail row."""
    root = math.isqrt(width)
    if root * root == width:
        return root, 0
    for side in range(root, 0, -1):
        if row_width(side, 3) == width:
            return side, colour_side(side)
    raise ValueError(f"{width} bytes is no thumbnail row's width")


def _standardised(x: np.ndarray) -> np.ndarray:
    """(m, h, w) rows, each with its mean removed and divided by its std (floored)."""
    x = x - x.mean(axis=(1, 2), keepdims=True)
    return x / np.maximum(np.sqrt((x * x).mean(axis=(1, 2), keepdims=True)), np.float32(1e-3))


def _margin(side: int) -> int:
    """Pixels left out at each edge of the grey comparison (MARGIN of the side, at least 1)."""
    return min(max(1, round(side * MARGIN)), (side - 1) // 2)


@functools.cache
def _blur_matrix(side: int) -> np.ndarray:
    """(side, side) float32: a Gaussian blur of sigma BLUR * side px, renormalised at the
    edges."""
    x = np.arange(side)
    weights = np.exp(-0.5 * ((x[:, None] - x[None, :]) / (BLUR * side)) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _blurred(rows: np.ndarray) -> np.ndarray:
    """(m, side, side) rows blurred along both axes: two matrix products over all rows."""
    m, side, _ = rows.shape
    blur_t = _blur_matrix(side).T
    along_x = (rows.reshape(m * side, side) @ blur_t).reshape(m, side, side)
    along_y = along_x.transpose(0, 2, 1).reshape(m * side, side) @ blur_t
    return np.ascontiguousarray(along_y.reshape(m, side, side).transpose(0, 2, 1))


Maps = tuple[np.ndarray, np.ndarray, np.ndarray]  # `_crop_maps`: (lower, upper, weight)


@functools.cache
def _crop_maps(side: int) -> Maps:
    """Linear resamplings of a side-long axis, identity first: (lower, upper, weight), each
    (K, side), output pixel i = (1 - weight) * input[lower] + weight * input[upper]. Map k
    is the axis a copy cropped by (start, end) shares of its side, 0 to CROP each, and
    scaled back would have."""
    shares = np.linspace(0.0, CROP, _CROP_STEPS)
    out = np.arange(side)
    lower, upper, weight = [], [], []
    for start, end in itertools.product(shares, shares):
        where = (start + (1 - start - end) * (out + 0.5) / side) * side - 0.5
        where = np.clip(where, 0, side - 1)
        lo = np.floor(where).astype(np.intp)
        lower.append(lo)
        upper.append(np.minimum(lo + 1, side - 1))
        weight.append((where - lo).astype(np.float32))
    return np.stack(lower), np.stack(upper), np.stack(weight)


def _warp(rows: np.ndarray, maps: Maps, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """(m, w, h): (m, h, w) rows, row i resampled by map ky[i] along y and map kx[i] along
    x, transposed (two gathers of whole lines; callers compare it with transposed rows)."""
    return _warp_lines(_warp_lines(rows, maps, ky).transpose(0, 2, 1), maps, kx)


def _warp_lines(rows: np.ndarray, maps: Maps, k: np.ndarray) -> np.ndarray:
    """(m, h, w) rows resampled along axis 1, row i by map k[i]."""
    lower, upper, weight = maps
    pick = np.arange(len(rows))[:, None]
    w = weight[k][:, :, None]
    out = rows[pick, upper[k]]
    out -= rows[pick, lower[k]]
    out *= w
    out += rows[pick, lower[k]]
    return out


def _best_maps(maps: Maps, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per pair, the index of the map whose warped `source` profile, standardised, is
    closest (mean absolute difference) to the standardised `target` profile."""
    lower, upper, weight = maps
    warped = source[:, lower] * (1 - weight) + source[:, upper] * weight  # (m, K, side)
    warped = _standardised_last(warped)
    target = _standardised_last(target)[:, None, :]
    return np.abs(warped - target).mean(axis=2).argmin(axis=1)


def _standardised_last(x: np.ndarray) -> np.ndarray:
    """x with its mean along the last axis removed, divided by its std there (floored)."""
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.maximum(np.sqrt((x * x).mean(axis=-1, keepdims=True)), np.float32(1e-3))


def confirmed_pairs(
    hashes: np.ndarray,
    thumbs: np.ndarray,
    rows: np.ndarray,
    max_distance: int,
    max_difference: float,
    max_contrast: float,
    max_local: float,
) -> np.ndarray:
    """Pairs (i, j), i < j, of positions in `rows` whose dHashes are within `max_distance`
    bits and whose thumbnails are within `max_difference`, `max_contrast` and `max_local`
    of each other (`pair_differences`).

    `hashes` and `thumbs` are per row of the dataset; `rows` picks and orders the rows
    compared. `thumbs` may be anything with a `shape` that an index array of rows gives an
    array of (a memory map, tasks/clean/merge.py's `RowReader`): only candidates' rows are
    read, a block of pairs at a time.
    """
    pairs = near_duplicate_pairs(hashes[rows], max_distance)
    confirmed = [np.empty((0, 2), dtype=np.int64)]
    step = max(1, _CONFIRM_FLOATS // max(1, thumbs.shape[1]))
    for lo in range(0, len(pairs), step):
        part = pairs[lo : lo + step]
        members, index = np.unique(part, return_inverse=True)
        index = index.reshape(part.shape)
        thumbs_part = thumbs[rows[members]]
        difference, ratio, colour = pair_differences(
            thumbs_part, index[:, 0], index[:, 1], max_difference
        )
        same = np.flatnonzero(
            (difference <= max_difference) & (ratio <= max_contrast) & (colour <= COLOUR)
        )
        # Only pairs that pass the rest (few) are compared locally.
        local = local_differences(thumbs_part, index[same, 0], index[same, 1])
        confirmed.append(part[same[local <= max_local]])
    return np.concatenate(confirmed)


def drop_order(pairs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of n ranked positions go, given confirmed pairs (i, j), i < j: the later one
    of each pair, unless the earlier one has gone already (so a chain a~b~c keeps a and c
    when b goes for a). Returns (dropped, keeper) positions, by dropped position."""
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]
    kept = np.ones(n, dtype=bool)
    dropped: list[int] = []
    keepers: list[int] = []
    for i, j in pairs.tolist():
        if kept[i] and kept[j]:
            kept[j] = False
            dropped.append(j)
            keepers.append(i)
    return np.array(dropped, dtype=np.int64), np.array(keepers, dtype=np.int64)


# --- the sheet: each removed image beside the kept one it matched -------------------------

SHEET_CELL = 64  # px per image on the sheet: small images are scaled up to be seen
_GAP = 4  # px between images and between pairs
_PAIR_GAP = 12  # px between one pair and the next on a row


def sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray]], per_row: int = 4) -> Image.Image:
    """An RGB sheet of (removed, kept) image pairs, removed on the left of each pair,
    `per_row` pairs a row, each image scaled (nearest) into a SHEET_CELL square cell.
    No pairs: one empty row (a file that exists says the rule ran)."""
    out = Image.new("RGB", sheet_size(len(pairs), per_row), (255, 255, 255))
    for k, (removed, kept) in enumerate(pairs):
        x = _PAIR_GAP + (k % per_row) * (2 * SHEET_CELL + _GAP + _PAIR_GAP)
        y = _GAP + (k // per_row) * (SHEET_CELL + _GAP)
        out.paste(_cell(removed), (x, y))
        out.paste(_cell(kept), (x + SHEET_CELL + _GAP, y))
    return out


def sheet_size(n_pairs: int, per_row: int = 4) -> tuple[int, int]:
    """(width, height) of `sheet` for n_pairs pairs."""
    if per_row < 1:
        raise ValueError(f"per_row must be at least 1, got {per_row}")
    cols = max(1, min(per_row, n_pairs))
    rows = max(1, -(-n_pairs // per_row))
    return (
        cols * (2 * SHEET_CELL + _GAP) + (cols + 1) * _PAIR_GAP,
        rows * SHEET_CELL + (rows + 1) * _GAP,
    )


def _cell(pixels: np.ndarray) -> Image.Image:
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB")
    scale = SHEET_CELL / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST)
