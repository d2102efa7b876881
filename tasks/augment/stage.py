"""Augment: classic torchvision augmentation of the clean train split, per-class quotas.

Quotas: every class aims at `target` = augment.target_per_class, or the largest class's
count; a class with n real rows gets

    copies = clamp(target - n, n * min_copies, n * max_copies)

augmented rows, spread round-robin over its images (in a seeded hash order), so minority
classes get more copies per image and no image gets more than max_copies.

Transforms: a torchvision `transforms.v2` pipeline built from `augment.policy`; a zero
probability or magnitude leaves its transform out, and ColorJitter applies to RGB only.
v2 draws one set of random parameters per call, so the pipeline is called per image: a
batched call would give every image in a batch the same flip, angle and shift.

Reproducible: each row's randomness comes from its own seed, a hash of (augment.seed,
parent id, copy number), set on torch's CPU generator just before its pipeline call (v2
samples its parameters there, and the Gaussian noise is drawn there too). So a row does not
depend on batch size, order or device, and `torch.manual_seed(recipe["seed"])` followed by
the pipeline reproduces it. Across devices only float rounding in the affine warp may differ.

Memory: the train split is decoded once into one uint8 tensor; the augmented rows are
encoded and written batch by batch. Imports only PyTorch, torchvision and data libraries.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision
from torchvision.transforms import v2

from synthloop.config import AugmentConfig, AugmentPolicy
from synthloop.dataset import (
    IMAGE_SCHEMA,
    ShardWriter,
    atomic_dir,
    content_id,
    iter_batches,
    read_columns,
    remove_stale_temporaries,
    write_json,
)
from synthloop.sharding import (
    Shard,
    StageSpec,
    cached_result,
    chunks,
    digest,
    run_uncached,
)
from tasks.shared.images import decode_rows, encode_rows, resolve_device

log = logging.getLogger(__name__)

# The image columns plus how each row was made (JSON: policy, seed, copy, transforms).
AUGMENTED_SCHEMA = IMAGE_SCHEMA.append(pa.field("recipe", pa.string()))


class CpuGaussianNoise(v2.Transform):
    """Additive Gaussian noise on float images in [0, 1], clipped.

    Unlike v2.GaussianNoise (which uses the image's device generator) the noise is drawn
    from the CPU generator, so a row's pixels do not depend on the device it was made on.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        noise = torch.randn(inpt.shape, dtype=inpt.dtype).mul_(self.sigma)
        return (inpt + noise.to(inpt.device)).clamp_(0.0, 1.0)


# --- pure functions -----------------------------------------------------------------------


def build_pipeline(policy: AugmentPolicy, channels: int) -> v2.Compose:
    """uint8 (C, H, W) -> augmented uint8 (C, H, W); works in float in between."""
    steps: list[v2.Transform] = [v2.ToDtype(torch.float32, scale=True)]
    if policy.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(policy.hflip))
    if policy.vflip > 0:
        steps.append(v2.RandomVerticalFlip(policy.vflip))
    scale = (policy.scale_min, policy.scale_max)
    if policy.rotate_degrees > 0 or policy.translate > 0 or scale != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=policy.rotate_degrees,
                translate=(policy.translate, policy.translate) if policy.translate > 0 else None,
                scale=scale if scale != (1.0, 1.0) else None,
                interpolation=v2.InterpolationMode.BILINEAR,  # nearest is blocky on tiny images
                fill=0,
            )
        )
    if channels == 3 and policy.color_jitter > 0:
        j = policy.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if policy.noise_std > 0:
        steps.append(CpuGaussianNoise(policy.noise_std))
    steps.append(v2.ToDtype(torch.uint8, scale=True))
    return v2.Compose(steps)


def class_quotas(
    counts: dict[str, int], target: int | None, min_copies: int, max_copies: int
) -> dict[str, int]:
    """Augmented rows per class: clamp(target - n, n * min_copies, n * max_copies)."""
    if min_copies > max_copies:
        raise ValueError(
            f"augment.min_copies ({min_copies}) must not exceed augment.max_copies ({max_copies})"
        )
    goal = target if target is not None else max(counts.values(), default=0)
    return {
        label: min(max(goal - n, n * min_copies), n * max_copies)
        for label, n in sorted(counts.items())
    }


def _hash_key(*parts: object) -> int:
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def row_seed(seed: int, parent_id: str, copy: int) -> int:
    """A row's own seed (63 bits, what torch.manual_seed accepts)."""
    return _hash_key(seed, parent_id, copy) & (2**63 - 1)


def plan_copies(
    ids: list[str], labels: list[str], quotas: dict[str, int], seed: int
) -> list[tuple[int, int]]:
    """(parent row, copy number) for every augmented row, class by class.

    A class's images are ordered by a seeded hash of their id (not file order) and its
    quota dealt out round-robin: image i of n gets copies k with k % n == i.
    """
    rows_by_class: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        rows_by_class.setdefault(label, []).append(row)
    plan: list[tuple[int, int]] = []
    for label, quota in sorted(quotas.items()):
        rows = sorted(rows_by_class.get(label, []), key=lambda r: (_hash_key(seed, ids[r]), r))
        plan += [(rows[k % len(rows)], k // len(rows)) for k in range(quota)]
    return plan


def augment_batch(images: torch.Tensor, seeds: list[int], pipeline: v2.Compose) -> torch.Tensor:
    """Apply the pipeline to each image under its own seed; the caller forks the RNG."""
    out = torch.empty_like(images)
    for i, seed in enumerate(seeds):
        torch.default_generator.manual_seed(seed)
        out[i] = pipeline(images[i])
    return out


def recipe(policy: AugmentPolicy, transforms: list[str], seed: int, copy: int) -> str:
    return json.dumps(
        {
            "policy": policy.model_dump(),
            "transforms": transforms,
            "seed": seed,
            "copy": copy,
            "torchvision": torchvision.__version__,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Leave the caller's CPU RNG state and thread count as they were.

    On CPU the per-image calls run single-threaded: for small images intra-op threads cost
    far more in synchronisation than they save (measured 20x slower at 32x32 on 2 cores).
    """
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        if device.type == "cpu":
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


# --- the stage ------------------------------------------------------------------------------


def run_augment(cfg: AugmentConfig) -> dict:
    """Augment `cfg.input` into `cfg.output`; returns the report it writes to `cfg.report`."""
    return run_uncached(SHARDING, cfg)


# --- plan -> shard -> merge (synthloop/sharding.py) ------------------------------------------

# Shard result columns: each augmented row with its place in the plan (the output order).
_SHARD_SCHEMA = pa.schema(
    [
        ("pos", pa.int64()),
        ("parent", pa.int64()),
        ("copy", pa.int64()),
        ("seed", pa.int64()),
        ("id", pa.string()),
        ("image", pa.binary()),
    ]
)

# v2 transforms draw from torch's global CPU generator (and set_num_threads is global):
# shards computed in threads of one process take turns, so each row keeps its own seed.
_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class AugmentWork:
    """Parent rows `start` to `stop` of the input, and the copies to make of them:
    (plan position, parent row, copy number)."""

    start: int
    stop: int
    copies: tuple[tuple[int, int, int], ...]


def plan_augment(cfg: AugmentConfig) -> list[Shard]:
    """Shards of `cfg.shard_rows` parent rows; the plan (and so each row's seed and place in
    the output) is made once over all rows, so it does not depend on the sharding."""
    ids, labels = _ids_labels(cfg.input)
    quotas = class_quotas(
        dict(Counter(labels)), cfg.target_per_class, cfg.min_copies, cfg.max_copies
    )
    ranges = chunks(len(ids), cfg.shard_rows)
    copies: list[list[tuple[int, int, int]]] = [[] for _ in ranges]
    for pos, (parent, copy) in enumerate(plan_copies(ids, labels, quotas, cfg.seed)):
        copies[parent // cfg.shard_rows].append((pos, parent, copy))
    versions = (torch.__version__, torchvision.__version__)
    return [
        Shard(
            "augment",
            i,
            len(ranges),
            digest(ids[r.start : r.stop], versions),  # ids are content hashes of the bytes
            AugmentWork(r.start, r.stop, tuple(copies[i])),
        )
        for i, r in enumerate(ranges)
    ]


def run_augment_shard(cfg: AugmentConfig, shard: Shard, out: Path) -> dict:
    """Make one shard's augmented rows (PNG bytes with their plan positions) into
    `rows.parquet`; returns the image shape, device and timing."""
    work: AugmentWork = shard.work
    images, ids = _load_rows(cfg.input, work.start, work.stop)
    _, channels, height, width = images.shape
    device = resolve_device(cfg.device)
    pipeline = build_pipeline(cfg.policy, channels)
    started = time.perf_counter()
    with pq.ParquetWriter(out / "rows.parquet", _SHARD_SCHEMA) as writer:
        for lo in range(0, len(work.copies), cfg.batch_size):
            chunk = work.copies[lo : lo + cfg.batch_size]
            rows = [parent - work.start for _, parent, _ in chunk]
            seeds = [row_seed(cfg.seed, ids[parent - work.start], c) for _, parent, c in chunk]
            batch = images[rows].to(device, non_blocking=True)
            with _RNG_LOCK, _isolated_rng(device):
                augmented = augment_batch(batch, seeds, pipeline)
            pngs = encode_rows(augmented)
            columns = {
                "pos": [pos for pos, _, _ in chunk],
                "parent": [parent for _, parent, _ in chunk],
                "copy": [copy for _, _, copy in chunk],
                "seed": seeds,
                "id": [content_id(png) for png in pngs],
                "image": pngs,
            }
            writer.write_table(pa.table(columns, schema=_SHARD_SCHEMA))
    return {
        "rows": len(work.copies),
        "image": {"height": int(height), "width": int(width), "channels": int(channels)},
        "device": device.type,
        "seconds": time.perf_counter() - started,
    }


def merge_augment(cfg: AugmentConfig, folders: list[Path]) -> dict:
    """The shards' rows in plan order into `cfg.output`, dropping any row whose bytes are
    already there (a transform that happened to be the identity), and the report."""
    remove_stale_temporaries(cfg.output)
    ids, labels = _ids_labels(cfg.input)
    counts = Counter(labels)
    summaries = [cached_result(folder) or {} for folder in folders]
    image = summaries[0]["image"]
    height, width, channels = image["height"], image["width"], image["channels"]
    transforms = [type(t).__name__ for t in build_pipeline(cfg.policy, channels).transforms]
    seen = set(ids)
    made: Counter[str] = Counter()
    duplicates = 0
    with atomic_dir(cfg.output) as tmp, ShardWriter(tmp, AUGMENTED_SCHEMA, cfg.shard_rows) as out:
        streams = [_shard_rows(folder / "rows.parquet") for folder in folders]
        for row in heapq.merge(*streams, key=lambda r: r["pos"]):
            if row["id"] in seen:
                duplicates += 1
                continue
            seen.add(row["id"])
            label = labels[row["parent"]]
            made[label] += 1
            out.append(
                {
                    "id": row["id"],
                    "label": label,
                    "split": "train",
                    "source": "augmented",
                    "parent_id": ids[row["parent"]],
                    "image": row["image"],
                    "height": height,
                    "width": width,
                    "channels": channels,
                    "path": None,
                    "recipe": recipe(cfg.policy, transforms, row["seed"], row["copy"]),
                }
            )

    goal = cfg.target_per_class if cfg.target_per_class is not None else max(counts.values())
    devices = sorted({s["device"] for s in summaries})
    report = {
        "real": len(ids),
        "augmented": sum(made.values()),
        "total": len(ids) + sum(made.values()),
        "target_per_class": goal,
        "per_class": {
            label: {
                "real": counts[label],
                "augmented": made[label],
                "target": goal,
                "total": counts[label] + made[label],
            }
            for label in sorted(counts)
        },
        "duplicates_dropped": duplicates,
        "policy": cfg.policy.model_dump(),
        "transforms": transforms,
        "image": image,
        "device": ",".join(devices),
    }
    write_json(cfg.report, report)
    planned = sum(s["rows"] for s in summaries)
    seconds = sum(s["seconds"] for s in summaries)
    log.info(
        "augment: %d real -> %d augmented rows (%d duplicates dropped) on %s in %.1fs "
        "(%.0f rows/s) -> %s",
        report["real"],
        report["augmented"],
        duplicates,
        report["device"],
        seconds,
        planned / seconds if seconds > 0 else 0.0,
        cfg.output,
    )
    return report


def _ids_labels(directory: Path) -> tuple[list[str], list[str]]:
    _require_rows(directory)
    table = read_columns(directory, ["id", "label"])
    return table["id"].to_pylist(), table["label"].to_pylist()


def _load_rows(directory: Path, start: int, stop: int) -> tuple[torch.Tensor, list[str]]:
    """Decode rows `start` to `stop` of a dataset (in its stable order) only."""
    chunks_: list[torch.Tensor] = []
    ids: list[str] = []
    offset = 0
    for batch in iter_batches(directory, columns=["id", "image", "channels"]):
        lo, hi = max(start - offset, 0), min(stop - offset, batch.num_rows)
        offset += batch.num_rows
        if lo >= hi:
            if offset >= stop:
                break
            continue
        rows = batch.slice(lo, hi - lo).to_pydict()
        chunks_.append(decode_rows(rows["image"], int(rows["channels"][0])))
        ids += rows["id"]
    return torch.cat(chunks_), ids


def _shard_rows(path: Path) -> Iterator[dict]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _require_rows(directory: Path) -> None:
    if read_columns(directory, ["id"]).num_rows == 0:
        raise ValueError(
            f"augment: {directory}: the clean train split has no rows; "
            "run the clean stage first (and check reports/clean.json)"
        )


SHARDING = StageSpec(
    stage="augment",
    config=lambda params: params.augment,
    plan=plan_augment,
    run_shard=run_augment_shard,
    merge=merge_augment,
)
