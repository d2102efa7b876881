"""A full class is refreshed, not frozen: new accepted rows replace its oldest pooled rows only
when the refreshed arm scores at least as well as the pool it replaces (same seeds), and the
replaced rows are retired, never deleted."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch

from synthloop.config import LoopConfig
from tasks.shared.images import ImageTensors, load_image_tensors
from tasks.shared.pool import (
    RETIRED,
    describe_pool,
    plan_refresh,
    pool_counts,
    pool_ids,
    pool_rows,
    pool_targets,
    promote,
)
from tasks.validate.promotion import delivered, plan_promotion, refreshed_rows, subset
from tasks.validate.utility_protocol import Recipe, compare_arms
from tests.test_delivered_rows import rows_of
from tests.test_fuse import write
from tests.test_utility import images

CLASSES = ["big", "short"]


def test_only_a_full_class_is_refreshed_oldest_rows_first_within_its_share():
    pooled = [("o1", "s"), ("o2", "s"), ("o3", "s"), ("o4", "s"), ("r1", "r")]
    targets = {"s": 4, "r": 5, "b": 0}
    ids = ["o2", "n1", "x1", "n2", "n3", "m1"]
    labels = ["s", "s", "s", "s", "s", "r"]
    # s is full (4 of 4): ceil(0.5 * 4) = 2 of its oldest rows go; o2 is already pooled and
    # x1 is taken by the promotion; r has room (1 of 5), so it gains rows, never swaps them.
    pairs = plan_refresh(pooled, targets, ids, labels, {"o1", "o2", "o3", "o4", "r1"}, [2], 0.5)
    assert pairs == [(1, "o1"), (3, "o2")]
    assert plan_refresh(pooled, targets, ids, labels, set(), [], 0.0) == []  # frozen
    # a share that rounds up: ceil(0.1 * 4) = 1
    assert plan_refresh(pooled, targets, ids, labels, {"o2"}, [], 0.1) == [(1, "o1")]


def test_replacement_retires_rows_restorably_and_keeps_the_pool_within_its_bound(tmp_path):
    pool = tmp_path / "pool"
    old_ids = write(tmp_path / "night1", [("short", None)] * 3, "gen")
    promote(tmp_path / "night1", pool, "20261129T020000Z-00000001", 1)
    more = write(tmp_path / "night2", [("short", None)] * 1 + [("big", None)], "gen")
    promote(tmp_path / "night2", pool, "20261130T020000Z-00000002", 1)
    assert [r for r, _ in pool_rows(pool)] == [*old_ids, *more]  # oldest first
    targets = pool_targets({"big": 40, "short": 4}, "auto", 1.0)
    assert targets["short"] == 4 and pool_counts(pool)["short"] == 4  # full

    new_ids = write(tmp_path / "accepted", [("short", None)] * 3, "gen")
    known = pool_ids(pool)
    pairs = plan_refresh(
        pool_rows(pool), targets, new_ids, ["short"] * 3, known, [], 0.5
    )  # ceil(0.5 * 4) = 2
    assert [old for _, old in pairs] == old_ids[:2]
    replace = [(new_ids[i], old) for i, old in pairs]
    key = "20261201T020000Z-00000003"
    result = promote(tmp_path / "accepted", pool, key, 1, room={"short": 0}, replace=replace)

    assert result["promoted"] == 2 and result["replaced"] == 2
    assert result["replacements"] == {"short": [list(p) for p in replace]}
    assert pool_counts(pool) == {"big": 1, "short": 4}  # the class stays at its target
    retired = pool / RETIRED / result["retired_shard"]
    assert sorted(r["id"] for r in rows_of(retired)) == sorted(old_ids[:2])
    # the rewritten shard holds the rest of its rows; nothing was deleted
    night1 = [e for e in describe_pool(pool) if e["shard"].startswith("part-20261129")]
    assert [e["rows"] for e in night1] == [1] and result["rewritten"] == [night1[0]["shard"]]
    assert set(old_ids) | set(more) | set(new_ids[:2]) <= pool_ids(pool)  # never promoted again
    live = {r["id"] for p in sorted(pool.glob("part-*.parquet")) for r in rows_of(p)}
    assert live == {old_ids[2], *more, *new_ids[:2]}

    # A second refresh empties the oldest shard: its file goes, its rows are retired.
    newer = write(tmp_path / "accepted2", [("short", None)] * 2, "gen")
    pairs = plan_refresh(pool_rows(pool), targets, newer, ["short"] * 2, pool_ids(pool), [], 0.5)
    assert pairs[0][1] == old_ids[2]
    result = promote(
        tmp_path / "accepted2",
        pool,
        "20261202T020000Z-00000004",
        1,
        room={"short": 0},
        replace=[(newer[i], old) for i, old in pairs],
    )
    assert result["emptied"] == [night1[0]["shard"]] and pool_counts(pool)["short"] == 4
    assert len(list((pool / RETIRED).glob("part-*.parquet"))) == 2


def test_a_refresh_is_kept_only_when_it_scores_at_least_as_well_as_the_pool():
    classes = ["a", "b", "c"]
    train = images([0] * 20 + [1] * 20 + [2] * 4, 0, classes)  # c is short
    pool = images([2] * 4, 100, classes)
    fresh = images([2] * 4, 200, classes)
    val_labels = torch.tensor([0, 1, 2])
    test_labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 40)

    def case(fresh_right: int) -> dict:
        def trainer(data: ImageTensors, seed: int, recipe: Recipe):  # noqa: ANN202
            pred = test_labels.clone()
            has_fresh = bool(set(fresh.ids) & set(data.ids))
            right = fresh_right if has_fresh else 30 if len(data) > len(train) else 20
            pred[20 + right :] = 0  # of c's 40 test images, `right` are right
            return val_labels.clone(), pred

        return compare_arms(
            train, pool, val_labels, test_labels, trainer, [0, 1, 2], 0.5, refreshed=fresh
        )

    better = case(34)
    assert better["refresh"]["kept"] and better["refresh"]["delta_vs_pool"]["mean"] == 0.1
    assert better["delta"]["mean"] == 0.35  # the verdict reports the refreshed arm
    assert better["delivered_per_class"] == {"a": 0, "b": 0, "c": 4}
    tie = case(30)
    assert tie["refresh"]["kept"]  # at least as good
    worse = case(28)
    assert not worse["refresh"]["kept"] and worse["delta"]["mean"] == 0.25  # the pool's


def test_the_refreshed_arm_is_the_rows_the_promotion_leaves_live(tmp_path):
    """Constructed: what validate scores with a kept refresh equals the live pool after
    the promotion performs it."""
    write(tmp_path / "clean", [("big", None)] * 20 + [("short", None)] * 4, "r")
    loop = LoopConfig(pool=tmp_path / "pool", refresh_share=0.5, target_per_class="auto")
    write(tmp_path / "pooled", [("short", None)] * 4, "gen")
    promote(tmp_path / "pooled", loop.pool, "20261129T020000Z-00000001", 1)
    write(tmp_path / "accepted", [("short", None)] * 5, "gen")
    accepted = load_image_tensors(tmp_path / "accepted", classes=CLASSES)

    plan = plan_promotion(accepted, {"big": 20, "short": 4}, loop)
    assert plan.full and plan.selection.chosen == [] and len(plan.refresh) == 2
    pooled = load_image_tensors(tmp_path / "pooled", classes=CLASSES)
    new = subset(accepted, torch.tensor([], dtype=torch.long))
    arm = refreshed_rows(pooled, new, plan, accepted)
    scored = {"refresh": {"kept": True, "compared_on": "short", "delta_vs_pool": {}}}
    section = delivered(plan, new, accepted, scored, loop)
    assert section["pool_full"] is False  # a kept refresh is judged by the gates
    assert section["delivered_new_per_class"] == {"big": 0, "short": 2}
    assert section["refresh"]["replacing_per_class"] == {"big": 0, "short": 2}

    pairs = section["refresh"]["pairs"]
    promote(
        tmp_path / "accepted",
        loop.pool,
        "20261130T020000Z-00000002",
        1,
        room={"short": 0},
        replace=[tuple(p) for p in pairs],
    )
    live = {r["id"] for p in sorted(Path(loop.pool).glob("part-*.parquet")) for r in rows_of(p)}
    assert live == set(arm.ids) and len(arm) == 4

    rejected = delivered(
        plan, new, accepted, {"refresh": scored["refresh"] | {"kept": False}}, loop
    )
    assert rejected["pool_full"] is True and rejected["refresh"]["pairs"] == []
    assert pq.read_table(next((Path(loop.pool) / RETIRED).glob("*.parquet"))).num_rows == 2
