"""The utility verdict is measured on what is delivered: the synthetic arm holds the pool rows
fuse mixes in and exactly the accepted rows promotion would add, so after the promotion fuse
mixes in the arm's rows, no more and no fewer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from synthloop.config import FuseConfig, GateConfig, LoopConfig
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter
from tasks.fuse.stage import run_fuse
from tasks.shared.images import ImageTensors, concat, load_image_tensors
from tasks.shared.pool import (
    pool_counts,
    pool_room,
    pool_targets,
    promote,
    select_for_pool,
)
from tasks.validate.gates import delivery_order, evaluate_gates
from tasks.validate.promotion import delivered, load_pooled, plan_promotion, subset, why_nothing
from tasks.validate.utility_protocol import nothing_to_score, per_class_counts
from tests.test_fuse import write

CLASSES = ["big", "rich", "short"]
KEY = "20261130T020000Z-3f2a9c1b"


def loaded(directory: Path) -> ImageTensors:
    return load_image_tensors(directory, classes=CLASSES)


def fuse(tmp_path: Path, loop: LoopConfig, out: str) -> Path:
    cfg = FuseConfig(
        clean=tmp_path / "clean",
        augmented=tmp_path / "augmented",
        pool=loop.pool,
        feedback=tmp_path / "feedback",
        output=tmp_path / out,
        report=tmp_path / f"{out}.json",
    )
    run_fuse(cfg, loop)
    return cfg.output


def test_the_selection_skips_known_ids_and_fills_each_class_in_order():
    ids = ["k", "a1", "a2", "b1", "a1", "a3", "b2", "c1"]
    labels = ["a", "a", "a", "b", "a", "a", "b", "c"]
    picked = select_for_pool(ids, labels, {"k"}, {"a": 2, "b": None}, total_room=4)
    # k known; a1 again: taken already; a3 past a's room; c1 past the total room
    assert picked.chosen == [1, 2, 3, 6]
    assert (picked.already_in_pool, picked.over_target) == (2, 2)
    assert select_for_pool(ids, labels, set(), {}, None).chosen == [0, 1, 2, 3, 5, 6, 7]


def test_the_hardest_order_offers_the_least_confident_accepted_rows_first():
    confidence = np.array([0.9, 0.61, 0.75, 0.61, 0.99])
    assert delivery_order(confidence, "generated").tolist() == [0, 1, 2, 3, 4]
    assert delivery_order(confidence, "hardest").tolist() == [1, 3, 2, 0, 4]  # ties as sampled
    # With room for two rows of the class, the promotion keeps the two hardest.
    ids = [f"s{i}" for i in range(5)]
    order = delivery_order(confidence, "hardest")
    picked = select_for_pool([ids[i] for i in order], ["short"] * 5, set(), {"short": 2}, None)
    assert [ids[order[i]] for i in picked.chosen] == ["s1", "s3"]


def test_the_accepted_rows_are_written_in_the_order_the_pool_is_offered_them(tmp_path):
    from synthloop.config import ValidateConfig
    from tasks.validate.stage import _write_accepted

    ids = write(tmp_path / "synthetic", [("short", None)] * 7, "synthetic")
    cfg = ValidateConfig(synthetic=tmp_path / "synthetic", accepted=tmp_path / "accepted")
    for chosen, in_order in (([ids[1], ids[2], ids[5]], True), ([ids[5], ids[1], ids[2]], False)):
        _write_accepted(cfg, chosen, in_order)
        written = pq.read_table(cfg.accepted, columns=["id"]).column("id").to_pylist()
        assert written == chosen


def test_the_utility_arm_holds_what_fuse_mixes_in_after_promotion(tmp_path):
    clean = [("big", None)] * 20 + [("rich", None)] * 12 + [("short", None)] * 4
    real = write(tmp_path / "clean", clean, "demo0")
    write(tmp_path / "augmented", [("short", real[-1])] * 4, "augmented")
    pool = tmp_path / "pool"
    loop = LoopConfig(pool=pool, max_pool_rows=11, target_per_class="auto")  # multiple 1
    train_per_class = {"big": 20, "rich": 12, "short": 4}
    targets = pool_targets(train_per_class, loop.target_per_class, loop.synthetic_multiple)
    assert targets == {"big": 0, "rich": 8, "short": 4}

    # The pool as it stands: 3 rich and 2 short rows live, one shard retired.
    write(tmp_path / "night1", [("rich", None)] * 3 + [("short", None)] * 2, "gen")
    promote(tmp_path / "night1", pool, "20261129T020000Z-00000001", 1)
    old = write(tmp_path / "retired", [("rich", None)], "gen")
    shard = promote(tmp_path / "retired", pool, "20261128T020000Z-00000000", 1)["shard"]
    (pool / "retired").mkdir()
    (pool / shard).rename(pool / "retired" / shard)
    assert pool_counts(pool) == {"rich": 3, "short": 2}

    # Tonight's accepted rows: a short row already pooled, 4 new short rows (room for 2),
    # the retired rich row, 7 new rich rows (room for 5) and 2 big rows (room for none); the
    # pool's total room, 11 - 5 = 6, binds too.
    write(
        tmp_path / "new", [("short", None)] * 4 + [("rich", None)] * 7 + [("big", None)] * 2, "gen"
    )
    fresh, pooled = rows_of(tmp_path / "new"), rows_of(tmp_path / "night1")
    accepted_dir = tmp_path / "accepted"
    write_rows(accepted_dir, [pooled[3], *fresh[:4], *rows_of(pool / "retired"), *fresh[4:]])
    accepted = loaded(accepted_dir)
    assert accepted.ids[5] == old[0]

    before = fuse(tmp_path, loop, "fused_before")
    plan = plan_promotion(accepted, train_per_class, loop)
    arm_new = subset(accepted, torch.tensor(plan.selection.chosen, dtype=torch.long))
    arm = concat(load_pooled(before, loaded(tmp_path / "clean")), arm_new)
    assert per_class_counts(arm) == {"big": 0, "rich": 3 + 4, "short": 2 + 2}

    # The flow's promotion with the pool's room, as flows/attempt.py computes it.
    room, total = pool_room(pool_counts(pool), targets, loop.max_pool_rows)
    promotion = promote(accepted_dir, pool, KEY, 1, room=room, total_room=total)
    promoted = rows_of(pool / promotion["shard"])
    assert [r["id"] for r in promoted] == arm_new.ids  # the same rows, in the same order
    assert promotion["per_class"] == {"rich": 4, "short": 2}  # short fills 2, rich 6 - 2
    picked = plan.selection
    assert (picked.already_in_pool, picked.over_target) == (2, 7)
    assert (promotion["already_in_pool"], promotion["over_target"]) == (2, 7)

    # After the promotion fuse mixes in exactly the arm's synthetic rows.
    after = fuse(tmp_path, loop, "fused_after")
    assert sorted(load_pooled(after, accepted).ids) == sorted(arm.ids)
    section = delivered(plan, arm_new, accepted, {}, loop)
    assert section["delivered_new_per_class"] == {"big": 0, "rich": 4, "short": 2}
    assert section["pool_targets"] == targets and section["pool_full"] is False
    assert section["not_delivered"] == {"already_in_pool": 2, "over_target": 7}
    assert "min(floor(1 x R), R_max - R)" in section["delivered_rule"]


def rows_of(path: Path) -> list[dict]:
    """A shard's rows, or a dataset's in shard order."""
    paths = [path] if path.is_file() else sorted(path.glob("part-*.parquet"))
    return [row for p in paths for row in pq.read_table(p).to_pylist()]


def write_rows(directory: Path, rows: list[dict]) -> None:
    with ShardWriter(directory, IMAGE_SCHEMA, shard_rows=4) as out:
        for row in rows:
            out.append({k: row[k] for k in IMAGE_SCHEMA.names})


RESOLVED = {"points_per_test_image": 2.0, "max_points_per_test_image": 5.0}


def passing_figures(utility: dict) -> dict:
    attack = {"auc": 0.5, "low": 0.45, "high": 0.55}
    return {
        "class_consistency": 0.9,
        "near_copy_rate": 0.0,
        "fid": 1.0,
        "fid_real_floor": 1.0,
        "utility": utility,
        "expectations_critical_ok": True,
        "privacy": {
            "memorisation": {"ratio": 0.0},
            "membership": {"distance": attack, "density": attack, "worst": "distance"},
        },
    }


def test_no_row_to_promote_is_no_evidence_and_says_why(tmp_path):
    write(tmp_path / "clean", [("big", None)] * 20 + [("short", None)] * 4, "r")
    train = load_image_tensors(tmp_path / "clean", classes=["big", "short"])
    write(tmp_path / "accepted", [("big", None)] * 3, "gen")  # big's target is 0
    accepted = load_image_tensors(tmp_path / "accepted", classes=["big", "short"])
    loop = LoopConfig(pool=tmp_path / "pool", target_per_class="auto")
    plan = plan_promotion(accepted, {"big": 20, "short": 4}, loop)
    assert plan.selection.chosen == [] and not plan.full  # short still has room
    test_labels = torch.tensor([0] * 10 + [1] * 30)
    result = nothing_to_score(train, test_labels, 0.5, why_nothing(plan, len(accepted)))
    result |= delivered(
        plan, subset(accepted, torch.tensor([], dtype=torch.long)), accepted, result, loop
    )
    assert result["verdict"] == "no evidence" and result["delta"]["low"] is None
    assert result["verdict_text"] == (
        "no evidence: promotion would take none of the 3 accepted rows (0 already in the "
        "pool, 3 over their class's target or loop.max_pool_rows); nothing was scored"
    )
    assert result["decisive"] == "short" and result["resolution"]["test_images"] == 30
    assert result["delivered_per_class"] == {"big": 0, "short": 0}
    gates = evaluate_gates(GateConfig(), passing_figures(result))
    assert not gates["passed"] and not gates["utility_lower_bound"]["passed"]

    # A full pool: nothing can be promoted whatever the gates say, so the utility gates
    # pass unmeasured (the flow ends the run: the pool is full).
    write(tmp_path / "pooled", [("short", None)] * 4, "gen")
    promote(tmp_path / "pooled", loop.pool, KEY, 1)
    full = plan_promotion(accepted, {"big": 20, "short": 4}, loop)
    assert full.full and full.selection.chosen == []
    result = nothing_to_score(train, test_labels, 0.5, why_nothing(full, len(accepted)))
    result |= delivered(
        full, subset(accepted, torch.tensor([], dtype=torch.long)), accepted, result, loop
    )
    assert result["verdict_text"].startswith("no evidence: the pool is full")
    gates = evaluate_gates(GateConfig(), passing_figures(result))
    assert gates["passed"] and gates["utility_lower_bound"]["value"] is None
    assert gates["utility_lower_bound"]["note"] == "the pool is full: no row to promote"


def test_a_request_raises_its_class_target_and_is_answered_by_name():
    from tasks.shared.pool import answer_requests, pool_targets

    train = {"rich": 100, "short": 10}
    plain = pool_targets(train, "auto", 1.0)
    asked = pool_targets(train, "auto", 1.0, {"short": 40, "rich": 5, "ghost": 3})
    assert asked == {"rich": plain["rich"] + 5, "short": plain["short"] + 40}
    assert pool_targets(train, 20, 1.0, {"short": 5}) == {"rich": 20, "short": 25}
    answers = answer_requests(
        {"short": 40, "rich": 5, "ghost": 3}, asked, {"short": 50, "rich": 2}, disk_room=10
    )
    assert answers["short"] == {"asked": 40, "target": 50, "pooled": 50, "met": True, "why": None}
    assert not answers["rich"]["met"] and "3 rows short" in answers["rich"]["why"]
    assert not answers["ghost"]["met"] and "unknown class 'ghost'" in answers["ghost"]["why"]
    full = answer_requests({"rich": 5}, asked, {"rich": 2}, disk_room=0)
    assert full["rich"]["why"] == "the pool is at loop.max_pool_rows"
    gated = answer_requests({"rich": 5}, asked, {}, 10, why_not="the gates failed")
    assert gated["rich"]["why"] == "the gates failed"


def test_proportional_targets_give_every_class_the_same_multiple_the_largest_too():
    from tasks.shared.pool import describe_targets, pool_targets

    train = {"rich": 100, "mid": 40, "short": 10, "none": 0}
    assert pool_targets(train, "auto", 1.0) == {"rich": 0, "mid": 40, "short": 10, "none": 0}
    assert pool_targets(train, "proportional", 0.5) == {
        "rich": 50, "mid": 20, "short": 5, "none": 0,
    }  # fmt: skip
    assert pool_targets(train, "proportional", 1.0, {"rich": 3})["rich"] == 103
    assert "every class alike" in describe_targets("proportional", 1.0)
