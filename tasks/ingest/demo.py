"""The embedded default dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8
grey images, 10 classes), made long-tailed, plus a seeded set of defects so that every
cleaning rule fires.

The long tail is the situation this project serves: the digits in `short_classes` (default
3, 5 and 8, the ones most often confused with others) keep only `short_keep` images each
(default 51), chosen by a permutation seeded with `seed`; the other seven keep all of
theirs (about 180). With params.yaml's split (training first, `train_min_share: 0.6`; test
0.2, `test_min_per_class: 36`) a short class has 31 train, 5 val and 15 test images, a rich
one 126 train, 18 val and 36 test: the short classes' test split (45 images, 2.2 points
each) still resolves a gain, and a short class is learned from 31 real images.

The defects, one of each (the `path` of each says which):
- `exact_duplicate`:    a digit re-encoded with other PNG settings (other bytes, same pixels)
- `conflicting_labels`: a pixel copy of a digit under another label (both copies go)
- `near_duplicate`:     a digit with one pixel nudged
- `zero_byte`:          an empty file
- `not_an_image`:       a text file
- `truncated`:          a PNG cut in half
- `too_many_pixels`:    a small PNG that decodes to 6000 x 6000 (a decompression bomb)
- `label_not_allowed`:  a mirrored digit labelled "x" (outside clean.labels)
- `blank`:              a constant image
and two rows that clean keeps after fixing them: a digit labelled "seven" (renamed by
clean.label_map) and a 16 x 16 RGB digit (converted to the configured size and channels).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image

from synthloop.config import DemoSource
from tasks.ingest.sources import Item, Record


def _png(array: np.ndarray, **save_args: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save_args)
    return buf.getvalue()


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The real digits as uint8 (n, 8, 8) on 0..255, and their integer labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def long_tail(targets: np.ndarray, short_classes: list[str], keep: int, seed: int) -> np.ndarray:
    """Indices of the digits kept: every image of a rich class, `keep` of a short one."""
    rng = np.random.default_rng(seed)
    kept = []
    for digit in range(10):
        rows = np.flatnonzero(targets == digit)
        if str(digit) in short_classes:
            rows = np.sort(rng.permutation(rows)[:keep])
        kept.append(rows)
    return np.sort(np.concatenate(kept))


def read_demo(source: DemoSource) -> Iterator[Record]:
    images, targets = digit_images()
    kept = long_tail(targets, source.short_classes, source.short_keep, source.seed)
    for index in kept:
        yield Item(f"demo://digits/{index}", str(int(targets[index])), _png(images[index]))
    if source.defects:
        yield from _defects(images, targets, kept, np.random.default_rng(source.seed))


def _defects(
    images: np.ndarray, targets: np.ndarray, kept: np.ndarray, rng: np.random.Generator
) -> Iterator[Item]:
    picks = rng.choice(kept, size=5, replace=False)  # copies of kept digits only

    def label(i: int) -> str:
        return str(int(targets[i]))

    a, b, c, d, e = (int(i) for i in picks)
    yield Item(f"demo://defect/exact_duplicate/{a}", label(a), _png(images[a], compress_level=0))
    yield Item(f"demo://defect/conflicting_labels/{b}", str((targets[b] + 1) % 10), _png(images[b]))

    nudged = images[c].copy()
    y, x = np.unravel_index(np.argmax(nudged), nudged.shape)
    nudged[y, x] = max(0, int(nudged[y, x]) - 3)
    yield Item(f"demo://defect/near_duplicate/{c}", label(c), _png(nudged))

    yield Item("demo://defect/zero_byte", label(d), b"")
    yield Item("demo://defect/not_an_image", label(d), b"label,comment\n3,this is not an image\n")

    noise = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    whole = _png(noise)
    yield Item("demo://defect/truncated", label(d), whole[: len(whole) // 2])

    bomb = io.BytesIO()
    Image.new("1", (6000, 6000)).save(bomb, format="PNG")
    yield Item("demo://defect/too_many_pixels", label(d), bomb.getvalue())

    yield Item(f"demo://defect/label_not_allowed/{d}", "x", _png(images[d][:, ::-1].copy()))
    yield Item("demo://defect/blank", label(d), _png(np.full((8, 8), 7, dtype=np.uint8)))

    # Kept after fixing: a label the label map renames, and an odd size and mode.
    sevens = kept[targets[kept] == 7]  # fewer than 50 when 7 is a short class
    seven = int(sevens[int(rng.integers(0, min(50, len(sevens))))])
    shifted = np.roll(images[seven], 1, axis=1)
    yield Item(f"demo://fixable/label_seven/{seven}", "seven", _png(shifted))
    big = np.kron(images[e][:, ::-1], np.ones((2, 2), dtype=np.uint8))
    rgb = np.stack([big, big, big // 2], axis=-1)
    yield Item(f"demo://fixable/rgb_16x16/{e}", label(e), _png(rgb))
