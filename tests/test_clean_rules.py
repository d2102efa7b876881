"""Every cleaning rule on crafted bad files, and the whole-dataset rules on small arrays."""

import io
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthloop.config import CleanConfig, SplitConfig
from tasks.clean import (
    Converted,
    Rejection,
    assign_splits,
    convert_image,
    is_blank,
    map_label,
    pixel_hash,
    resolve_duplicates,
)
from tasks.clean.candidates import near_duplicate_pairs
from tasks.clean.image_numbers import dhash, row_width, thumbnail

CFG = CleanConfig(
    image_size=8, channels=1, max_pixels=10_000, labels=["a", "b"], label_map={"A": "a"}
)


def png(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(shape=(8, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def reason(result) -> str:
    assert isinstance(result, Rejection), result
    return result.reason


def test_zero_byte():
    assert reason(convert_image(b"", CFG)) == "zero_byte"


def test_not_an_image():
    assert reason(convert_image(b"id,label\n1,cat\n", CFG)) == "not_an_image"


def test_truncated_png():
    data = png(noise((64, 64)))
    result = convert_image(data[: len(data) // 2], CFG)
    assert reason(result) == "truncated"
    assert "truncated" in result.detail.lower() or "error" in result.detail.lower()


def test_decompression_bomb_is_rejected_from_the_header_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (200, 200)).save(buf, format="PNG")  # 40,000 px > max_pixels=10,000
    result = convert_image(buf.getvalue(), CFG)
    assert reason(result) == "too_many_pixels"
    assert "200x200" in result.detail and "max_pixels" in result.detail


def test_valid_png_at_target_size_keeps_its_bytes():
    data = png(noise())
    result = convert_image(data, CFG)
    assert isinstance(result, Converted)
    assert result.png == data and not result.resized and not result.mode_changed


def test_odd_size_and_mode_are_converted():
    rgb = noise((20, 12, 3))
    result = convert_image(png(rgb, "JPEG"), CFG)
    assert isinstance(result, Converted)
    assert result.resized and result.mode_changed
    assert result.pixels.shape == (8, 8)
    decoded = Image.open(io.BytesIO(result.png))
    assert decoded.format == "PNG" and decoded.size == (8, 8) and decoded.mode == "L"


def test_label_map_then_allow_list():
    assert map_label("A", CFG) == "a"
    assert map_label("b", CFG) == "b"
    assert reason(map_label("c", CFG)) == "label_not_allowed"
    assert map_label("anything", CleanConfig()) == "anything"  # no allow-list


def test_blank_and_near_constant():
    assert is_blank(np.full((8, 8), 200, np.uint8), CFG)
    almost = np.full((8, 8), 200, np.uint8)
    almost[0, 0] = 203
    assert is_blank(almost, CFG)
    assert not is_blank(noise(), CFG)


def test_pixel_hash_sees_pixels_not_bytes():
    pixels = noise()
    a = convert_image(png(pixels, compress_level=0), CFG)
    b = convert_image(png(pixels, compress_level=9), CFG)
    assert a.png != b.png
    assert pixel_hash(a.pixels) == pixel_hash(b.pixels)
    assert pixel_hash(pixels) != pixel_hash(noise(seed=1))


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, size=40, dtype=np.int64).astype(np.uint64)
    # Plant close relatives: flip 1..5 random bits of some hashes.
    relatives = []
    for k, h in enumerate(base[:20]):
        bits = rng.choice(64, size=1 + k % 5, replace=False)
        relatives.append(h ^ np.uint64(sum(1 << int(b) for b in bits)))
    hashes = np.concatenate([base, np.array(relatives, dtype=np.uint64)])
    for distance in (0, 2, 4):
        expected = {
            (i, j)
            for i, j in combinations(range(len(hashes)), 2)
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= distance
        }
        got = {tuple(p) for p in near_duplicate_pairs(hashes, distance).tolist()}
        assert got == expected, distance
        if distance:
            assert expected  # the planted relatives are found


def resolve(ids, labels, images, names=None):
    """resolve_duplicates on these images; `ids` may be an array (of ranks, say) as it is."""
    pixels = [np.asarray(i) for i in images]
    return resolve_duplicates(
        ids if isinstance(ids, np.ndarray) else np.array(ids, dtype=object),
        np.array(labels, dtype=object),
        np.array([pixel_hash(p) for p in pixels], dtype=np.uint64),
        np.array([dhash(p) for p in pixels], dtype=np.uint64),
        np.stack([thumbnail(p, 8) for p in pixels]),
        max_distance=4,
        max_difference=CFG.near_duplicate_difference,
        max_contrast=CFG.near_duplicate_contrast,
        max_local=CFG.near_duplicate_local,
        names=names,
    )


def test_exact_duplicate_keeps_the_smallest_id_whatever_the_order():
    img = noise()
    keep, why = resolve(["f2", "a1", "c3"], ["x", "x", "x"], [img, img, noise(seed=5)])
    assert keep.tolist() == [False, True, True]
    assert why[0].reason == "exact_duplicate" and "a1" in why[0].detail


def test_same_pixels_under_two_labels_quarantines_every_copy():
    img = noise()
    keep, why = resolve(["a", "b", "c"], ["cat", "dog", "cat"], [img, img, img])
    assert not keep.any()
    assert {w.reason for w in why} == {"conflicting_labels"}
    assert "cat, dog" in why[0].detail


def test_near_duplicate_is_dropped_and_a_different_image_is_kept():
    img = noise()
    nudged = img.copy()
    nudged[3, 3] = max(0, int(nudged[3, 3]) - 4)
    keep, why = resolve(["a", "b", "c"], ["x", "x", "x"], [img, nudged, noise(seed=9)])
    assert keep.tolist() == [True, False, True]
    assert why[1].reason == "near_duplicate"


def test_shared_dhash_alone_is_not_a_near_duplicate():
    # Same gradient signs (identical dHash), clearly different brightness.
    ramp = np.tile(np.arange(0, 80, 10, dtype=np.uint8), (8, 1))
    keep, _ = resolve(["a", "b"], ["x", "x"], [ramp, ramp * 3])
    assert dhash(ramp) == dhash(ramp * 3)
    assert keep.all()


def test_split_is_stratified_deterministic_and_independent_of_order():
    ids = np.array([f"id{i:03d}" for i in range(200)], dtype=object)
    labels = np.array(["a"] * 100 + ["b"] * 100, dtype=object)
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    split = SplitConfig(**fractions)
    splits = assign_splits(ids, labels, split, seed=0)
    for label in ("a", "b"):
        counts = {s: int(((labels == label) & (splits == s)).sum()) for s in fractions}
        assert counts == {"train": 80, "val": 10, "test": 10}
    order = np.random.default_rng(0).permutation(200)
    shuffled = assign_splits(ids[order], labels[order], split, seed=0)
    assert dict(zip(ids[order], shuffled, strict=True)) == dict(zip(ids, splits, strict=True))
    assert (assign_splits(ids, labels, split, seed=1) != splits).any()


@pytest.mark.parametrize("channels", [1, 3])
def test_thumbnail_is_grey_bytes_plus_colour_planes_for_rgb(channels):
    shape = (32, 24) if channels == 1 else (32, 24, 3)
    colour = 0 if channels == 1 else 1
    assert thumbnail(noise(shape), 8).shape == (64 + colour * 2 * 2 * 2,)
    assert thumbnail(noise(shape), 16).shape == (256 + colour * 2 * 4 * 4,)
    assert row_width(16, channels) == 256 + colour * 2 * 4 * 4


def test_a_short_class_keeps_its_training_share_before_the_test_minimum():
    ids = np.array([f"id{i:03d}" for i in range(231)], dtype=object)
    labels = np.array(["rich"] * 180 + ["short"] * 51, dtype=object)
    split = SplitConfig(train=0.7, val=0.1, test=0.2, train_min_share=0.6, test_min_per_class=36)
    splits = assign_splits(ids, labels, split, seed=0)
    count = {
        (label, s): int(((labels == label) & (splits == s)).sum())
        for label in ("rich", "short")
        for s in ("train", "val", "test")
    }
    assert (count["rich", "test"], count["rich", "val"], count["rich", "train"]) == (36, 18, 126)
    # ceil(0.6 * 51) = 31 to train, 5 val, and the test minimum gets the 15 left
    assert (count["short", "test"], count["short", "val"], count["short", "train"]) == (15, 5, 31)
    # A class too small for the minimum keeps its share (6 of 10) to train on.
    assert SplitConfig(test_min_per_class=36).counts(10) == (1, 3)
    # Without a share, the minimum leaves 2 rows to train on, as it always did.
    assert SplitConfig(train_min_share=0, test_min_per_class=36).counts(10) == (1, 7)


def test_row_file_reads_back_the_rows_asked_for(tmp_path):
    from tasks.clean.merge import RowFile

    rows = np.random.default_rng(0).integers(0, 256, (1000, 5), dtype=np.uint8)
    with RowFile(5) as row_file:
        row_file.open(tmp_path / "rows.u8")
        row_file.write(rows[:400])
        row_file.write(rows[400:])
        reader = row_file.read()
        assert reader.shape == (1000, 5)
        # Unsorted, repeated, runs and gaps, empty, two-dimensional: as numpy indexes.
        for index in ([3, 2, 2, 999, 0, 1, 500], [], list(range(1000)), [[1, 2], [3, 999]]):
            index = np.array(index, dtype=np.int64)
            np.testing.assert_array_equal(reader[index], rows[index])


def test_resolve_duplicates_on_id_ranks_decides_and_names_as_on_the_ids():
    # The merge passes the ids' ranks and reads back only the ids the details name.
    from tasks.clean.merge import id_ranks

    img, other = noise(), noise(seed=9)
    nudged = img.copy()
    nudged[3, 3] = max(0, int(nudged[3, 3]) - 4)
    ids = ["é9", "b2", "d5", "B3", "z0", "c4"]  # code point order: B3 < b2 < c4 < d5 < z0 < é9
    labels = ["x", "x", "x", "x", "x", "y"]
    images = [img, img, nudged, other, noise(seed=4), noise(seed=4)]
    on_ids = resolve(ids, labels, images)
    ranks = id_ranks([pa.chunked_array([ids[:2], ids[2:]])])
    asked = []

    def names(rows):
        asked.extend(rows.tolist())
        return [ids[r] for r in rows.tolist()]

    on_ranks = resolve(ranks, labels, images, names=names)
    assert on_ranks[0].tolist() == on_ids[0].tolist() == [False, True, False, True, False, False]
    assert on_ranks[1] == on_ids[1]
    assert [w.reason if w else None for w in on_ids[1]] == [
        "exact_duplicate",
        None,
        "near_duplicate",
        None,
        "conflicting_labels",
        "conflicting_labels",
    ]
    assert "b2" in on_ranks[1][0].detail and "b2" in on_ranks[1][2].detail
    assert asked == [1]  # only the keeper both details name, once


def test_id_ranks_share_equal_ids_and_order_as_sorted():
    from tasks.clean.merge import id_ranks

    parts = [["b", "a", "é", "b"], [], ["z", "A", "a", "aa"]]
    ranks = id_ranks([pa.chunked_array([p], type=pa.string()) for p in parts])
    ids = [i for p in parts for i in p]
    assert ranks.dtype == np.int64
    for (i, x), (j, y) in combinations(enumerate(ids), 2):
        assert (ranks[i] < ranks[j]) == (x < y) and (ranks[i] == ranks[j]) == (x == y)
    assert id_ranks([]).shape == (0,)


def test_read_ids_reads_back_the_ids_at_pass1_positions(tmp_path):
    from tasks.clean.merge import read_ids

    files = []
    for k, ids in enumerate((["p", "q", "r"], [], ["s"], ["t", "u"])):
        path = tmp_path / f"part-{k}.parquet"
        pq.write_table(pa.table({"id": pa.array(ids, type=pa.string())}), path)
        files.append((path, len(ids)))
    assert read_ids(files, np.array([5, 0, 3, 2, 4, 0])) == ["u", "p", "s", "r", "t", "p"]
    assert read_ids(files, np.array([], dtype=np.int64)) == []


def test_the_quarantine_is_streamed_to_its_file_and_replaces_it_only_on_commit(
    tmp_path, monkeypatch
):
    import hashlib

    from synthloop.dataset import QUARANTINE_SCHEMA, write_table
    from tasks.clean import quarantine as q

    def row(i: int, reason: str) -> dict:
        label = f"x{i % 3}"
        return {"id": str(i), "source": "s", "path": f"/p/{i}", "label": label,
                "reason": reason, "detail": None}  # fmt: skip

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    rows = [row(i, "label_not_allowed" if i % 2 else "blank") for i in range(10)]
    target = tmp_path / "quarantine.parquet"
    with q.QuarantineSink(target) as sink:
        sink.add(rows[:4])
        sink.add(rows[4:])
        sink.commit()
    write_table(tmp_path / "whole.parquet", rows, QUARANTINE_SCHEMA)
    assert digest(target) == digest(tmp_path / "whole.parquet")  # the same bytes
    assert sink.reasons == {"label_not_allowed": 5, "blank": 5} and sink.total == 10
    assert sink.not_allowed_labels == {"x0", "x1", "x2"}

    # more rows than it holds: row groups as it goes, every row once, in order
    monkeypatch.setattr(q, "QUARANTINE_ROWS", 3)
    with q.QuarantineSink(target) as sink:
        for r in rows:
            sink.add([r])
        assert sink._rows == [rows[9]]  # 9 written already
        sink.commit()
    assert pq.read_table(target).column("id").to_pylist() == [r["id"] for r in rows]
    assert pq.ParquetFile(target).metadata.num_row_groups == 4

    # a failure before the commit leaves the previous file and no temporary
    before = digest(target)
    with pytest.raises(RuntimeError), q.QuarantineSink(target) as sink:
        sink.add(rows)
        raise RuntimeError("merge failed")
    assert digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quarantine.parquet", "whole.parquet"]
