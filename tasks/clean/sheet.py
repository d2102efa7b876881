"""The near-duplicate sheet (reports/near_duplicates.png, written by tasks/clean/report.py):
each removed image beside the kept image it matched.

Contract: `sheet` draws (removed, kept) pixel pairs, removed on the left, `per_row` pairs a
row, each image scaled (nearest) into a SHEET_CELL square; its size is `sheet_size`. No
pairs: one empty row (a file that exists says the rule ran).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

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
