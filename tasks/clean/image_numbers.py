"""Per-image numbers of the near-duplicate rule (tasks/clean/near_duplicates.py): the
64-bit dHash its candidates are found by and the thumbnail its confirmation compares.

Contract: pure functions. `dhash` is a bit a step of over DHASH_MARGIN grey levels between
neighbouring cells of a 9x8 bilinear resize; `thumbnail` is a grey thumbnail of side s =
`thumbnail_side` (BOX resampling), plus for RGB images two colour-opponent planes of side
s / 4 (`colour_planes`), flattened into `row_width` bytes. The batch functions (`grays`,
`dhashes`, `thumbnails`) equal, image by image, the per-image ones (tests/test_near_duplicates.py
checks it), only without a Python call per image.

Memory: pass 1 keeps a thumbnail row per kept row in a row file that only candidates are
read back from: s * s bytes for grey (784 at 28x28, 64 for the demo's 8x8), s * s * 9 / 8
for RGB (1152 at 32x32).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


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
# above, only without a Python call per image.


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


# --- the crop key: the dHash a copy cropped on every side would have ---------------------
# A copy cropped by a pixel a side of a 28 px image and scaled back is magnified by 7%: its
# dHash moves by 5-8 bits as often as not, past the candidates' distance. The crop key is the
# dHash of the image itself cropped by `key_crop` px a side, so that such a copy's dHash is
# near its original's crop key (tasks/clean/candidates.py's `crop_pairs`).
KEY_CROP = 0.04  # share of the side the crop key crops at each edge (at least a pixel)


def key_crop(side: int) -> int:
    """Pixels the crop key crops at each edge of a side-px image: KEY_CROP of the side,
    rounded, at least 1 (never so many that nothing is left)."""
    return min(max(1, round(KEY_CROP * side)), max(0, (side - 1) // 2))


def key_share(side: int) -> float:
    """`key_crop` as a share of the side: what the confirmation crops a thumbnail by."""
    return key_crop(side) / side


def crop_dhash(pixels: np.ndarray) -> int:
    """`dhash` of the image cropped by `key_crop` px at each edge and scaled back to its
    size (BILINEAR, as clean converts every image to clean.image_size): the dHash a copy so
    cropped has once cleaned."""
    gray = grays(pixels[None])[0]
    h, w = gray.shape
    k = key_crop(min(h, w))
    crop = Image.fromarray(np.ascontiguousarray(gray[k : h - k, k : w - k]))
    return dhash(np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR)))


def crop_dhashes(gray: np.ndarray) -> np.ndarray:
    """(m,) uint64: `crop_dhash` of each image of an (m, H, W) grey stack."""
    _, h, w = gray.shape
    k = key_crop(min(h, w))
    crop = np.ascontiguousarray(gray[:, k : h - k, k : w - k])
    return dhashes(_resize_many(crop, (w, h), Image.Resampling.BILINEAR))
