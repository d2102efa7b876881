"""Validate's sharded pass: the evaluator features of the real train, val and test splits
and of the synthetic images, in shards of whole batches (synthloop/sharding.py).

A shard is rows `start` to `stop` of one feature set, saved as `features.npy` in the shard
cache; the flow can compute shards beforehand as parallel tasks. A shard's key holds the
evaluator's bytes, the identity of its dataset's files, the device and torch's version, so
features made by other weights, data or kernels are never reused. `load_features` puts the
shards back together for the stage's merge (tasks/validate/stage.py), which judges from them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from synthloop.config import ValidateConfig
from synthloop.dataset import file_hash, shard_paths
from synthloop.sharding import Shard, cached_result, chunks, digest
from tasks.shared.evaluator import CONFIG, WEIGHTS, load_evaluator, small_image_cpu_threads
from tasks.shared.images import decode_rows, resolve_device

SPLITS = ("train", "val", "test", "synthetic")  # the feature sets, in shard order
FEATURES = "features.npy"  # a shard's (rows, feature_dim) float32 features


@dataclass(frozen=True)
class FeatureWork:
    """Rows `start` to `stop` of the dataset `directory` (the feature set `split`), on
    `device`: resolved when planned, so a worker computes what the key says."""

    split: str
    directory: Path
    start: int
    stop: int
    device: str


def shard_size(shard_rows: int, batch_size: int) -> int:
    """`shard_rows` rounded up to whole batches: a shard's batches are then exactly the
    unsharded run's batches, so its features are the same bits on CPU."""
    return -(-shard_rows // batch_size) * batch_size


def split_dirs(cfg: ValidateConfig) -> dict[str, Path]:
    return {
        "train": cfg.clean / "train",
        "val": cfg.clean / "val",
        "test": cfg.clean / "test",
        "synthetic": cfg.synthetic,
    }


def files_identity(paths: list[Path]) -> list[tuple[str, int, int]]:
    """Name, size and mtime of each file (as DVC's own change check)."""
    return [(p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]


def plan_features(cfg: ValidateConfig) -> list[Shard]:
    """Shards of whole batches of each feature set. A shard's fingerprint holds the
    evaluator's bytes, the identity of its dataset's files, the device and torch's
    version: features computed for other weights, data or kernels are never reused."""
    size = shard_size(cfg.shard_rows, cfg.batch_size)
    evaluator = (file_hash(cfg.evaluator / WEIGHTS), file_hash(cfg.evaluator / CONFIG))
    device = str(resolve_device(cfg.device))
    work: list[tuple[FeatureWork, str]] = []
    for split, directory in split_dirs(cfg).items():
        files = shard_paths(directory)
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        if rows == 0 and split != "val":  # val only adds to the privacy hold-out
            raise ValueError(f"{directory}: the dataset is empty")
        identity = digest(evaluator, torch.__version__, files_identity(files))
        work += [
            (FeatureWork(split, directory, r.start, r.stop, device), identity)
            for r in chunks(rows, size)
        ]
    return [
        Shard("validate", i, len(work), digest(w, identity), w)
        for i, (w, identity) in enumerate(work)
    ]


def decode_range(directory: Path, start: int, stop: int) -> torch.Tensor:
    """Rows `start` to `stop` of a dataset (in its stable order), decoded; files wholly
    outside the range are not read."""
    parts: list[torch.Tensor] = []
    offset = 0
    for path in shard_paths(directory):
        file = pq.ParquetFile(path)
        lo, hi = max(start - offset, 0), min(stop - offset, file.metadata.num_rows)
        offset += file.metadata.num_rows
        if lo < hi:
            rows = file.read(columns=["image", "channels"]).slice(lo, hi - lo).to_pydict()
            parts.append(decode_rows(rows["image"], int(rows["channels"][0])))
    return torch.cat(parts)


def features_shard(cfg: ValidateConfig, shard: Shard, out: Path) -> dict:
    """One shard's evaluator features into `features.npy`; returns its split and size."""
    work: FeatureWork = shard.work
    device = torch.device(work.device)
    evaluator = load_evaluator(cfg.evaluator, device=device, batch_size=cfg.batch_size)
    images = decode_range(work.directory, work.start, work.stop)
    started = time.perf_counter()
    with _shared_cpu_threads(device, evaluator.size):
        features = evaluator.features(images).cpu().numpy()
    np.save(out / FEATURES, features)
    return {
        "split": work.split,
        "rows": len(features),
        "device": device.type,
        "seconds": time.perf_counter() - started,
    }


def load_features(folders: list[Path]) -> dict[str, torch.Tensor]:
    """Each feature set from its shards, in shard order: memory-mapped, so only the one
    concatenation per set is ever held in memory."""
    arrays: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for folder in folders:
        split = (cached_result(folder) or {})["split"]
        arrays[split].append(np.load(folder / FEATURES, mmap_mode="r"))
    dim = next(part.shape[1] for parts in arrays.values() for part in parts)
    return {
        split: torch.from_numpy(
            np.concatenate(parts) if parts else np.empty((0, dim), dtype=np.float32)
        )
        for split, parts in arrays.items()
    }


class _Shared:
    """A context entered by the first of overlapping users and left after the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._scope = contextlib.ExitStack()

    @contextlib.contextmanager
    def hold(self, make: Callable[[], AbstractContextManager]) -> Iterator[None]:
        with self._lock:
            self._users += 1
            if self._users == 1:
                self._scope.enter_context(make())
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._scope.close()


# One intra-op thread on CPU while any shard runs (`small_image_cpu_threads`), shared:
# shards in threads of one process (the threads runner) overlap, and the first to finish
# must not restore the thread count under the others.
_SHARD_THREADS = _Shared()


def _shared_cpu_threads(device: torch.device, size: int) -> AbstractContextManager:
    return _SHARD_THREADS.hold(lambda: small_image_cpu_threads(device, size))
