"""The aligned comparison of the near-duplicate confirmation (tasks/clean/near_duplicates.py's
`pair_differences` and `local_differences`): two standardised grey thumbnails blurred and
one aligned to the other for a crop of up to CROP of each edge.

Contract: `compare_aligned` compares pairs of (m, side, side) standardised rows, blurred (sigma
BLUR of the side) and compared on their inner region (MARGIN left out at each edge),
restandardised there: as they are and aligned both ways round, per axis by the crop of up
to CROP of each edge whose warped profile best matches the other row's (`_best_maps`); the
smallest mean absolute difference counts, and the colour-plane gap and the largest
LOCAL_BOX-square window gap are taken of that same comparison. Pure functions of their
inputs; the constants were measured together with near_duplicates.py's bounds.

Why aligned: a copy cropped by 1-3 px of 105 and scaled back is the original shifted by
under a pixel and magnified by a few per cent; on thin strokes that differs, plain, about
as much as another hand does (0.06-0.26 on 28 px thumbnails). Blurred (sigma BLUR of the
side) and aligned by the crop whose profiles match best, such copies differ by under 0.09
and drawings of one character by 0.12 and up.

Cost: 16 crops per axis chosen on 1-D profiles, two gathers per pair.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

BLUR = 1 / 28  # the Gaussian both rows are blurred with, its sigma as a share of the side
CROP = 0.03  # share of a side a copy may have lost at each edge: the alignments tried
MARGIN = 0.07  # share of the side left out at each edge: what a crop and the blur change
_CROP_STEPS = 4  # crops tried per edge, 0 to CROP: 16 per axis
LOCAL_BOX = 3  # side (px) of the windows whose mean difference `local` takes the largest of


def compare_aligned(
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
    counts; colour is the colour-plane gap (`colour_gap`) and, when asked for, local the
    largest window gap (`_local_gap`) of that same comparison."""
    side = rows.shape[1]
    rows = _blurred(rows)
    inner = slice(_margin(side), side - _margin(side))
    centres = _standardised(rows[:, inner, inner])  # what each row is compared on
    difference = _mean_gap(centres[first], centres[second])
    gaps = _local_gap(centres[first], centres[second]) if local else None
    colour = np.zeros(len(first))
    if planes is not None:
        colour = colour_gap(planes[first], planes[second])
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
            gap = colour_gap(moved.reshape(-1, 2, c, c), planes[b].swapaxes(2, 3))
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


def colour_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m,) float64: the largest absolute difference of (2, c, c) colour planes over their
    inner cells (an edge cell is what a crop changes most)."""
    inner = slice(1, -1) if a.shape[-1] > 2 else slice(None)
    return np.abs(a - b)[:, :, inner, inner].max(axis=(1, 2, 3)).astype(np.float64)


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


def zoomed(rows: np.ndarray, share: float) -> np.ndarray:
    """(m, h, w) float32: each row as a copy of it cropped by `share` of its side at each
    edge and scaled back (bilinear) would be."""
    out = np.asarray(rows, dtype=np.float32)
    for axis in (1, 2):
        lower, upper, weight = _crop_map(out.shape[axis], share, share)
        shape = [1, 1, 1]
        shape[axis] = len(weight)
        low = np.take(out, lower, axis=axis)
        out = low + (np.take(out, upper, axis=axis) - low) * weight.reshape(shape)
    return out


def _crop_map(side: int, start: float, end: float) -> Maps:
    """The resampling (lower, upper, weight), each (side,), of a side-long axis cropped by
    (start, end) shares of its side and scaled back: output pixel i = (1 - weight) *
    input[lower] + weight * input[upper]."""
    out = np.arange(side)
    where = (start + (1 - start - end) * (out + 0.5) / side) * side - 0.5
    where = np.clip(where, 0, side - 1)
    lower = np.floor(where).astype(np.intp)
    return lower, np.minimum(lower + 1, side - 1), (where - lower).astype(np.float32)


@functools.cache
def _crop_maps(side: int) -> Maps:
    """Linear resamplings of a side-long axis, identity first: (lower, upper, weight), each
    (K, side), output pixel i = (1 - weight) * input[lower] + weight * input[upper]. Map k
    is the axis a copy cropped by (start, end) shares of its side, 0 to CROP each, and
    scaled back would have."""
    shares = np.linspace(0.0, CROP, _CROP_STEPS)
    maps = [_crop_map(side, start, end) for start, end in itertools.product(shares, shares)]
    lower, upper, weight = zip(*maps, strict=True)
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
