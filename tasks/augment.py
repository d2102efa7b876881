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
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torchvision
from torchvision.transforms import v2

from synthloop.config import AugmentConfig, AugmentPolicy
from synthloop.dataset import (
    IMAGE_SCHEMA,
    ShardWriter,
    atomic_dir,
    content_id,
    read_columns,
    remove_stale_temporaries,
    write_json,
)
from tasks.images import encode_rows, load_image_tensors, resolve_device

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
    remove_stale_temporaries(cfg.output)
    _require_rows(cfg.input)
    data = load_image_tensors(cfg.input)
    _, channels, height, width = data.images.shape
    labels = [data.classes[i] for i in data.labels.tolist()]
    counts = Counter(labels)
    quotas = class_quotas(dict(counts), cfg.target_per_class, cfg.min_copies, cfg.max_copies)
    plan = plan_copies(data.ids, labels, quotas, cfg.seed)

    device = resolve_device(cfg.device)
    pipeline = build_pipeline(cfg.policy, channels)
    transforms = [type(t).__name__ for t in pipeline.transforms]
    seen = set(data.ids)
    made: Counter[str] = Counter()
    duplicates = 0
    started = time.perf_counter()
    with (
        atomic_dir(cfg.output) as tmp,
        ShardWriter(tmp, AUGMENTED_SCHEMA, cfg.shard_rows) as out,
        _isolated_rng(device),
    ):
        for start in range(0, len(plan), cfg.batch_size):
            chunk = plan[start : start + cfg.batch_size]
            parents = [parent for parent, _ in chunk]
            seeds = [row_seed(cfg.seed, data.ids[p], copy) for p, copy in chunk]
            batch = data.images[parents].to(device, non_blocking=True)
            pngs = encode_rows(augment_batch(batch, seeds, pipeline))
            for (parent, copy), seed, png in zip(chunk, seeds, pngs, strict=True):
                row_id = content_id(png)
                if row_id in seen:  # a transform that happened to be the identity
                    duplicates += 1
                    continue
                seen.add(row_id)
                made[labels[parent]] += 1
                out.append(
                    {
                        "id": row_id,
                        "label": labels[parent],
                        "split": "train",
                        "source": "augmented",
                        "parent_id": data.ids[parent],
                        "image": png,
                        "height": height,
                        "width": width,
                        "channels": channels,
                        "path": None,
                        "recipe": recipe(cfg.policy, transforms, seed, copy),
                    }
                )
    seconds = time.perf_counter() - started

    goal = cfg.target_per_class if cfg.target_per_class is not None else max(counts.values())
    report = {
        "real": len(data),
        "augmented": sum(made.values()),
        "total": len(data) + sum(made.values()),
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
        "image": {"height": int(height), "width": int(width), "channels": int(channels)},
        "device": device.type,
    }
    write_json(cfg.report, report)
    log.info(
        "augment: %d real -> %d augmented rows (%d duplicates dropped) on %s in %.1fs "
        "(%.0f rows/s) -> %s",
        report["real"],
        report["augmented"],
        duplicates,
        device.type,
        seconds,
        len(plan) / seconds if seconds > 0 else 0.0,
        cfg.output,
    )
    return report


def _require_rows(directory: Path) -> None:
    if read_columns(directory, ["id"]).num_rows == 0:
        raise ValueError(
            f"augment: {directory}: the clean train split has no rows; "
            "run the clean stage first (and check reports/clean.json)"
        )
