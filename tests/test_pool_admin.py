"""The pool under real DVC, without a flow: legacy names migrated with their DVC records, a
shard retired with its reason, the pool shown and reset by the CLI."""

from __future__ import annotations

import json

import pytest
import yaml

from flows.loop import dvc_add
from flows.pool_admin import migrate_legacy_names
from synthloop.dataset import file_hash
from tasks.shared.pool import pool_counts, pool_ids, promote, verify_pool
from tests.conftest import build_workspace, git_commit, run_tool
from tests.test_loop_parts import write_rows

pytestmark = pytest.mark.integration

KEY = "20261130T020000Z-3f2a9c1b"


def dvc_clean(ws) -> bool:
    """DVC finds every pool record in step with its data (the stages never ran here)."""
    status = json.loads(run_tool("dvc", "status", "--json", cwd=ws).stdout or "{}")
    return not [name for name in status if name.startswith("data/pool")]


def test_legacy_names_retire_show_and_reset(tmp_path):
    ws = build_workspace(tmp_path / "ws", git=True)
    pool = ws / "data/pool"
    # A pool from the first naming scheme: part-r0001.parquet, versioned with `dvc add`.
    write_rows(tmp_path / "old", ["a", "b"], seed=1)
    old = promote(tmp_path / "old", pool, "19990101T000000Z-legacy0", 1)["shard"]
    (pool / old).rename(pool / "part-r0001.parquet")
    md5 = dvc_add(ws, pool / "part-r0001.parquet")
    write_rows(tmp_path / "new", ["a", "a", "c"], seed=2)
    new = promote(tmp_path / "new", pool, KEY, 1, family="cgan")["shard"]
    dvc_add(ws, pool / new)
    git_commit(ws, "two shards")

    renamed = migrate_legacy_names(ws, pool)
    legacy = "part-00000000T000000Z-legacy-r01.parquet"
    assert renamed == {"part-r0001.parquet": legacy}
    assert not (pool / "part-r0001.parquet.dvc").exists()
    record = yaml.safe_load((pool / f"{legacy}.dvc").read_text())
    assert record["outs"][0]["md5"] == md5 == file_hash(pool / legacy, algorithm="md5")
    assert verify_pool(pool) == 2 and dvc_clean(ws)
    assert sorted(p.name for p in pool.glob("part-*.parquet")) == [legacy, new]

    shown = run_tool("synthloop", "pool", cwd=ws).stdout
    assert "5 rows in 2 live shard(s)" in shown
    assert "legacy" in shown and KEY in shown and "cgan" in shown

    refused = run_tool("synthloop", "pool", "retire", new, cwd=ws, check=False)
    assert refused.returncode == 2 and "--reason" in refused.stderr
    missing = run_tool(
        "synthloop", "pool", "retire", "nope.parquet", "--reason", "x", cwd=ws, check=False
    )
    assert missing.returncode == 2 and "no such live pool shard" in missing.stderr
    assert new in missing.stderr  # it lists what can be retired

    run_tool("synthloop", "pool", "retire", new, "--reason", "feedback rejected it", cwd=ws)
    retired = pool / "retired" / new
    assert retired.is_file() and not (pool / new).exists()
    meta = yaml.safe_load((pool / "retired" / f"{new}.dvc").read_text())["meta"]["retired"]
    assert meta["reason"] == "feedback rejected it"
    assert dvc_clean(ws) and verify_pool(pool) == 1
    assert pool_counts(pool) == {"a": 1, "b": 1}  # fuse no longer reads it...
    again = promote(tmp_path / "new", pool, "20261201T020000Z-00000000", 1)
    assert again["promoted"] == 0 and again["already_in_pool"] == 3  # ...and it never returns
    git_commit(ws, "retired")

    refused = run_tool("synthloop", "pool", "reset", cwd=ws, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(pool_ids(pool)) == 5  # nothing removed without the confirmation

    reset = run_tool("synthloop", "pool", "reset", "--yes", cwd=ws)
    assert "removed 2 shard(s)" in reset.stdout
    assert sorted(p.name for p in pool.rglob("*") if p.name != ".gitignore") == ["README.md"]
    assert dvc_clean(ws)
    # git keeps the history of what was reset: a later `dvc checkout` of it restores the pool.
    log = run_tool("git", "log", "--oneline", "--", f"data/pool/retired/{new}.dvc", cwd=ws)
    assert "retired" in log.stdout
