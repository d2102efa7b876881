"""The ingest and clean stages on real files: sources, quarantine, accounting, atomicity."""

import hashlib
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import tasks.clean as clean_module
from synthloop.config import load_params, parse_params
from synthloop.dataset import read_columns, shard_paths
from tasks.clean import run_clean
from tasks.ingest.sources import SourceError
from tasks.ingest.stage import run_ingest
from tests.conftest import REPO, small_params


def configure(root: Path, sources: list[dict], **clean) -> object:
    params = small_params()
    params["ingest"]["sources"] = sources
    params["ingest"]["allowed_roots"] = ["."]  # these tests' sources live in tmp_path itself
    params["clean"].update(clean)
    return parse_params(params, root=root)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def quarantine(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def test_image_folder_nested_and_unsafe_entries(tmp_path, shapes_folder):
    nested = shapes_folder / "ellipse" / "more" / "deeper"
    nested.mkdir(parents=True)
    (nested / "x.png").write_bytes((shapes_folder / "ellipse" / "000000.png").read_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    (shapes_folder / "ellipse" / "escape.png").symlink_to(outside)
    (shapes_folder / "stray.png").write_bytes(b"at the root")
    before = tree_digest(shapes_folder)

    params = configure(tmp_path, [{"kind": "image_folder", "path": "shapes"}])
    result = run_ingest(params.ingest)

    assert tree_digest(shapes_folder) == before  # raw inputs untouched
    rows = read_columns(params.ingest.output, ["label", "path"]).to_pandas()
    assert len(rows) == 61 and result["ingested"] == 61
    assert (rows.loc[rows.path.str.contains("deeper"), "label"] == "ellipse").all()
    q = quarantine(params.ingest.quarantine)
    assert dict(zip(q.reason, q.path.map(os.path.basename), strict=True)) == {
        "symlink_outside_root": "escape.png",
        "no_class_folder": "stray.png",
    }


def test_unreadable_directory_is_quarantined_not_followed(tmp_path, shapes_folder, monkeypatch):
    real_scandir = os.scandir
    blocked = shapes_folder / "triangle"

    def scandir(path):
        # (an int is a folder descriptor: shutil.rmtree cleaning up a temporary folder)
        if not isinstance(path, int) and Path(path) == blocked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr("tasks.ingest.sources.os.scandir", scandir)
    params = configure(tmp_path, [{"kind": "image_folder", "path": "shapes"}])
    result = run_ingest(params.ingest)
    assert result["ingested"] == 40
    q = quarantine(params.ingest.quarantine)
    assert q.reason.tolist() == ["unreadable_directory"] and q.path[0] == str(blocked)


def test_manifest_paths_resolve_and_may_not_escape(tmp_path, shapes_folder):
    (tmp_path / "elsewhere.png").write_bytes(b"outside the manifest root")
    rows = [
        ("ellipse/000000.png", "round"),
        ("rectangle/000001.png", "square"),
        ("../elsewhere.png", "round"),
        ("ellipse/missing.png", "round"),
        ("rectangle/000002.png", ""),
    ]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(shapes_folder / "m.csv", index=False)
    params = configure(tmp_path, [{"kind": "manifest", "path": "shapes/m.csv"}])
    result = run_ingest(params.ingest)
    assert result["ingested"] == 2
    q = quarantine(params.ingest.quarantine)
    assert sorted(q.reason) == ["missing_file", "missing_label", "path_escapes_root"]
    assert q.set_index("reason").loc["path_escapes_root", "detail"].startswith("row 3")


def test_manifest_without_label_column(tmp_path, shapes_folder):
    pd.DataFrame({"path": ["ellipse/000000.png"]}).to_parquet(shapes_folder / "m.parquet")
    params = configure(tmp_path, [{"kind": "manifest", "path": "shapes/m.parquet"}])
    with pytest.raises(SourceError, match=r"m\.parquet: manifest needs columns.*missing label"):
        run_ingest(params.ingest)


def test_empty_source_and_single_class_stop_the_run(tmp_path, shapes_folder):
    (tmp_path / "empty").mkdir()
    params = configure(tmp_path, [{"kind": "image_folder", "path": "empty"}])
    with pytest.raises(SourceError, match="has no readable files"):
        run_ingest(params.ingest)
    assert not params.ingest.output.exists()  # nothing half-written

    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    (one / "cat" / "a.png").write_bytes((shapes_folder / "ellipse" / "000000.png").read_bytes())
    params = configure(tmp_path, [{"kind": "image_folder", "path": "one"}])
    with pytest.raises(SourceError, match="one class only"):
        run_ingest(params.ingest)


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's raw IDX format: zero, dtype code 0x08 (uint8), rank, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    path.write_bytes(header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_torchvision_mnist_from_a_local_root(tmp_path):
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 3).astype(np.uint8))
    params = configure(
        tmp_path, [{"kind": "torchvision", "dataset": "MNIST", "root": "tv", "limit": 10}]
    )
    result = run_ingest(params.ingest)
    assert result["ingested"] == 10
    rows = read_columns(params.ingest.output, ["label", "path"]).to_pandas()
    assert set(rows.label) == {"0 - zero", "1 - one", "2 - two"}
    assert rows.path[0] == "torchvision://MNIST/train/0"


def test_torchvision_missing_dataset_says_how_to_fix(tmp_path):
    (tmp_path / "tv").mkdir()
    params = configure(tmp_path, [{"kind": "torchvision", "dataset": "MNIST", "root": "tv"}])
    with pytest.raises(SourceError, match="MNIST not found under .*download: true"):
        run_ingest(params.ingest)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    params = configure(
        root,
        [{"kind": "demo"}],
        image_size=8,
        channels=1,
        labels=[str(d) for d in range(10)],
        label_map={"seven": "7"},
        min_class_count=20,
    )
    run_ingest(params.ingest)
    return params, run_clean(params.clean)


def test_demo_fires_every_cleaning_rule(demo_run):
    params, report = demo_run
    assert set(report["quarantined"]) == {
        "zero_byte",
        "not_an_image",
        "truncated",
        "too_many_pixels",
        "label_not_allowed",
        "blank",
        "exact_duplicate",
        "conflicting_labels",
        "near_duplicate",
    }
    assert report["converted"] == {"resized": 1, "channels_converted": 1}
    assert report["expectations"]["success"] is True
    assert (params.clean.data_docs / "index.html").is_file()


def test_ingested_equals_kept_plus_quarantined(demo_run):
    params, report = demo_run
    assert report["ingested"] == report["kept"] + sum(report["quarantined"].values())
    kept = sum(len(read_columns(params.clean.output / s, ["id"])) for s in ("train", "val", "test"))
    q = quarantine(params.clean.quarantine)
    assert kept == report["kept"] and len(q) == report["quarantined_total"]
    ingested = read_columns(params.ingest.output, ["id"]).column("id").to_pylist()
    assert len(ingested) == report["ingested"]
    clean_ids = read_columns(params.clean.output / "train", ["id"]).column("id").to_pylist()
    assert set(clean_ids) <= set(ingested)
    assert q.reason.notna().all() and q.path.notna().all()


def test_clean_rows_follow_the_data_format(demo_run):
    params, report = demo_run
    table = read_columns(params.clean.output / "val", ["id", "split", "height", "channels"])
    frame = table.to_pandas()
    assert (frame.split == "val").all() and (frame.height == 8).all()
    assert frame.id.is_unique
    assert report["per_split"]["val"] == len(frame)
    assert sum(c["total"] for c in report["per_class"].values()) == report["kept"]


def test_a_crash_mid_stage_leaves_the_previous_version(demo_run, monkeypatch):
    params, _ = demo_run
    before = tree_digest(params.clean.output)
    calls = {"n": 0}
    real = clean_module.convert_image  # pass 1 calls it from tasks.clean.decode

    def flaky(data, cfg):
        calls["n"] += 1
        if calls["n"] == 500:
            raise KeyboardInterrupt  # as if killed part-way
        return real(data, cfg)

    monkeypatch.setattr(clean_module.decode, "convert_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_clean(params.clean)
    assert tree_digest(params.clean.output) == before
    leftovers = [p.name for p in params.clean.output.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_a_failed_critical_expectation_fails_the_stage_and_keeps_old_data(demo_run):
    from tasks.shared.expectations import CriticalExpectationFailed

    params, _ = demo_run
    before = tree_digest(params.clean.output)
    strict = params.clean.model_copy(update={"min_class_count": 10_000})
    with pytest.raises(CriticalExpectationFailed, match="count"):
        run_clean(strict)
    assert tree_digest(params.clean.output) == before


def test_labels_that_allow_nothing_say_so_and_keep_the_old_data(demo_run):
    from synthloop.config import ConfigError

    params, _ = demo_run
    before = tree_digest(params.clean.output)
    none_allowed = params.clean.model_copy(update={"labels": ["cat", "dog"], "label_map": {}})
    with pytest.raises(ConfigError) as err:
        run_clean(none_allowed)
    message = str(err.value)
    assert "no ingested label is in clean.labels (cat, dog)" in message, message
    rows = quarantine(params.clean.quarantine)
    assert f"{len(rows)} rows quarantined as label_not_allowed" in message
    assert set(rows.reason) == {"label_not_allowed"}
    assert "The data's labels: 0, 1, 2" in message and "count" not in message
    assert tree_digest(params.clean.output) == before


def test_the_demo_is_long_tailed_as_documented(demo_run):
    from tasks.ingest.demo import digit_images, long_tail

    demo_params, report = demo_run
    totals = {label: c["total"] for label, c in report["per_class"].items()}
    for label in ("3", "5", "8"):  # 51 kept; a defect may take one away
        assert totals[label] in (50, 51), totals
    assert min(v for k, v in totals.items() if k not in ("3", "5", "8")) >= 170
    # The default params give a short class 31 train (its 0.6 share), 5 val and 15 test images.
    params = load_params(REPO / "params.yaml")
    (source,) = params.ingest.sources
    _, targets = digit_images()
    kept = long_tail(targets, source.short_classes, source.short_keep, source.seed)
    per_digit = np.bincount(targets[kept], minlength=10)
    assert [per_digit[d] for d in (3, 5, 8)] == [51, 51, 51]
    assert all(per_digit[d] == (targets == d).sum() for d in (0, 1, 2, 4, 6, 7, 9))
    n_val, n_test = params.clean.split.counts(source.short_keep)
    assert (source.short_keep - n_val - n_test, n_val, n_test) == (31, 5, 15)
    assert params.clean.split.counts(180) == (18, 36)  # a rich class: the fractions
    # The report gives each class its split and the points one test image is worth.
    for label, c in report["per_class"].items():
        assert c["train"] + c["val"] + c["test"] == c["total"], label
        assert c["train"] >= demo_params.clean.split.train_floor(c["total"]), (label, c)
        assert c["points_per_test_image"] == round(100 / c["test"], 2), (label, c)


def test_the_kept_rows_are_validated_in_frames_grouped_by_id(demo_run, tmp_path, monkeypatch):
    from tasks.clean import report as clean_report

    params, report = demo_run
    monkeypatch.setattr(clean_report, "EXPECTATION_ROWS", 64)
    spill = tmp_path / "spill"
    frames = list(clean_report.kept_batches(params.clean.output, spill))
    assert not spill.exists()
    assert len(frames) == -(-report["kept"] // 64)  # every frame has rows at this size
    ids = [i for f in frames for i in f["id"]]
    assert sorted(ids) == sorted(
        i
        for s in ("train", "val", "test")
        for i in read_columns(params.clean.output / s, ["id"]).column("id").to_pylist()
    )
    assert max(len(f) for f in frames) < 2 * 64
    # a copy of an id in another split's file lands in the same frame as the id
    copy = tmp_path / "copy"
    shutil.copytree(params.clean.output, copy)
    first = pq.read_table(shard_paths(copy / "train")[0]).slice(0, 1)
    pq.write_table(first, copy / "test" / "part-99999.parquet")
    twice = first["id"][0].as_py()
    holding = [f for f in clean_report.kept_batches(copy, spill) if twice in set(f["id"])]
    assert len(holding) == 1 and (holding[0]["id"] == twice).sum() == 2
    # the stage validates that way with the same result as in one frame
    again = run_clean(params.clean)
    assert again["expectations"]["evaluated"] == report["expectations"]["evaluated"]
    assert again["expectations"]["success"] is True
    assert {k: v for k, v in again.items() if k != "expectations"} == {
        k: v for k, v in report.items() if k != "expectations"
    }


def test_a_planned_shard_keeps_its_files_compactly_and_reads_the_same_paths(tmp_path):
    from synthloop.procedural import make_image_folder
    from tasks.ingest.sources import FileRef, Rejected
    from tasks.ingest.stage import FileRun, compact, list_entries, plan_ingest

    make_image_folder(tmp_path / "raw", classes=3, per_class=7, size=8, seed=0)
    (tmp_path / "raw" / "stray.png").write_bytes(b"x")  # rejected: no class folder
    params = parse_params(small_params(str(tmp_path / "raw")), root=tmp_path / "run")
    entries = list(list_entries(params.ingest))
    kept = compact(entries)
    # one run per class folder, the rejected entry as it was
    assert sorted(type(e).__name__ for _, e in kept) == ["FileRun"] * 3 + ["Rejected"]

    def expand(work):
        for index, entry in work:
            if isinstance(entry, FileRun):
                yield from ((index, ref) for ref in entry.refs())
            else:
                yield index, entry

    assert list(expand(kept)) == entries
    # a run breaks where the source, the folder or the label changes
    mixed = [(0, FileRef("/a/1.png", "x")), (0, FileRef("/a/2.png", "y")),
             (1, FileRef("/a/3.png", "y")), (1, FileRef("/b/4.png", "y")),
             (1, Rejected("/b/5", "y", "r", "d")), (1, FileRef("/b/6.png", "y"))]  # fmt: skip
    assert list(expand(compact(mixed))) == mixed
    assert len(compact(mixed)) == len(mixed)
    # the plan: every listed entry in exactly one shard, in order
    plan = plan_ingest(params.ingest.model_copy(update={"shard_rows": 5}))
    assert [e for shard in plan for e in expand(shard.work)] == entries


def test_the_demo_takes_any_digits_as_short_classes_seven_included():
    """The defects pick a kept 7 for the label-map case: with 7 short, fewer than 50 remain."""
    from synthloop.config import DemoSource
    from tasks.ingest.demo import read_demo

    items = list(read_demo(DemoSource(kind="demo", short_classes=["7", "3"], short_keep=20)))
    digits = [i for i in items if i.path.startswith("demo://digits/")]
    assert sum(i.label == "7" for i in digits) == 20 and sum(i.label == "3" for i in digits) == 20
    (seven,) = [i for i in items if i.path.startswith("demo://fixable/label_seven/")]
    assert seven.path.rsplit("/", 1)[1] in {i.path.rsplit("/", 1)[1] for i in digits}
