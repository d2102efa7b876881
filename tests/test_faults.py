"""Faults leave a consistent workspace: a promotion killed (SIGKILL) between writing its
pool shard and `dvc add`, a stage output whose write fails part-way, and a process killed
between moving an output's previous version aside and moving the new one in."""

from __future__ import annotations

import errno
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from synthloop.config import parse_params
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter, remove_stale_temporaries
from tests.conftest import REPO, small_params


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_accepted(folder: Path, rows: int = 6) -> None:
    """A small accepted-synthetic dataset (the rows a promotion reads)."""
    with ShardWriter(folder, IMAGE_SCHEMA) as out:
        for i in range(rows):
            data = f"image {i}".encode()
            row = {"id": hashlib.md5(data).hexdigest(), "label": str(i % 2), "image": data}
            out.append({**row, "split": "train", "source": "synthetic", "channels": 1})


# Promote as the flow's promote task does, then die before its `dvc add`.
_KILLED_PROMOTION = """
import os, signal, sys
from pathlib import Path
from tasks.shared.pool import promote
result = promote(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], 1, "cgan")
assert result["shard"], result
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration
def test_a_promotion_killed_before_dvc_add_is_adopted_by_the_next_run(workspace):
    from flows.loop import dvc_add, run_dvc
    from flows.pool_admin import adopt_orphans
    from tasks.shared.pool import pool_orphans, promote, verify_pool

    accepted, pool = workspace / "data/accepted", workspace / "data/pool"
    write_accepted(accepted)
    key = "20261130T020000Z-deadbeef"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_PROMOTION, str(accepted), str(pool), key],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (orphan,) = pool_orphans(pool)
    assert orphan.name == f"part-{key}-r01.parquet" and not Path(f"{orphan}.dvc").exists()
    # A temporary of a promotion killed even earlier, before its rename.
    (pool / f".part-{key}-r02.parquet.tmp-x1y2").write_bytes(b"PAR1 half")

    done = adopt_orphans(workspace, pool)
    assert done[orphan.name].startswith("adopted")
    assert done[f".part-{key}-r02.parquet.tmp-x1y2"].startswith("removed")
    assert pool_orphans(pool) == []
    assert verify_pool(pool) == 1
    status = run_dvc(workspace, "status", "--json", f"data/pool/{orphan.name}.dvc").stdout
    assert json.loads(status or "{}") == {}  # DVC's record matches the shard

    # The next promotion goes on: the adopted rows count as already in the pool.
    result = promote(accepted, pool, "20261201T020000Z-cafef00d", 1, "cgan")
    assert result["promoted"] == 0 and result["already_in_pool"] == 6
    write_accepted(accepted, rows=8)  # two new rows
    result = promote(accepted, pool, "20261201T020000Z-cafef00d", 2, "cgan")
    assert result["promoted"] == 2
    dvc_add(workspace, pool / result["shard"])
    assert verify_pool(pool) == 2


def test_an_adopted_orphan_that_is_not_a_pool_shard_is_set_aside(tmp_path):
    from flows.pool_admin import adopt_orphans

    pool = tmp_path / "data/pool"
    pool.mkdir(parents=True)
    (pool / "part-20261130T020000Z-deadbeef-r01.parquet").write_bytes(b"not parquet")
    done = adopt_orphans(tmp_path, pool)
    assert "not a readable pool shard" in done["part-20261130T020000Z-deadbeef-r01.parquet"]
    assert (pool / "part-20261130T020000Z-deadbeef-r01.parquet.rejected").read_bytes() == (
        b"not parquet"
    )


def test_an_ingest_write_failing_part_way_keeps_the_previous_output(
    tmp_path, shapes_folder, monkeypatch
):
    from tasks.ingest.stage import run_ingest

    params = parse_params(small_params("shapes"), root=tmp_path)
    run_ingest(params.ingest)
    output, report = params.ingest.output, params.ingest.report
    before, report_before = tree_digest(output), report.read_bytes()
    assert len(before) > 1  # several shards: the failure comes after one was written

    real_flush = ShardWriter.flush

    def disk_full_after_one_shard(self: ShardWriter) -> None:
        if self.shards == 1:  # a second shard, half written, then the disk is full
            (self.directory / "part-00001.parquet").write_bytes(b"PAR1 half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "flush", disk_full_after_one_shard)
    with pytest.raises(OSError) as err:
        run_ingest(params.ingest)
    assert err.value.errno == errno.ENOSPC
    (note,) = err.value.__notes__
    assert str(output) in note and "previous version left as it was" in note
    assert tree_digest(output) == before
    assert report.read_bytes() == report_before
    assert not list(output.parent.glob(f".{output.name}.*"))  # no temporary left behind


def test_a_kill_between_the_two_renames_restores_the_previous_output(tmp_path):
    """atomic_dir moves the previous version aside, then the new one in: a kill in between
    leaves only `.<name>.old-<pid>`. The next writer puts it back before it writes."""
    target = tmp_path / "data/clean"
    (target / "train").mkdir(parents=True)
    (target / "train/part-00000.parquet").write_bytes(b"previous version")
    before = tree_digest(target)
    target.rename(tmp_path / "data/.clean.old-4242")  # what the kill left
    (tmp_path / "data/.clean.tmp-abc").mkdir()  # and the new version, never moved in
    remove_stale_temporaries(target)
    assert tree_digest(target) == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["clean"]
