"""Clean's pass 1 in worker processes gives the same bytes as in one process."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tasks.clean as clean_module
from synthloop.config import parse_params
from synthloop.procedural import make_image_folder
from synthloop.sharding import ShardFailed
from tasks.clean import run_clean
from tasks.ingest.stage import run_ingest
from tests.conftest import small_params


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def make_dirty_folder(root: Path, per_class: int = 60, seed: int = 3) -> Path:
    """A procedural folder (3 classes) plus files that trip every per-image rule, the
    conversions and the duplicate rules, scattered between the good ones."""
    make_image_folder(root, classes=3, per_class=per_class, size=16, seed=seed)
    rng = np.random.default_rng(seed)
    ellipse, rectangle = root / "ellipse", root / "rectangle"
    good = (ellipse / "000001.png").read_bytes()
    bad = {
        ellipse / "000002a-zero.png": b"",
        ellipse / "000005a-text.png": b"not an image at all",
        rectangle / "000003a-truncated.png": good[: len(good) // 2],
        rectangle / "000007a-blank.png": _png(np.full((16, 16, 3), 128, np.uint8)),
        ellipse / "000011a-huge.png": _png(rng.integers(0, 256, (40, 40, 3), np.uint8)),
        ellipse / "000013a-grey.png": _png(rng.integers(0, 256, (16, 16), np.uint8)),
        rectangle / "000017a-big.jpg": _png(rng.integers(0, 256, (24, 20, 3), np.uint8), "JPEG"),
        ellipse / "000019a-copy.png": good,  # exact duplicate of ellipse/000001.png
        rectangle / "000023a-conflict.png": (rectangle / "000004.png").read_bytes(),
        root / "triangle" / "000029a-conflict.png": (rectangle / "000004.png").read_bytes(),
    }
    for path, data in bad.items():
        path.write_bytes(data)
    other = root / "other"  # a class outside the allow-list
    other.mkdir()
    for n in range(5):
        (other / f"{n:06d}.png").write_bytes(_png(rng.integers(0, 256, (16, 16, 3), np.uint8)))
    return root


def set_in_clean(monkeypatch: pytest.MonkeyPatch, name: str, value: object) -> None:
    """Set `name` in every module of tasks/clean/ that has it (a constant is imported by
    the modules that read it, so the package's own copy alone would change nothing)."""
    # A copy of sys.modules: clean's background Great Expectations import may still be
    # adding modules while this runs.
    modules = [
        m for n, m in list(sys.modules.items()) if n.startswith("tasks.clean.") and hasattr(m, name)
    ]
    assert modules, f"no tasks.clean module has {name}"
    for module in modules:
        monkeypatch.setattr(module, name, value)


def outputs_digest(params) -> dict[str, str]:
    """sha256 of every clean output file and the report; paths relative to the run root."""
    cfg = params.clean
    files = sorted(p for p in cfg.output.rglob("*") if p.is_file())
    files += [cfg.quarantine, cfg.report]
    root = cfg.output.parent.parent
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_worker_processes_write_the_same_bytes_as_one_process(tmp_path, monkeypatch, caplog):
    make_dirty_folder(tmp_path / "raw")
    params = {}
    for workers in (1, 2):
        run = tmp_path / f"run{workers}"
        raw = small_params(
            str(tmp_path / "raw"),
            labels=["ellipse", "rectangle", "triangle"],
            max_pixels=1000,  # the 40x40 file is over it
            workers=workers,
        )
        params[workers] = parse_params(raw, root=run)
    run_ingest(params[1].ingest)
    shutil.copytree(params[1].ingest.output, params[2].ingest.output)

    # Several chunks, and a pool even for this small input.
    set_in_clean(monkeypatch, "BATCH_ROWS", 23)  # tasks: batches of <= 16 rows
    set_in_clean(monkeypatch, "MAX_CHUNK_ROWS", 7)  # decoded 7 at a time
    set_in_clean(monkeypatch, "POOL_MIN_ROWS", 0)
    assert clean_module.decode_workers(params[2].clean, 200) == 2
    assert clean_module.decode_workers(params[1].clean, 200) == 1
    caplog.set_level("INFO", logger="tasks.clean")
    gx_imports: list[int] = []
    monkeypatch.setattr(
        "tasks.clean.stage.start_gx_import",
        lambda: gx_imports.append(1) or threading.Thread(target=lambda: None),
    )
    reports = {w: run_clean(p.clean, validate=False) for w, p in params.items()}
    used = [r.getMessage() for r in caplog.records if "pass 1 used" in r.getMessage()]
    assert used == ["clean: pass 1 used 1 process(es)", "clean: pass 1 used 2 process(es)"]
    assert gx_imports == []  # no validation: no GX import left running in the background

    assert reports[1] == reports[2]
    assert set(reports[1]["quarantined"]) >= {
        "zero_byte",
        "not_an_image",
        "truncated",
        "blank",
        "too_many_pixels",
        "label_not_allowed",
        "exact_duplicate",
        "conflicting_labels",
    }
    assert reports[1]["converted"]["resized"] >= 1
    assert reports[1]["converted"]["channels_converted"] >= 1
    assert outputs_digest(params[1]) == outputs_digest(params[2])


def test_chunk_size_does_not_change_the_output(tmp_path, monkeypatch):
    make_dirty_folder(tmp_path / "raw", per_class=20)
    digests = []
    for batch, chunk in ((5, 3), (4096, 4096)):
        run = tmp_path / f"run{chunk}"
        raw = small_params(str(tmp_path / "raw"), labels=["ellipse", "rectangle", "triangle"])
        params = parse_params(raw, root=run)
        run_ingest(params.ingest)
        set_in_clean(monkeypatch, "BATCH_ROWS", batch)
        set_in_clean(monkeypatch, "MAX_CHUNK_ROWS", chunk)
        run_clean(params.clean, validate=False)
        digests.append(outputs_digest(params))
    assert digests[0] == digests[1]


def test_an_error_in_a_worker_fails_the_stage_and_keeps_the_previous_version(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "raw", classes=2, per_class=30, size=16, seed=5)
    raw = small_params(str(tmp_path / "raw"), workers=2, min_class_count=1)
    params = parse_params(raw, root=tmp_path / "run")
    run_ingest(params.ingest)
    run_clean(params.clean, validate=False)
    before = outputs_digest(params)
    # A batch no worker can decode: its image column holds text, not bytes.
    shard = sorted(params.ingest.output.glob("part-*.parquet"))[1]
    table = pq.read_table(shard)
    table = table.set_column(4, "image", pa.array(["x"] * table.num_rows, pa.string()))
    pq.write_table(table, shard)

    set_in_clean(monkeypatch, "BATCH_ROWS", 16)
    set_in_clean(monkeypatch, "POOL_MIN_ROWS", 0)
    # Pass 1 runs as shards (synthloop/sharding.py): the failure names the shard and cause.
    with pytest.raises(ShardFailed, match=r"'clean': shard 1 .*TypeError"):
        run_clean(params.clean, validate=False)
    assert outputs_digest(params) == before
    leftovers = [p.name for p in params.clean.output.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    assert multiprocessing.active_children() == []  # the workers were waited for


def test_small_inputs_and_workers_1_stay_in_this_process(monkeypatch):
    from synthloop.config import CleanConfig

    assert clean_module.decode_workers(CleanConfig(workers=4), 500) == 1
    assert (
        clean_module.decode_workers(CleanConfig(workers=4), clean_module.workers.POOL_MIN_ROWS - 1)
        == 1
    )
    assert clean_module.decode_workers(CleanConfig(workers=1), 10**6) == 1
    assert clean_module.decode_workers(CleanConfig(workers=4), 10**6) == 4
    batches = -(-clean_module.workers.POOL_MIN_ROWS // clean_module.workers.BATCH_ROWS)
    rows = batches * clean_module.workers.BATCH_ROWS
    assert clean_module.decode_workers(CleanConfig(workers=99), rows) == batches
    set_in_clean(monkeypatch, "_cpu_count", lambda: 2)
    assert clean_module.decode_workers(CleanConfig(workers=0), 10**6) == 2
