"""The augment stage on real Parquet files: quotas, provenance, reproducibility, shapes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from synthloop.config import AugmentConfig, AugmentPolicy
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter, read_columns
from tasks.augment.stage import class_quotas, plan_copies, run_augment
from tasks.shared.images import decode_rows, encode_rows


def make_dataset(
    directory: Path, per_class: dict[str, int], size: int = 8, channels: int = 1, seed: int = 0
) -> list[str]:
    """Distinct random images, `per_class[label]` of each label; returns their ids."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(per_class.values())
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    labels = [label for label, count in per_class.items() for _ in range(count)]
    ids = []
    with ShardWriter(directory, IMAGE_SCHEMA, shard_rows=7) as out:
        for label, png in zip(labels, encode_rows(images), strict=True):
            ids.append(hashlib.blake2b(png, digest_size=16).hexdigest())
            out.append(
                {
                    "id": ids[-1],
                    "label": label,
                    "split": "train",
                    "source": "demo0",
                    "image": png,
                    "height": size,
                    "width": size,
                    "channels": channels,
                }
            )
    return ids


def config(tmp_path: Path, name: str = "aug", **kw) -> AugmentConfig:
    return AugmentConfig(
        input=tmp_path / "train",
        output=tmp_path / name,
        report=tmp_path / f"{name}.json",
        device="cpu",
        batch_size=8,
        shard_rows=16,
        **kw,
    )


def output(cfg: AugmentConfig) -> pd.DataFrame:
    return pd.read_parquet(cfg.output)


def test_class_quotas_clamp():
    counts = {"big": 10, "small": 2, "tiny": 1}
    assert class_quotas(counts, None, 0, 4) == {"big": 0, "small": 8, "tiny": 4}
    assert class_quotas(counts, None, 1, 4) == {"big": 10, "small": 8, "tiny": 4}
    assert class_quotas(counts, 12, 0, 100) == {"big": 2, "small": 10, "tiny": 11}
    with pytest.raises(ValueError, match="min_copies"):
        class_quotas(counts, None, 5, 4)


def test_plan_deals_copies_round_robin():
    ids = [f"id{i}" for i in range(5)]
    labels = ["a", "a", "a", "b", "b"]
    plan = plan_copies(ids, labels, {"a": 4, "b": 5}, seed=0)
    per_parent = pd.Series([p for p, _ in plan]).value_counts()
    assert sorted(per_parent[[0, 1, 2]]) == [1, 1, 2]
    assert sorted(per_parent[[3, 4]]) == [2, 3]
    assert len(set(plan)) == len(plan)  # (parent, copy) pairs are unique: unique seeds


def test_quotas_minority_gets_more_copies_per_image(tmp_path):
    ids = make_dataset(tmp_path / "train", {"major": 8, "minor": 2})
    cfg = config(tmp_path, min_copies=1, max_copies=3)
    report = run_augment(cfg)

    rows = output(cfg)
    per_parent = rows.groupby("parent_id").size()
    major = per_parent[per_parent.index.isin(ids[:8])]
    minor = per_parent[per_parent.index.isin(ids[8:])]
    assert (major == 1).all() and len(major) == 8  # min_copies: every image at least once
    assert (minor == 3).all() and len(minor) == 2  # max_copies caps the minority class
    assert report["per_class"]["major"] == {"real": 8, "augmented": 8, "target": 8, "total": 16}
    assert report["per_class"]["minor"] == {"real": 2, "augmented": 6, "target": 8, "total": 8}
    assert report["augmented"] == len(rows) == 14 and report["total"] == 24


def test_totals_reach_the_target_where_caps_allow(tmp_path):
    make_dataset(tmp_path / "train", {"a": 5, "b": 3, "c": 1})
    cfg = config(tmp_path, target_per_class=10, min_copies=0, max_copies=4)
    report = run_augment(cfg)
    totals = {label: c["total"] for label, c in report["per_class"].items()}
    assert totals == {"a": 10, "b": 10, "c": 5}  # c: one image, at most 4 copies
    assert output(cfg).groupby("label").size().to_dict() == {"a": 5, "b": 7, "c": 4}


def test_provenance_and_recipe(tmp_path):
    ids = make_dataset(tmp_path / "train", {"a": 4, "b": 2})
    cfg = config(tmp_path, min_copies=1, seed=3)
    run_augment(cfg)
    rows = output(cfg)
    assert list(rows.columns) == [*IMAGE_SCHEMA.names, "recipe"]
    assert set(rows.parent_id) <= set(ids)
    assert rows.id.is_unique and not set(rows.id) & set(ids)
    assert (rows.source == "augmented").all() and (rows.split == "train").all()
    assert rows.path.isna().all()
    for row in rows.itertuples():
        assert row.id == hashlib.blake2b(row.image, digest_size=16).hexdigest()
        recipe = json.loads(row.recipe)
        assert recipe["policy"] == cfg.policy.model_dump()
        assert isinstance(recipe["seed"], int) and recipe["copy"] >= 0
        assert "RandomAffine" in recipe["transforms"]


def test_reproducible_bytes_and_independent_of_batch_size(tmp_path):
    make_dataset(tmp_path / "train", {"a": 6, "b": 2}, channels=3)
    policy = AugmentPolicy(hflip=0.5, color_jitter=0.2)
    first = config(tmp_path, "one", min_copies=1, policy=policy)
    second = config(tmp_path, "two", min_copies=1, policy=policy)
    third = config(tmp_path, "three", min_copies=1, policy=policy).model_copy(
        update={"batch_size": 3}
    )
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for cfg in (first, second, third):
        run_augment(cfg)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone

    def shards(cfg: AugmentConfig) -> list[bytes]:
        return [p.read_bytes() for p in sorted(cfg.output.glob("part-*.parquet"))]

    assert shards(first) == shards(second)
    assert output(first).equals(output(third))
    other = config(tmp_path, "other", min_copies=1, policy=policy, seed=1)
    run_augment(other)
    assert set(output(other).id) != set(output(first).id)


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_channels_preserved(tmp_path, channels):
    make_dataset(tmp_path / "train", {"a": 3, "b": 2}, size=12, channels=channels)
    cfg = config(tmp_path, min_copies=1, policy=AugmentPolicy(color_jitter=0.3, vflip=0.5))
    report = run_augment(cfg)
    rows = output(cfg)
    assert report["image"] == {"height": 12, "width": 12, "channels": channels}
    assert (rows.height == 12).all() and (rows.width == 12).all()
    assert (rows.channels == channels).all()
    pixels = decode_rows(list(rows.image), channels)
    assert pixels.shape == (len(rows), channels, 12, 12)
    jitter = "ColorJitter" in report["transforms"]
    assert jitter == (channels == 3)  # colour jitter is RGB only


def test_identity_policy_drops_duplicates(tmp_path):
    make_dataset(tmp_path / "train", {"a": 3, "b": 2})
    off = AugmentPolicy(rotate_degrees=0, translate=0, scale_min=1, scale_max=1, noise_std=0)
    cfg = config(tmp_path, min_copies=1, policy=off)
    report = run_augment(cfg)
    assert report["augmented"] == 0 and report["duplicates_dropped"] == 5
    assert read_columns(cfg.output, ["id"]).num_rows == 0


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "train")):
        run_augment(config(tmp_path))
    assert not (tmp_path / "aug").exists()
