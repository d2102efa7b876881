"""A user's own images after the demo: the real data switches to another image size with the
same class names. The drift probe calls that infinite drift (not an error), the flow retires
the pool made from the old data before fuse reads it, and records why."""

from __future__ import annotations

import hashlib
import json
import logging
import math

import pytest
import torch
import yaml

from synthloop.config import load_params, parse_params
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter
from synthloop.procedural import make_image_folder
from tasks.shared.images import encode_rows
from tasks.shared.pool import live_sizes, pool_counts, promote
from tests.conftest import build_workspace, git_commit, run_tool, small_params
from tests.test_loop_parts import write_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "20261130T020000Z-3f2a9c1b"


def stage_params(root, size: int, channels: int):  # noqa: ANN001, ANN201
    """Ingest, clean and a tiny evaluator on `root/raw` (3 shapes), at one image size."""
    return parse_params(
        {
            "ingest": {
                "sources": [{"kind": "image_folder", "path": "raw"}],
                "allowed_roots": ["."],
            },
            "clean": {
                "image_size": size,
                "channels": channels,
                "min_class_count": 3,
                "split_tolerance": 0.1,
                "workers": 1,
            },
            "train_evaluator": {"width": 4, "feature_dim": 8, "epochs": 1, "batch_size": 32},
        },
        root=root,
    )


def test_a_new_image_size_or_channel_count_is_infinite_drift_not_an_error(tmp_path):
    from flows.drift import DriftProbe
    from tasks.clean import run_clean
    from tasks.evaluator.stage import run_train_evaluator
    from tasks.ingest.stage import run_ingest

    make_image_folder(tmp_path / "raw", classes=3, per_class=20, size=16, seed=1)
    old = stage_params(tmp_path, size=8, channels=1)
    run_ingest(old.ingest)
    run_clean(old.clean, validate=False)
    run_train_evaluator(old.train_evaluator)

    probe = DriftProbe(old)
    assert probe.measure() == pytest.approx(0.0, abs=1e-3) and probe.reason is None

    # The same class names at another size, then with another channel count: clean rewrites
    # the train split the probe compares against.
    for size, channels, found in ((12, 1, "12x12 with 1 channel(s)"), (8, 3, "with 3 channel")):
        run_clean(stage_params(tmp_path, size, channels).clean, validate=False)
        assert probe.measure() == math.inf
        assert "image size changed" in probe.reason and found in probe.reason
        assert "8x8 with 1 channel(s)" in probe.reason  # what the evaluator embeds

    # A run that stopped after clean left the split at the new size: the next run's probe
    # starts without a baseline, and says so, instead of failing.
    moved = DriftProbe(stage_params(tmp_path, 8, 3))
    assert moved.before is None and "image size changed" in moved.moved_at_start
    assert moved.measure() == math.inf and moved.reason == moved.moved_at_start


def write_split(directory, n: int, size: int) -> None:  # noqa: ANN001
    """`n` grey rows of one size, labelled a: a clean train split's layout."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size)
    with ShardWriter(directory, IMAGE_SCHEMA) as writer:
        for png in encode_rows(images.contiguous()):
            writer.append(
                {
                    "id": hashlib.blake2b(png, digest_size=16).hexdigest(),
                    "label": "a",
                    "split": "train",
                    "source": "real",
                    "parent_id": "",
                    "image": png,
                    "height": size,
                    "width": size,
                    "channels": 1,
                }
            )


def test_retire_stale_pool_on_drift_or_another_image_size(tmp_path, monkeypatch):
    """Without DVC records (a plain rename): which shards go, and the record of why."""
    from flows.attempt import retire_stale_pool

    monkeypatch.setattr("flows.attempt.get_run_logger", lambda: logging.getLogger("test"))
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "ingest": {"sources": [{"kind": "demo"}]},
                "clean": {"output": "clean"},
                "loop": {"pool": "pool", "drift_threshold": 50.0},
            }
        )
    )

    def retire(ws: str, drift_fid: float | None, drift_reason: str | None) -> dict | None:
        params = load_params(tmp_path / "params.yaml")
        return retire_stale_pool.fn(
            ws,
            str(params.loop.pool),
            str(params.clean.output / "train"),
            params.loop.drift_threshold,
            drift_fid,
            drift_reason,
        )

    write_rows(tmp_path / "accepted", ["a", "a", "b"])  # 8x8 grey rows
    pool = tmp_path / "pool"
    shard = promote(tmp_path / "accepted", pool, KEY, 1)["shard"]
    write_split(tmp_path / "clean/train", 4, size=8)
    ws = str(tmp_path)

    assert retire(ws, 12.0, None) is None  # within the threshold, same size
    assert retire(ws, None, None) is None  # no drift measured, same size

    write_split(tmp_path / "clean/train", 4, size=12)  # a run that stopped after clean
    record = retire(ws, None, None)
    assert record["shards"] == [shard] and record["rows"] == 3
    assert record["per_class"] == {"a": 2, "b": 1} and record["drift_fid"] == math.inf
    assert record["reason"] == (
        "image size changed: the pool holds 8x8 with 1 channel(s), the clean train split "
        "12x12 with 1 channel(s)"
    )
    assert record["restore"] == "dvc move pool/retired/SHARD pool/SHARD"
    assert (pool / "retired" / shard).is_file() and live_sizes(pool) == {}
    assert pool_counts(pool) == {}

    write_rows(tmp_path / "accepted2", ["c"], seed=5)
    second = promote(tmp_path / "accepted2", pool, KEY, 2)["shard"]
    write_split(tmp_path / "clean/train", 4, size=8)
    record = retire(ws, math.inf, "classes changed: ...")
    assert record["shards"] == [second] and record["drift_fid"] == math.inf
    assert record["reason"] == (
        "the real data moved beyond loop.drift_threshold (50.0): classes changed: ..."
    )


@pytest.mark.integration
@pytest.mark.long
def test_own_images_of_another_size_after_a_run_retire_the_old_pool(tmp_path, prefect_api):
    """A run on 16x16 RGB shapes promotes a pool; the source then switches to 8x8 grey images
    with the same class names: the next run completes, with the old pool retired (reason,
    drift, rows) in reports/loop.json, the shards' .dvc files, the summary and the run's
    commit, from which the old pool can be restored."""
    from flows.closed_loop import closed_loop
    from tests.test_pipeline_integration import read_artifact

    ws = build_workspace(tmp_path / "ws", git=True)
    params_file = str(ws / "params.yaml")
    assert closed_loop(params_path=params_file)["passed"]
    first = json.loads((ws / "reports/loop.json").read_text())
    old_shard = first["attempts"][0]["promotion"]["shard"]
    old_rows = first["attempts"][0]["promotion"]["promoted"]

    make_image_folder(ws / "data/raw/small", classes=3, per_class=20, size=8, seed=2, channels=1)
    run_tool("dvc", "add", "-q", "data/raw/small", cwd=ws)
    (ws / "params.yaml").write_text(
        yaml.safe_dump(small_params("data/raw/small", image_size=8, channels=1))
    )
    git_commit(ws, "own images: 8x8 grey")
    state = closed_loop(params_path=params_file, return_state=True)
    assert state.is_completed(), state

    loop = json.loads((ws / "reports/loop.json").read_text())
    attempt = loop["attempts"][0]
    assert attempt["drift_fid"] == math.inf and attempt["drift_retrain_from_scratch"]
    assert "image size changed" in attempt["drift_reason"]
    retired = attempt["pool_retired"]
    assert retired["shards"] == [old_shard] and retired["rows"] == old_rows
    assert retired["reason"].startswith("the real data moved beyond loop.drift_threshold")
    assert "16x16 with 3 channel(s)" in retired["reason"]
    assert attempt["stages"]["fuse"] == "ran" and attempt["promotion"]["promoted"] > 0
    shards = {e["shard"]: e["retired"] for e in loop["pool"]}
    assert shards[old_shard] is True and shards[attempt["promotion"]["shard"]] is False
    meta = yaml.safe_load((ws / f"data/pool/retired/{old_shard}.dvc").read_text())["meta"]
    assert meta["retired"]["reason"] == retired["reason"]

    summary = read_artifact("closed-loop-summary", state.state_details.flow_run_id)
    assert f"**Pool retired** (round 1 attempt 1): {old_rows} rows in 1 shard(s)" in summary

    # The run branch records the retirement; its previous commit still has the live shard.
    tree = run_tool("git", "ls-tree", "-r", "--name-only", "synthloop/runs", cwd=ws).stdout
    assert f"data/pool/retired/{old_shard}.dvc" in tree
    before = run_tool("git", "ls-tree", "-r", "--name-only", "synthloop/runs~1", cwd=ws).stdout
    assert f"data/pool/{old_shard}.dvc" in before
