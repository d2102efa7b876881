"""Tests for tasks.shared.expectations: real GX Core 1.x validations and Data Docs on small
frames."""

import json
import os

import pandas as pd
import pytest

from tasks.shared.expectations import (
    CleanExpectations,
    CriticalExpectationFailed,
    raise_on_critical,
    validate_clean_dataset,
)

os.environ["DO_NOT_TRACK"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "false"

LABELS = ["cat", "dog", "bird", "fish"]
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


def make_rows(n: int = 200) -> pd.DataFrame:
    """n rows, labels cycling evenly over LABELS, splits exactly 80/10/10."""
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
    return pd.DataFrame(
        {
            "id": [f"img{i:05d}" for i in range(n)],
            "label": [LABELS[i % len(LABELS)] for i in range(n)],
            "split": split,
            "source": ["raw"] * n,
            "parent_id": [None] * n,
            "height": [32] * n,
            "width": [32] * n,
            "channels": [3] * n,
        }
    )


def run(rows: pd.DataFrame, docs_dir, **overrides) -> dict:
    kwargs = dict(
        known_labels=LABELS,
        height=32,
        width=32,
        channels=3,
        split_fractions=SPLITS,
        split_tolerance=0.05,
        min_class_count=10,
    )
    kwargs.update(overrides)
    result = validate_clean_dataset(rows, CleanExpectations(**kwargs), docs_dir)
    json.dumps(result, allow_nan=False)  # must be strict-JSON serialisable
    return result


def failed_types(result: dict) -> set[tuple[str, str | None, bool]]:
    return {(f["expectation"], f["kwargs"].get("column"), f["critical"]) for f in result["failed"]}


def test_valid_frame_passes_and_builds_data_docs(tmp_path):
    docs = tmp_path / "docs"
    result = run(make_rows(), docs)
    assert result["success"] is True
    assert result["failed"] == []
    assert result["evaluated"] >= 12
    assert result["data_docs"] == str(docs / "index.html")
    index = docs / "index.html"
    assert index.is_file()
    assert "clean_dataset_rows" in index.read_text()
    raise_on_critical(result)  # nothing to raise

    # A second call in the same process replaces the site in place, leaving no temp dirs.
    again = run(make_rows(), docs)
    assert again["success"] is True
    assert index.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_duplicate_id_fails_critically(tmp_path):
    rows = make_rows()
    rows.loc[1, "id"] = rows.loc[0, "id"]
    result = run(rows, tmp_path / "docs")
    assert result["success"] is False
    assert ("expect_column_values_to_be_unique", "id", True) in failed_types(result)
    with pytest.raises(CriticalExpectationFailed) as err:
        raise_on_critical(result)
    message = str(err.value)
    assert "unique" in message
    assert "id" in message
    assert rows.loc[0, "id"] in message


def test_unknown_label_fails_critically(tmp_path):
    rows = make_rows()
    rows.loc[3, "label"] = "zebra"
    result = run(rows, tmp_path / "docs")
    assert result["success"] is False
    assert ("expect_column_values_to_be_in_set", "label", True) in failed_types(result)
    with pytest.raises(CriticalExpectationFailed, match="zebra"):
        raise_on_critical(result)


def test_null_label_fails_critically(tmp_path):
    rows = make_rows()
    rows.loc[3, "label"] = None
    result = run(rows, tmp_path / "docs")
    assert ("expect_column_values_to_not_be_null", "label", True) in failed_types(result)
    with pytest.raises(CriticalExpectationFailed):
        raise_on_critical(result)


def test_wrong_channels_fails_critically(tmp_path):
    rows = make_rows()
    rows.loc[7, "channels"] = 1
    result = run(rows, tmp_path / "docs")
    assert result["success"] is False
    assert failed_types(result) == {("expect_column_values_to_be_in_set", "channels", True)}
    with pytest.raises(CriticalExpectationFailed, match="channels"):
        raise_on_critical(result)


def test_schema_mismatch_fails_critically(tmp_path):
    rows = make_rows().drop(columns=["source"]).assign(extra=1)
    result = run(rows, tmp_path / "docs")
    assert ("expect_table_columns_to_match_set", None, True) in failed_types(result)
    with pytest.raises(CriticalExpectationFailed, match="expect_table_columns_to_match_set"):
        raise_on_critical(result)


def test_split_fraction_off_is_only_a_warning(tmp_path):
    rows = make_rows()
    rows.loc[rows["split"] == "val", "split"] = "train"  # train 0.9, val 0.0: both off by > 0.05
    result = run(rows, tmp_path / "docs")
    assert result["success"] is False
    assert failed_types(result) == {("expect_column_values_to_be_between", "abs_error", False)}
    observed = result["failed"][0]["observed"]
    assert observed["unexpected_count"] == 2
    assert {r["split"] for r in observed["partial_unexpected_index_list"]} == {"train", "val"}
    raise_on_critical(result)  # non-critical failures do not raise
    assert (tmp_path / "docs" / "index.html").is_file()


def test_class_below_min_count_fails_critically(tmp_path):
    rows = make_rows()
    birds = rows.index[rows["label"] == "bird"]
    rows.loc[birds[5:], "label"] = "cat"  # bird keeps 5 rows < min_class_count 10
    result = run(rows, tmp_path / "docs")
    assert result["success"] is False
    assert failed_types(result) == {("expect_column_values_to_be_between", "count", True)}
    with pytest.raises(CriticalExpectationFailed, match="bird"):
        raise_on_critical(result)


def test_known_label_with_no_rows_counts_as_zero(tmp_path):
    result = run(make_rows(), tmp_path / "docs", known_labels=[*LABELS, "owl"])
    assert failed_types(result) == {("expect_column_values_to_be_between", "count", True)}
    [item] = result["failed"][0]["observed"]["partial_unexpected_index_list"]
    assert item["label"] == "owl"
    with pytest.raises(CriticalExpectationFailed, match="owl"):
        raise_on_critical(result)


def test_a_stream_of_frames_is_one_suite_with_the_whole_tables_result(tmp_path):
    rows = make_rows(200)
    rows.loc[11, "id"] = rows.loc[10, "id"]  # a duplicate within one frame below
    rows.loc[[30, 170], "height"] = 16  # a wrong height in two frames
    # min_class_count 40: each frame holds 12-13 of a class, the whole table 50
    whole = run(rows, tmp_path / "whole", min_class_count=40)
    frames = [rows.iloc[i : i + 50] for i in range(0, 200, 50)]
    batched = run(iter(frames), tmp_path / "batched", min_class_count=40)
    assert batched["evaluated"] == whole["evaluated"]
    assert batched["failed"] == whole["failed"]
    observed = {f["kwargs"]["column"]: f["observed"] for f in batched["failed"]}
    assert set(observed) == {"id", "height"}
    assert observed["height"]["element_count"] == 200
    assert observed["height"]["unexpected_count"] == 2
    assert observed["height"]["partial_unexpected_list"] == [16, 16]
    assert observed["id"]["unexpected_count"] == 2
    # the class counts are the whole stream's: one frame alone has too few of each class
    short = run(iter(frames[:1]), tmp_path / "short", min_class_count=40)
    assert ("expect_column_values_to_be_between", "count", True) in failed_types(short)
    assert "batch-4" in "".join(p.name for p in (tmp_path / "batched").rglob("*"))
