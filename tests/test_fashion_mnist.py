"""The Fashion-MNIST loader and the long-tailed draw of the benchmarks, on small IDX files
written here (the real files are a Debian package the tests never need)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks/fashion_mnist.py"


def module():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("fashion_mnist_benchmark", BENCHMARK)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def test_the_long_tailed_draw_has_the_documented_sizes_from_idx_files(tmp_path):
    fm = module()
    assert fm.LONG_TAIL == (4000, 2000, 1000, 750, 500, 350, 200, 100, 60, 40)  # 100:1
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)
    got_images, got_labels = fm.load("train", tmp_path)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)

    sizes = (12, 10, 8, 6, 5, 4, 3, 2, 2, 1)  # the same shape, scaled to the files
    picked = fm.long_tailed(got_labels, sizes, seed=3)
    assert np.bincount(got_labels[picked], minlength=10).tolist() == list(sizes)
    assert len(set(picked.tolist())) == len(picked)  # without replacement
    assert np.array_equal(picked, fm.long_tailed(got_labels, sizes, seed=3))  # seeded
    with pytest.raises(ValueError, match="class 0 has 12 images, 13 asked for"):
        fm.long_tailed(got_labels, (13, *sizes[1:]))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.load("test", tmp_path)
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        fm.read_idx(tmp_path / "bad-images-idx3-ubyte")


def judged(low: float, high: float, verdict: str) -> dict:
    return {"delta": {"mean": (low + high) / 2, "low": low, "high": high}, "verdict": verdict}


def test_the_outside_judge_flags_a_harmful_promotion_and_a_refused_gain():
    spec = importlib.util.spec_from_file_location(
        "fashion_lt_benchmark", BENCHMARK.with_name("fashion_lt.py")
    )
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    promoted, refused = {"result": "promoted"}, {"result": "gates failed"}
    assert lt.agreement(promoted, judged(-0.05, -0.01, "hurt")).startswith("DISAGREE")
    assert lt.agreement(promoted, judged(-0.01, 0.03, "no evidence")).startswith("agree")
    assert lt.agreement(refused, judged(0.01, 0.05, "helped")).startswith("refused a gain")
    assert lt.agreement(refused, judged(-0.02, 0.02, "no evidence")).startswith("agree")
    assert lt.agreement(refused, judged(-0.05, -0.01, "hurt")).startswith("agree")
