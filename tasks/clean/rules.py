"""The cleaning rules: per image (pure functions of one image's bytes or pixels), their
vectorised twins for a chunk of same-shape images, and the whole-dataset duplicate rules.

Contract: every function here is pure (no I/O, no state). A vectorised twin decides each
row exactly as its per-image function does (`blank_flags` agrees with `is_blank` row by
row); only the Python call per image is saved. The order in which a row meets the rules,
and so its quarantine reason, is in the package docstring (tasks/clean/__init__.py).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

import tasks.clean.near_duplicates as near_duplicates
from synthloop.config import CleanConfig

_MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class Converted:
    """A decoded image, converted to the configured size and channels."""

    pixels: np.ndarray  # (H, W) or (H, W, 3) uint8
    png: bytes
    resized: bool
    mode_changed: bool


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str
    keeper: int | None = None  # near_duplicate: the kept row it matched (pass-1 position)


# --- per-image rules --------------------------------------------------------------------


def map_label(label: str, cfg: CleanConfig) -> str | Rejection:
    label = cfg.label_map.get(label, label)
    if cfg.labels is not None and label not in cfg.labels:
        return Rejection("label_not_allowed", f"label {label!r} is not in clean.labels")
    return label


def convert_image(data: bytes, cfg: CleanConfig) -> Converted | Rejection:
    """Decode-verify one image and convert it; never raises on bad bytes."""
    if not data:
        return Rejection("zero_byte", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Rejection("not_an_image", "no image format recognised")
    except Image.DecompressionBombError as err:
        return Rejection("too_many_pixels", str(err))
    width, height = image.size
    if width * height > cfg.max_pixels:
        return Rejection(
            "too_many_pixels", f"{width}x{height} is over clean.max_pixels={cfg.max_pixels}"
        )
    source_format = image.format
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return Rejection("truncated", f"{type(err).__name__}: {err}")

    mode = _MODES[cfg.channels]
    mode_changed = image.mode != mode
    if mode_changed:
        image = image.convert(mode)
    size = (cfg.image_size, cfg.image_size)
    resized = image.size != size
    if resized:
        image = image.resize(size, Image.Resampling.BILINEAR)
    if source_format == "PNG" and not (mode_changed or resized):
        png = data  # already what we would write: keep the original bytes
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        png = buf.getvalue()
    return Converted(_pixels(image), png, resized, mode_changed)


def _pixels(image: Image.Image) -> np.ndarray:
    """The same read-only array as np.asarray(image) for an "L" or "RGB" image, faster."""
    width, height = image.size
    shape = (height, width) if image.mode == "L" else (height, width, len(image.getbands()))
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(shape)


def is_blank(pixels: np.ndarray, cfg: CleanConfig) -> bool:
    return float(pixels.std()) < cfg.blank_std


# --- the same rule for many same-shape images at once -----------------------------------


def blank_flags(pixels: list[np.ndarray], cfg: CleanConfig) -> list[bool]:
    """`is_blank` of each image, vectorised when they share a shape."""
    if not pixels:
        return []
    shape = pixels[0].shape
    if not _std_is_exactable(shape) or any(p.shape != shape for p in pixels):
        return [is_blank(p, cfg) for p in pixels]
    stds = _stds(np.stack(pixels))
    flags = stds < cfg.blank_std
    # _stds can differ from numpy's std in the last bits: decide rows that close to the
    # threshold with is_blank itself.
    for j in np.flatnonzero(np.abs(stds - cfg.blank_std) <= 1e-6 * max(1.0, cfg.blank_std)):
        flags[j] = is_blank(pixels[j], cfg)
    return flags.tolist()


def _stds(pixels: np.ndarray) -> np.ndarray:
    """Per-row pixel std of an (m, ...) uint8 stack, from exact integer sums.

    Agrees with `pixels[i].std()` to ~1e-13; callers re-check rows near a threshold with
    numpy's own std, so decisions match `is_blank` exactly.
    """
    flat = pixels.reshape(len(pixels), -1)
    k = flat.shape[1]
    total = flat.sum(axis=1, dtype=np.int64)
    squares = flat.astype(np.uint16)
    squares *= squares  # 255**2 fits in uint16
    numerator = k * squares.sum(axis=1, dtype=np.int64) - total * total
    return np.sqrt(numerator.astype(np.float64)) / k


def _std_is_exactable(shape: tuple[int, ...]) -> bool:
    """Whether `_stds`' int64 sums cannot overflow for images of this shape."""
    k = int(np.prod(shape))
    return k * k * 255 * 255 < 2**62


# --- whole-dataset rules (pure functions over arrays) -----------------------------------


def resolve_duplicates(
    ids: np.ndarray,
    labels: np.ndarray,
    pixel_hashes: np.ndarray,
    dhashes: np.ndarray,
    thumbnails: np.ndarray,
    max_distance: int,
    max_difference: float,
    max_contrast: float,
    max_local: float,
    names: Callable[[np.ndarray], list[str]] | None = None,
    crop_dhashes: np.ndarray | None = None,
    crop_share: float = 0.0,
) -> tuple[np.ndarray, list[Rejection | None]]:
    """Decide which rows survive de-duplication.

    Near-duplicates: dHashes within `max_distance` bits propose a pair; their thumbnails
    within `max_difference` and `max_contrast` of each other confirm it
    (`near_duplicates.relative_difference`: relative to their own pixel std). A hash alone
    is too coarse: distinct 8x8 digits and distinct sparse drawings of one character often
    share a dHash.
    `crop_dhashes` (image_numbers.crop_dhash, keyed by `crop_share`, image_numbers.key_share)
    propose pairs too: a row and a copy of it cropped on every side (near_duplicates.py).
    Rows are ranked by id so the survivor of a group does not depend on file order. `ids`
    may be the ids or anything that orders and groups rows as they do (their ranks); then
    `names(rows)` gives the ids of those rows (default: `str(ids[row])`), called once, for
    the keepers that the details name.
    Returns (keep mask, a Rejection or None per row); a dropped row's detail names its keeper.
    """
    if names is None:
        names = lambda rows: [str(ids[r]) for r in rows]  # noqa: E731
    n = len(ids)
    keep = np.ones(n, dtype=bool)
    rejections: list[Rejection | None] = [None] * n
    # Only rows whose pixel hash repeats can be exact duplicates: group just those.
    hashes = pixel_hashes.astype(np.uint64, copy=False)
    inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)[1:]
    repeated = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
    del inverse, counts  # row-sized: not held through the near-duplicate search
    import pandas as pd  # here: decode workers import this module and never need pandas

    frame = pd.DataFrame(
        {"id": ids[repeated], "label": labels[repeated], "h": hashes[repeated]}, index=repeated
    )
    frame = frame.sort_values("id", kind="stable")
    copies: list[tuple[int, int]] = []  # (exact duplicate, its keeper)
    for _, group in frame.groupby("h", sort=False):
        rows = group.index.to_numpy()
        if group["label"].nunique() > 1:
            detail = "same pixels labelled " + ", ".join(sorted(group["label"].unique()))
            for r in rows:
                keep[r] = False
                rejections[r] = Rejection("conflicting_labels", detail)
        else:
            for r in rows[1:]:
                keep[r] = False
                copies.append((int(r), int(rows[0])))

    by_id = np.argsort(ids, kind="stable")  # not ids[survivors]: a copy of every id
    survivors = by_id[keep[by_id]]
    del by_id
    # Positions in `survivors`, which is id-ordered: a pair's first row ranks first.
    pairs = near_duplicates.confirmed_pairs(
        dhashes,
        thumbnails,
        survivors,
        max_distance,
        max_difference,
        max_contrast,
        max_local,
        crop_hashes=crop_dhashes,
        crop_share=crop_share,
    )
    dropped, keepers = near_duplicates.drop_order(pairs, len(survivors))
    near = list(zip(survivors[dropped].tolist(), survivors[keepers].tolist(), strict=True))
    named = np.unique(np.array([i for _, i in copies + near], dtype=np.int64))
    name = dict(zip(named.tolist(), names(named), strict=True))
    for j, i in copies:
        rejections[j] = Rejection("exact_duplicate", f"same pixels as {name[i]}")
    for j, i in near:
        keep[j] = False
        detail = (
            f"a copy (dHash or crop key within {max_distance} bits, confirmed on thumbnails) "
            f"of {name[i]}"
        )
        rejections[j] = Rejection("near_duplicate", detail, keeper=i)
    return keep, rejections
