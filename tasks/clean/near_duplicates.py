"""Near-duplicates: a cheap candidate search, a confirmation that removes copies (re-encoded,
resized, recompressed, cropped by a few pixels, brightened) but not look-alikes (sparse
drawings of one character, product photos with one silhouette, photos that differ only in
colour), and a sheet of what was removed.

Contract (clean's `near_duplicate` rule; docs/data.md's table of quarantine reasons):
  candidates    64-bit dHashes (`dhash`, a bit a step of over DHASH_MARGIN grey levels)
                within clean.near_duplicate_distance bits (`near_duplicate_pairs`):
                cheap, and coarse on purpose. From s = ALIGN_MIN_SIDE up also a row's
                crop key (`crop_dhash`: its dHash once cropped by KEY_CROP of each edge
                and scaled back) within as many bits of another row's dHash
                (`crop_pairs`): that row may be it cropped on every side.
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
                A crop-key pair is confirmed the same way once the first row's
                thumbnail is cropped as its key was and scaled back, with stricter
                bounds: aligned only within KEY_WITHIN plain, and its local bound
                KEY_LOCAL times clean.near_duplicate_local (`_confirmed_crops`).
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
and about 4 in 10 such crops are kept by the plain candidates' confirmation
(docs/measurements.md's near-duplicate table, from benchmarks/near_duplicates.py, gives
every transform's recall on procedural and real images).
Why a crop key: cleaned at 28 px, a copy cropped by a pixel a side is the original
magnified by 7%, past both the dHash distance (its dHash moves by 5-8 bits as often as
not) and the alignment's CROP. Its original cropped the same way is nearly the copy, so
the pair is found by the key and compared with the crop undone, where a copy differs by
under 0.02 and look-alikes by 0.12 and up; the stricter local bound (0.12 at the default
0.16) is what keeps the few photos with one silhouette that the key also proposes
(Fashion-MNIST-LT with planted copies: 1 wrong pair instead of 23 at the plain bound).

Cost: candidate pairs within ALIGN_WITHIN plain but over the bound are blurred and aligned
(tasks/clean/alignment.py): most candidates differ by far more and cost one comparison.
The crop key doubles the hashes the candidate search sorts and adds its pairs, most of
which cost one comparison (KEY_WITHIN is tighter than ALIGN_WITHIN).

Where: the per-image numbers are tasks/clean/image_numbers.py's, the candidate search
tasks/clean/candidates.py's, the aligned comparison tasks/clean/alignment.py's (BLUR,
CROP, MARGIN, LOCAL_BOX) and the sheet tasks/clean/sheet.py's. This module holds the
confirmation's bounds (ALIGNED, ALIGN_MIN_SIDE, ALIGN_WITHIN, COLOUR), read, and set by
the tests, as its attributes; only clean runs it.
"""

from __future__ import annotations

import math

import numpy as np

from tasks.clean.alignment import colour_gap, compare_aligned, zoomed
from tasks.clean.candidates import crop_pairs, near_duplicate_pairs
from tasks.clean.image_numbers import colour_side, row_width

MIN_SCALE = 1.0  # std floor (0-255): a constant thumbnail divides by this, not by 0
# Candidate pairs compared at once: 4M floats (16 MiB) a row-sized array of the block, a
# few of which are alive at once, whatever the thumbnail size.
_CONFIRM_FLOATS = 1 << 22


# --- confirmation and survivors ----------------------------------------------------------


def relative_difference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row pair of (m, row_width) thumbnails: `pair_differences` of a[i] and b[i]."""
    m = len(a)
    both = np.concatenate([np.asarray(a, np.uint8), np.asarray(b, np.uint8)])
    return pair_differences(both, np.arange(m), np.arange(m, 2 * m))


# The aligned comparison (see `pair_differences`).
ALIGNED = 2.5  # its bound, as a multiple of clean.near_duplicate_difference
ALIGN_MIN_SIDE = 24  # thumbnails smaller than this are compared plain only
ALIGN_WITHIN = 0.35  # pairs aligned: plain within this (few-pixel crops: under 0.26)
COLOUR = 16.0  # largest colour-plane difference (0-255 opponent units) of RGB copies
# Pairs found through a crop key (`_confirmed_crops`), compared once the first is cropped
# as its key was: aligned only if within this plain (copies: under 0.02), and held to this
# share of clean.near_duplicate_local.
KEY_WITHIN = 0.15
KEY_LOCAL = 0.75


def pair_differences(
    thumbs: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    bound: float = 0.0,
    within: float | None = None,
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
               ALIGN_WITHIN plain; `compare_aligned`) the rows blurred, one aligned to the other
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
        colour = colour_gap(planes[first], planes[second])
    within = ALIGN_WITHIN if within is None else within
    near = np.flatnonzero((difference > bound) & (difference <= within))
    if side >= ALIGN_MIN_SIDE and len(near):
        members, index = np.unique(np.stack([first[near], second[near]]), return_inverse=True)
        index = index.reshape(2, -1)
        aligned, aligned_colour, _ = compare_aligned(
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
    `compare_aligned` compares them (as they are, or aligned either way, whichever is closest on
    the mean); the largest mean absolute difference over a LOCAL_BOX-square window of
    that comparison counts (tasks/clean/alignment.py). Smaller thumbnails give 0: too few pixels to
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
    # Only the rows in these pairs (few: those that passed the rest) are blurred.
    members, index = np.unique(np.stack([first, second]), return_inverse=True)
    index = index.reshape(2, -1)
    rows = np.asarray(np.asarray(thumbs[members])[:, : side * side], dtype=np.float32)
    rows -= rows.mean(axis=1, keepdims=True)
    rows /= np.maximum(np.sqrt((rows * rows).mean(axis=1)), np.float32(MIN_SCALE))[:, None]
    return compare_aligned(rows.reshape(-1, side, side), None, index[0], index[1], local=True)[2]


def _layout(width: int) -> tuple[int, int]:
    """(grey side, colour side or 0) of a `row_width`-byte thumbnail row."""
    root = math.isqrt(width)
    if root * root == width:
        return root, 0
    for side in range(root, 0, -1):
        if row_width(side, 3) == width:
            return side, colour_side(side)
    raise ValueError(f"{width} bytes is no thumbnail row's width")


def confirmed_pairs(
    hashes: np.ndarray,
    thumbs: np.ndarray,
    rows: np.ndarray,
    max_distance: int,
    max_difference: float,
    max_contrast: float,
    max_local: float,
    crop_hashes: np.ndarray | None = None,
    crop_share: float = 0.0,
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
    side, _ = _layout(thumbs.shape[1])
    if crop_hashes is not None and crop_share > 0 and side >= ALIGN_MIN_SIDE:
        keyed = crop_pairs(hashes[rows], crop_hashes[rows], max_distance)
        for lo in range(0, len(keyed), step):
            confirmed.append(
                _confirmed_crops(
                    thumbs,
                    rows,
                    keyed[lo : lo + step],
                    crop_share,
                    max_difference,
                    max_contrast,
                    max_local,
                )
            )
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
    return np.unique(np.concatenate(confirmed), axis=0)


def _confirmed_crops(
    thumbs: np.ndarray,
    rows: np.ndarray,
    part: np.ndarray,
    share: float,
    max_difference: float,
    max_contrast: float,
    max_local: float,
) -> np.ndarray:
    """Of crop-key pairs (i, j) (j may be i cropped by `share` of each edge), those whose
    thumbnails are within the bounds once i's is cropped so and scaled back, with the
    stricter KEY_WITHIN and KEY_LOCAL; as (smaller, larger) position pairs."""
    keys, first = np.unique(part[:, 0], return_inverse=True)
    plains, second = np.unique(part[:, 1], return_inverse=True)
    key_thumbs = np.asarray(thumbs[rows[keys]])
    side, c = _layout(key_thumbs.shape[1])
    zoomed_rows = [zoomed(key_thumbs[:, : side * side].reshape(-1, side, side), share)]
    if c:
        planes = key_thumbs[:, side * side :].reshape(-1, c, c)
        zoomed_rows.append(zoomed(planes, share).reshape(len(keys), -1))
    zoomed_thumbs = np.concatenate([z.reshape(len(keys), -1) for z in zoomed_rows], axis=1)
    both = np.concatenate([zoomed_thumbs, np.asarray(thumbs[rows[plains]], np.float32)])
    second = second + len(keys)
    # Most key pairs are look-alikes far apart: a bound below their plain difference drops
    # them without comparing every pixel.
    close = _plain_lower_bound(both[:, : side * side], side, first, second) <= KEY_WITHIN
    part, first, second = part[close], first[close], second[close]
    difference, ratio, colour = pair_differences(
        both, first, second, max_difference, within=KEY_WITHIN
    )
    same = np.flatnonzero(
        (difference <= max_difference) & (ratio <= max_contrast) & (colour <= COLOUR)
    )
    local = local_differences(both, first[same], second[same])
    return np.sort(part[same[local <= max_local * KEY_LOCAL]], axis=1)


_BOUND_CELL = 4  # px: `_plain_lower_bound` sums the differences over cells this wide


def _plain_lower_bound(
    grey: np.ndarray, side: int, first: np.ndarray, second: np.ndarray
) -> np.ndarray:
    """(m,) float64, at most the plain difference `pair_differences` finds for each pair
    (less a rounding slack): grey rows standardised as there, the absolute difference of
    their sums over each _BOUND_CELL-square cell (never more than the sum of the absolute
    differences in it), over all the pixels. 16x fewer numbers a pair than the plain
    comparison."""
    rows = np.asarray(grey, dtype=np.float32)
    rows = rows - rows.mean(axis=1, keepdims=True)
    rows /= np.maximum(np.sqrt((rows * rows).mean(axis=1)), np.float32(MIN_SCALE))[:, None]
    q = side // _BOUND_CELL
    cells = rows.reshape(-1, side, side)[:, : q * _BOUND_CELL, : q * _BOUND_CELL]
    cells = cells.reshape(-1, q, _BOUND_CELL, q, _BOUND_CELL).sum(axis=(2, 4)).reshape(-1, q * q)
    gap = np.abs(cells[first] - cells[second]).sum(axis=1, dtype=np.float64)
    return gap / (side * side) - 1e-4


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
