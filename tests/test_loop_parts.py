"""The loop's plain parts: acceptance, gates, promotion, pool integrity, feedback requests,
retrain overrides."""

import hashlib
import json
from datetime import UTC, datetime

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from flows.loop import apply_overrides, overrides_for
from synthloop.config import ConfigError, GateConfig, load_params
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter, file_hash
from tasks.shared.feedback import error_extra, read_requests, requested_extra
from tasks.shared.images import encode_rows
from tasks.shared.pool import (
    PoolCorrupt,
    legacy_name,
    pool_counts,
    pool_full,
    pool_room,
    pool_targets,
    promote,
    run_key,
    verify_pool,
)
from tasks.validate.gates import acceptance, evaluate_gates
from tests.conftest import REPO


def write_rows(directory, labels, seed=0):
    images = torch.from_numpy(
        np.random.default_rng(seed).integers(0, 256, (len(labels), 1, 8, 8), dtype=np.uint8)
    )
    with ShardWriter(directory, IMAGE_SCHEMA) as writer:
        for label, png in zip(labels, encode_rows(images), strict=True):
            row_id = hashlib.blake2b(png, digest_size=16).hexdigest()
            writer.append(
                {
                    "id": row_id,
                    "label": label,
                    "split": "train",
                    "source": "synthetic",
                    "parent_id": "v1:seed=0",
                    "image": png,
                    "height": 8,
                    "width": 8,
                    "channels": 1,
                }
            )


def test_acceptance_rules_in_order():
    ids = ["a", "b", "c", "a", "d"]
    confidence = np.array([0.9, 0.2, 0.9, 0.9, 0.95])
    near_copy = np.array([False, False, True, False, False])
    accepted, reasons = acceptance(ids, confidence, near_copy, min_confidence=0.5)
    assert accepted.tolist() == [True, False, False, False, True]
    assert reasons == [None, "low_confidence", "near_copy", "duplicate", None]


RESOLVED = {"points_per_test_image": 2.0, "max_points_per_test_image": 5.0}


def figures(**over):
    base = {
        "class_consistency": 0.9,
        "near_copy_rate": 0.01,
        "fid": 2.0,
        "fid_real_floor": 1.0,
        "utility": {"delta": {"mean": 0.02, "low": 0.01, "high": 0.03}, "resolution": RESOLVED},
        "expectations_critical_ok": True,
        "privacy": privacy(),
    }
    return base | over


def privacy(memorised: float = 0.0, auc_high: float = 0.55) -> dict:
    attack = {"auc": 0.5, "low": 0.45, "high": auc_high}
    return {
        "memorisation": {"ratio": memorised},
        "membership": {"distance": attack, "density": attack, "worst": "distance"},
    }


def test_gates_pass_and_each_can_fail():
    gates = GateConfig(min_class_consistency=0.8, max_near_copy_rate=0.05, max_fid_ratio=3.0)
    assert evaluate_gates(gates, figures())["passed"]
    for name, over in {
        "class_consistency": {"class_consistency": 0.5},
        "near_copy_rate": {"near_copy_rate": 0.5},
        "fid_ratio": {"fid": 10.0},
        # the lower bound decides: a positive mean whose interval reaches below 0 fails
        "utility_lower_bound": {
            "utility": {"delta": {"mean": 0.02, "low": -0.01, "high": 0.05}, "resolution": RESOLVED}
        },
        # 12 test images: one is 8.3 points, more than the gain the split can resolve
        "utility_resolution": {
            "utility": {
                "delta": {"mean": 0.2, "low": 0.1, "high": 0.3},
                "resolution": {"points_per_test_image": 8.33, "max_points_per_test_image": 5.0},
            }
        },
        "expectations": {"expectations_critical_ok": False},
        "memorisation_ratio": {"privacy": privacy(memorised=0.5)},
        # the upper bound decides: an interval that reaches above the line fails
        "membership_auc": {"privacy": privacy(auc_high=0.7)},
    }.items():
        result = evaluate_gates(gates, figures(**over))
        assert not result["passed"] and not result[name]["passed"], name
        assert [n for n, g in result.items() if n != "passed" and not g["passed"]] == [name]


KEY = "20261130T020000Z-3f2a9c1b"


def test_promotion_dedupes_against_the_pool_and_is_atomic(tmp_path, monkeypatch):
    write_rows(tmp_path / "accepted", ["a", "a", "b"], seed=1)
    pool = tmp_path / "pool"
    first = promote(tmp_path / "accepted", pool, KEY, round_no=1, family="cgan")
    assert first["promoted"] == 3 and first["shard"] == f"part-{KEY}-r01.parquet"
    table = pq.read_table(pool / first["shard"]).to_pydict()
    assert (
        table["round"] == [1] * 3 and table["run"] == [KEY] * 3 and table["family"] == ["cgan"] * 3
    )

    write_rows(tmp_path / "accepted2", ["b", "c"], seed=2)
    again = promote(tmp_path / "accepted", pool, KEY, round_no=2)  # nothing new
    assert again == {**again, "promoted": 0, "already_in_pool": 3, "shard": None}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tasks.shared.pool.pq.write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        promote(tmp_path / "accepted2", pool, KEY, round_no=3)
    assert sorted(p.name for p in pool.iterdir()) == [f"part-{KEY}-r01.parquet"]
    assert pool_counts(pool) == {"a": 2, "b": 1}


def test_every_run_names_its_shards_apart_and_in_order(tmp_path):
    """The second night's round 1 must not collide with the first night's round 1."""
    pool = tmp_path / "pool"
    nights = [datetime(2026, 11, d, 2, 0, tzinfo=UTC) for d in (29, 30)]
    names = []
    for seed, night in enumerate(nights):
        write_rows(tmp_path / f"accepted{seed}", ["a", "b"], seed=seed)
        key = run_key(night)
        names.append(promote(tmp_path / f"accepted{seed}", pool, key, round_no=1)["shard"])
    assert names[0] != names[1] and sorted(names) == names
    assert run_key(nights[0]) != run_key(nights[0])  # same second, two runs: still apart
    assert run_key(nights[0], "3f2a9c1b-0000-4000") == "20261129T020000Z-3f2a9c1b"
    # A legacy name sorts before every current one and keeps its round.
    assert legacy_name("part-r0002.parquet") == "part-00000000T000000Z-legacy-r02.parquet"
    assert legacy_name(names[0]) is None
    assert sorted([names[0], legacy_name("part-r0002.parquet")])[0].startswith("part-0000")


def test_the_targets_fill_the_short_classes_gaps():
    # auto: min(m * R, R_max - R); a 40-row class beside a 4000-row one
    train = {"short": 40, "rich": 4000, "mid": 3990}
    assert pool_targets(train, "auto", 1.0) == {"short": 40, "rich": 0, "mid": 10}
    assert pool_targets(train, "auto", 2.5) == {"short": 100, "rich": 0, "mid": 10}
    assert pool_targets(train, "auto", 200.0)["short"] == 3960  # the gap binds
    assert pool_targets({"a": 10, "b": 3}, "auto", 0.5) == {"a": 0, "b": 1}  # floor(1.5)
    assert pool_targets({"a": 10, "b": 10}, "auto", 1.0) == {"a": 0, "b": 0}  # no gap
    # an integer overrides auto for every class; null: no per-class bound
    assert pool_targets(train, 7, 1.0) == {"short": 7, "rich": 7, "mid": 7}
    assert pool_targets(train, None, 1.0) == dict.fromkeys(train)
    # whatever the setting, a class without real rows gets none
    for setting in ("auto", 7, None):
        assert pool_targets({"a": 10, "none": 0}, setting, 1.0)["none"] == 0
    assert pool_targets({}, "auto", 1.0) == {}


def test_the_default_targets_follow_the_config():
    """params.yaml's loop section is the one owner of the rule and its multiple."""
    loop = load_params(REPO / "params.yaml").loop
    assert (loop.target_per_class, loop.synthetic_multiple) == ("proportional", 1.0)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="loop.synthetic_multiple"):
            load_params(REPO / "params.yaml", {"loop": {"synthetic_multiple": bad}})


def test_the_pool_stops_growing_at_its_targets(tmp_path):

    write_rows(tmp_path / "accepted", ["a"] * 5 + ["b"] * 5, seed=3)
    pool = tmp_path / "pool"
    room, total = pool_room({}, {"a": 2, "b": None}, max_rows=6)
    assert room == {"a": 2, "b": None} and total == 6
    result = promote(tmp_path / "accepted", pool, KEY, 1, room=room, total_room=total)
    assert result["per_class"] == {"a": 2, "b": 4} and result["over_target"] == 4
    assert pool_full(pool_counts(pool), {"a": 2, "b": None}, max_rows=6)
    assert not pool_full(pool_counts(pool), {"a": 2, "b": None}, max_rows=None)
    assert pool_full(pool_counts(pool), {"a": 2, "b": 4}, max_rows=None)


def test_verify_pool_detects_a_changed_shard(tmp_path):
    write_rows(tmp_path / "accepted", ["a", "b"])
    pool = tmp_path / "pool"
    shard = pool / promote(tmp_path / "accepted", pool, KEY, round_no=1)["shard"]
    record = {"outs": [{"md5": file_hash(shard, algorithm="md5"), "path": shard.name}]}
    shard.with_name(shard.name + ".dvc").write_text(yaml.safe_dump(record))
    assert verify_pool(pool) == 1
    shard.write_bytes(shard.read_bytes() + b"tampered")
    with pytest.raises(PoolCorrupt, match="hash differs.*dvc checkout"):
        verify_pool(pool)


def test_feedback_requests_add_up_and_report_bad_rows(tmp_path):
    (tmp_path / "requests.csv").write_text("label,extra\n3,10\n3,5\nseven,4\n2,lots\n")
    (tmp_path / "verdicts.csv").write_text("id,verdict\nabc,reject\n")
    extra, problems = read_requests(tmp_path, classes=["2", "3"])
    assert extra == {"3": 15}
    assert [(p["row"], p["reason"].split()[0]) for p in problems] == [(3, "unknown"), (4, "extra")]
    assert read_requests(tmp_path / "missing") == ({}, [])


def test_error_quotas_follow_the_val_errors():
    accuracy = {"0": 1.0, "3": 0.8, "5": 0.9, "8": 0.6, "9": float("nan")}
    # The worst class (8, error 0.4) gets quota x per_class; the others in proportion.
    assert error_extra(100, 1.0, accuracy) == {"3": 50, "5": 25, "8": 100}
    assert error_extra(100, 0.5, accuracy) == {"3": 25, "5": 12, "8": 50}
    assert error_extra(100, 0.0, accuracy) == {}
    assert error_extra(100, 1.0, {"0": 1.0, "1": 1.0}) == {}  # no errors: nothing extra


def test_requested_extra_adds_config_requests_and_error_quotas(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "ingest: {sources: [{kind: demo}]}\n"
        "generate: {per_class: 10, per_class_extra: {'1': 2}, error_quota: 1.0}\n"
        "fuse: {feedback: fb}\n"
        "train_evaluator: {report: ev.json}\n"
    )
    (tmp_path / "fb").mkdir()
    (tmp_path / "fb" / "asks.csv").write_text("label,extra\n1,3\n")
    params = load_params(tmp_path / "params.yaml")
    with pytest.raises(FileNotFoundError, match="ev.json.*train_evaluator.*error_quota: 0"):
        requested_extra(params, ["0", "1"])
    report = {"per_class_accuracy": {"val": {"0": 0.5, "1": 0.75, "2": 0.0}}}
    (tmp_path / "ev.json").write_text(json.dumps(report))
    # Class "2" is not a class of the model: its error neither counts nor sets the scale.
    assert requested_extra(params, ["0", "1"]) == {"0": 10, "1": 2 + 3 + 5}


def test_retrain_overrides_keep_comments_and_are_validated(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    apply_overrides(params, {"train": {"steps": 1234, "cgan": {"width": 16}}})
    text = params.read_text()
    assert "# One configuration, grouped by stage" in text  # comments survive
    loaded = yaml.safe_load(text)
    assert loaded["train"]["steps"] == 1234 and loaded["train"]["cgan"]["width"] == 16
    assert loaded["train"]["cgan"]["z_dim"] == 64  # siblings kept
    before = params.read_text()
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(params, {"train": {"steps": -1}})
    assert params.read_text() == before  # a bad override never lands


def test_the_last_retrain_step_repeats():
    policy = [{"train": {"steps": 2}}, {"train": {"lr": 0.1}}]
    assert [overrides_for(n, policy) for n in (1, 2, 3)] == [policy[0], policy[1], policy[1]]
    assert overrides_for(1, []) == {}
