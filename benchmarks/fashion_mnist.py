"""Fashion-MNIST's original IDX files, and the long-tailed draw of the DeepSMOTE protocol.

Debian's `dataset-fashion-mnist` puts them under /usr/share/datasets/fashion-mnist/ (gzip or
plain). Benchmarks only: the pipeline itself never reads them, and tests write small IDX
files of their own.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
# Per-class training sizes for classes 0-9 (100:1): DeepSMOTE (IEEE TNNLS 2022), Table III.
LONG_TAIL = (4000, 2000, 1000, 750, 500, 350, 200, 100, 60, 40)
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{root / name}[.gz] not found: install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass the folder that holds the IDX files"
    )


def load(split: str = "train", root: Path = ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) of the train or test split."""
    prefix = _PREFIX[split]
    images = read_idx(find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def long_tailed(
    labels: np.ndarray, sizes: tuple[int, ...] = LONG_TAIL, seed: int = 0
) -> np.ndarray:
    """Indices of a seeded long-tailed draw: sizes[c] rows of class c, without replacement,
    in class order."""
    rng = np.random.default_rng(seed)
    picks = []
    for c, size in enumerate(sizes):
        rows = np.flatnonzero(labels == c)
        if size > len(rows):
            raise ValueError(f"class {c} has {len(rows)} images, {size} asked for")
        picks.append(np.sort(rng.choice(rows, size=size, replace=False)))
    return np.concatenate(picks)
