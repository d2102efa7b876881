"""The hashes a cleaned row is compared by: its exact pixels (`pixel_hash`: exact and
conflicting duplicates), its dHash and its grey thumbnail (near-duplicates, computed by
tasks/clean/image_numbers.py).

Contract: pure functions; `pixel_hashes` and `row_numbers` equal, row by row, the per-image
functions (`pixel_hash`, `image_numbers.dhash`, `image_numbers.thumbnail`,
`image_numbers.crop_dhash`), vectorised
when the images share a shape. Hashes are (m,) uint64; thumbnails (m, `thumbnail_width`)
uint8: side x side grey (side = `thumbnail_side(cfg)`), plus colour planes for RGB.
"""

from __future__ import annotations

import hashlib

import numpy as np

import tasks.clean.image_numbers as image_numbers
from synthloop.config import CleanConfig


def pixel_hash(pixels: np.ndarray) -> int:
    """64-bit hash of the exact pixels and shape."""
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=8, person=bytes(pixels.shape[:3]))
    return int.from_bytes(digest.digest(), "little")


def pixel_hashes(pixels: list[np.ndarray]) -> np.ndarray:
    """(m,) uint64: `pixel_hash` of each image."""
    digests = b"".join(
        hashlib.blake2b(p.tobytes(), digest_size=8, person=bytes(p.shape[:3])).digest()
        for p in pixels
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def thumbnail_side(cfg: CleanConfig) -> int:
    """The side of the near-duplicate thumbnails for this config."""
    return image_numbers.thumbnail_side(cfg.image_size, cfg.near_duplicate_size)


def thumbnail_width(cfg: CleanConfig) -> int:
    """Bytes a row's thumbnail takes (grey, plus the colour planes of RGB images)."""
    return image_numbers.row_width(thumbnail_side(cfg), cfg.channels)


def row_numbers(
    pixels: list[np.ndarray], side: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pixel hashes, dHashes, thumbnails of `image_numbers.row_width` bytes, crop keys) of
    kept rows, vectorised when they share a shape."""
    shape = pixels[0].shape
    if all(p.shape == shape for p in pixels):
        stack = np.stack(pixels)
        gray = image_numbers.grays(stack)
        return (
            pixel_hashes(pixels),
            image_numbers.dhashes(gray),
            image_numbers.thumbnails(stack, side),
            image_numbers.crop_dhashes(gray),
        )
    return (
        np.array([pixel_hash(p) for p in pixels], dtype=np.uint64),
        np.array([image_numbers.dhash(p) for p in pixels], dtype=np.uint64),
        np.stack([image_numbers.thumbnail(p, side) for p in pixels]),
        np.array([image_numbers.crop_dhash(p) for p in pixels], dtype=np.uint64),
    )
