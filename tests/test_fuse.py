"""The fuse stage on real Parquet files: caps (the synthetic rows' pool target, the
augmented rows' share), feedback, duplicates, missing inputs, sizes."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from synthloop.config import FuseConfig, LoopConfig
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter, content_id
from tasks.fuse.stage import run_fuse, share_caps
from tasks.shared.images import encode_rows
from tasks.shared.pool import pool_targets

UNBOUNDED = LoopConfig(target_per_class=None)  # no per-class synthetic target

_counter = itertools.count()


def png(size: int = 8, channels: int = 1) -> bytes:
    """A PNG no other call returns (its first pixels spell a counter)."""
    pixels = torch.zeros(channels, size, size, dtype=torch.uint8)
    value = next(_counter)
    pixels[0, 0, 0], pixels[0, 0, 1], pixels[0, 0, 2] = value % 256, value // 256 % 256, 7
    return encode_rows(pixels[None])[0]


def write(
    directory: Path,
    rows: list[tuple[str, str | None]],
    source: str,
    size: int = 8,
    channels: int = 1,
) -> list[str]:
    """(label, parent_id) per row; returns the ids."""
    ids = []
    with ShardWriter(directory, IMAGE_SCHEMA, shard_rows=5) as out:
        for label, parent in rows:
            data = png(size, channels)
            ids.append(content_id(data))
            out.append(
                {
                    "id": ids[-1],
                    "label": label,
                    "split": "train",
                    "source": source,
                    "parent_id": parent,
                    "image": data,
                    "height": size,
                    "width": size,
                    "channels": channels,
                }
            )
    return ids


def config(tmp_path: Path, **kw) -> FuseConfig:
    return FuseConfig(
        clean=tmp_path / "clean",
        augmented=tmp_path / "augmented",
        pool=tmp_path / "pool",
        feedback=tmp_path / "feedback",
        output=tmp_path / "fused",
        report=tmp_path / "fusion.json",
        shard_rows=16,
        **kw,
    )


def fused(cfg: FuseConfig) -> pd.DataFrame:
    return pd.read_parquet(cfg.output)


def assert_share_bounds(rows: pd.DataFrame, shares: dict[str, float]) -> None:
    for label, group in rows.groupby("label"):
        for source, share in shares.items():
            kept = int((group.source == source).sum())
            assert kept <= Fraction(str(share)) * len(group), (label, source, kept, len(group))


# --- the cap rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shares", [{"augmented": 0.3, "synthetic": 0.2}, {"augmented": 0.5, "synthetic": 0.5}]
)
def test_share_caps_are_the_largest_feasible_counts(shares):
    ratio = {s: Fraction(str(v)) for s, v in shares.items()}
    for real, aug, syn in itertools.product(range(6), range(9), range(9)):
        caps = share_caps(real, {"augmented": aug, "synthetic": syn}, shares)

        def feasible(a: int, s: int, real: int = real) -> bool:
            total = real + a + s
            return a <= ratio["augmented"] * total and s <= ratio["synthetic"] * total

        assert feasible(caps["augmented"], caps["synthetic"])
        for a, s in itertools.product(range(aug + 1), range(syn + 1)):
            if feasible(a, s):  # every feasible choice is dominated by the caps
                assert a <= caps["augmented"] and s <= caps["synthetic"]


def test_share_caps_closed_form_and_uncapped_sources():
    both = {"augmented": 99, "synthetic": 99}
    # both binding, shares summing below 1: k_s = share_s * R / (1 - sum of shares)
    assert share_caps(10, both, {"augmented": 0.3, "synthetic": 0.2}) == {
        "augmented": 6,
        "synthetic": 4,
    }
    # an uncapped source counts towards the class total but is never cut
    assert share_caps(10, {"augmented": 99, "synthetic": 3}, {"augmented": 0.5}) == {
        "augmented": 13,
        "synthetic": 3,
    }
    # no real rows and shares below 1 in sum: nothing capped fits
    assert share_caps(0, both, {"augmented": 0.4, "synthetic": 0.4}) == {
        "augmented": 0,
        "synthetic": 0,
    }


# --- the stage ------------------------------------------------------------------------------


def test_composition_respects_share_bounds_per_class(tmp_path):
    real = write(tmp_path / "clean", [("a", None)] * 10 + [("b", None)] * 4, "demo0")
    write(tmp_path / "augmented", [("a", real[0])] * 20 + [("b", real[10])] * 20, "augmented")
    write(tmp_path / "pool", [("a", None)] * 30 + [("b", None)] * 30 + [("c", None)] * 4, "gen")
    shares = {"augmented": 0.3}
    cfg = config(tmp_path, max_share=shares)
    auto = LoopConfig(target_per_class="auto")  # synthetic_multiple 1
    report = run_fuse(cfg, auto)

    rows = fused(cfg)
    assert_share_bounds(rows, shares)
    assert rows.id.is_unique and (rows.split == "train").all()
    assert set(rows.source) == {"demo0", "augmented", "synthetic"}
    pc = report["per_class"]
    # a is the largest class: no synthetic rows (target 0); augmented 3/7 * 10 -> 4
    assert pc["a"] | {"dropped_by_cap": None} == {
        "real": 10,
        "augmented": 4,
        "synthetic": 0,
        "total": 14,
        "synthetic_target": 0,
        "dropped_by_cap": None,
    }
    assert pc["a"]["dropped_by_cap"] == {"augmented": 16, "synthetic": 30}
    # b: min(1 x 4, 10 - 4) = 4 synthetic rows, uncut by the augmented share, which then
    # allows 3/7 * (4 + 4) -> 3 augmented rows
    assert (pc["b"]["augmented"], pc["b"]["synthetic"], pc["b"]["synthetic_target"]) == (3, 4, 4)
    assert pc["c"]["total"] == 0 and pc["c"]["synthetic_target"] == 0  # no real rows: none
    assert report["total"] == len(rows) == sum(report["per_source"].values())
    assert report["dropped"]["cap"] == {"real": 0, "augmented": 33, "synthetic": 60}
    assert report["synthetic_target"] == {"target_per_class": "auto", "synthetic_multiple": 1.0}

    again = config(tmp_path, max_share=shares).model_copy(update={"output": tmp_path / "again"})
    run_fuse(again, auto)
    assert list(fused(again).id) == list(rows.id)  # the seeded choice is deterministic


def test_the_synthetic_cap_is_the_pool_target(tmp_path):
    """Fuse mixes in at most what the pool keeps of a class: one function sets both."""
    real = write(tmp_path / "clean", [("rich", None)] * 12 + [("short", None)] * 3, "demo0")
    write(tmp_path / "augmented", [("rich", real[0])] * 8 + [("short", real[12])] * 8, "aug")
    write(tmp_path / "pool", [("rich", None)] * 10 + [("short", None)] * 10, "gen")
    train = {"rich": 12, "short": 3}
    for loop in (
        LoopConfig(target_per_class="auto"),  # m = 1: short min(3, 9) = 3, rich 0
        LoopConfig(target_per_class="auto", synthetic_multiple=2.0),  # short min(6, 9) = 6
        LoopConfig(target_per_class="auto", synthetic_multiple=5.0),  # min(15, 9): gap binds
        LoopConfig(synthetic_multiple=0.5),  # proportional: rich 6, short 1, the same multiple
        LoopConfig(target_per_class=2),  # an integer: every class alike
    ):
        report = run_fuse(config(tmp_path), loop)
        targets = pool_targets(train, loop.target_per_class, loop.synthetic_multiple)
        kept = {c: report["per_class"][c]["synthetic"] for c in train}
        assert kept == targets, (loop, kept, targets)
        assert {c: report["per_class"][c]["synthetic_target"] for c in train} == targets
    assert targets == {"rich": 2, "short": 2}
    # no per-class target: every pooled row is mixed in
    report = run_fuse(config(tmp_path), UNBOUNDED)
    assert {c: report["per_class"][c]["synthetic"] for c in train} == {"rich": 10, "short": 10}


def test_a_synthetic_share_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(ValueError, match=r"synthetic: no longer a share.*loop.target_per_class"):
        config(tmp_path, max_share={"augmented": 0.4, "synthetic": 0.3})


def test_default_shares_with_missing_pool_and_feedback(tmp_path):
    real = write(tmp_path / "clean", [("a", None)] * 4 + [("b", None)] * 6, "demo0")
    write(tmp_path / "augmented", [("a", r) for r in real[:4]] * 2, "augmented")
    cfg = config(tmp_path)  # no pool/ and no feedback/ directories at all; default shares
    report = run_fuse(cfg)
    assert report["per_source"] == {"real": 10, "augmented": 2, "synthetic": 0}
    assert report["feedback"]["files"] == [] and report["problems"] == []
    assert_share_bounds(fused(cfg), cfg.max_share)

    (tmp_path / "pool").mkdir()  # a pool without shards is empty too
    (tmp_path / "feedback").mkdir()
    assert run_fuse(cfg)["per_source"] == report["per_source"]


def test_feedback_rejects_rows_and_their_children(tmp_path):
    real = write(tmp_path / "clean", [("a", None)] * 6, "demo0")
    aug = write(tmp_path / "augmented", [("a", real[0]), ("a", real[0]), ("a", real[1])], "aug")
    pool = write(tmp_path / "pool", [("a", None)] * 3, "gen")
    (tmp_path / "feedback").mkdir()
    pd.DataFrame(
        {
            "id": [real[0], "nope", pool[2], real[3], "", real[1]],
            "verdict": ["reject", "reject", "REJECT", "maybe", "", "accept"],
            "label": ["", "", "", "", "a", ""],
            "extra": ["", "", "", "", "20", ""],
        }
    ).to_csv(tmp_path / "feedback" / "review.csv", index=False)
    pd.DataFrame({"id": [aug[2]], "verdict": ["reject"]}).to_parquet(
        tmp_path / "feedback" / "more.parquet"
    )
    (tmp_path / "feedback" / "requests.csv").write_text("label,extra\na,10\n")
    (tmp_path / "feedback" / "README.md").write_text("not a feedback table")
    cfg = config(tmp_path, max_share={"augmented": 0.9})
    report = run_fuse(cfg, UNBOUNDED)

    ids = set(fused(cfg).id)
    assert not ids & {real[0], aug[0], aug[1], pool[2], aug[2]}  # rejected, and its children
    assert {real[1], real[3], pool[0], pool[1]} <= ids  # accepted / bad verdicts apply nothing
    assert report["dropped"]["feedback"] == {"real": 1, "augmented": 3, "synthetic": 1}
    fb = report["feedback"]
    assert fb["files"] == ["more.parquet", "requests.csv", "review.csv"]
    assert fb["removed"] == {"direct": 3, "descendants": 2}
    assert fb["rejected_ids"] == 3 and fb["requests_ignored"] == 2
    assert fb["applied"] == 4 and fb["problems"] == 2
    problems = {(p["file"], p["row"]): p["reason"] for p in report["problems"]}
    assert problems.keys() == {("review.csv", 2), ("review.csv", 4)}
    assert "unknown id" in problems[("review.csv", 2)]
    assert "unknown verdict 'maybe'" in problems[("review.csv", 4)]
    assert json.loads(cfg.report.read_text()) == report


def test_duplicate_ids_keep_the_higher_priority_source(tmp_path):
    real = write(tmp_path / "clean", [("a", None)] * 4, "demo0")
    write(tmp_path / "augmented", [], "augmented")
    pool = write(tmp_path / "pool", [("a", None)], "gen")
    # the pool holds a real row again (and its own row twice)
    clean = pd.read_parquet(tmp_path / "clean")
    extra = pd.read_parquet(tmp_path / "pool")
    pd.concat([extra, clean.iloc[[0]], extra]).to_parquet(
        tmp_path / "pool" / "part-00000.parquet", index=False
    )
    cfg = config(tmp_path)
    report = run_fuse(cfg, UNBOUNDED)
    rows = fused(cfg)
    assert rows.id.is_unique and set(rows.id) == {*real, pool[0]}
    assert rows.set_index("id").loc[real[0], "source"] == "demo0"
    assert report["dropped"]["duplicate_id"] == {"real": 0, "augmented": 0, "synthetic": 2}


def test_image_size_mismatch_names_the_source(tmp_path):
    write(tmp_path / "clean", [("a", None)] * 3, "demo0")
    write(tmp_path / "augmented", [], "augmented")
    write(tmp_path / "pool", [("a", None)], "gen", size=16, channels=3)
    with pytest.raises(ValueError, match=r"synthetic \(.*pool\): 16x16 with 3 channel") as err:
        run_fuse(config(tmp_path))
    assert "8x8 with 1 channel" in str(err.value)
    assert not (tmp_path / "fused").exists()


def test_feedback_without_id_or_verdict_names_the_file(tmp_path):
    write(tmp_path / "clean", [("a", None)] * 3, "demo0")
    write(tmp_path / "augmented", [], "augmented")
    (tmp_path / "feedback").mkdir()
    (tmp_path / "feedback" / "bad.csv").write_text("image_id,decision\nx,reject\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*id and verdict"):
        run_fuse(config(tmp_path))


def test_empty_clean_split_is_an_error(tmp_path):
    write(tmp_path / "clean", [], "demo0")
    write(tmp_path / "augmented", [], "augmented")
    with pytest.raises(ValueError, match="no rows"):
        run_fuse(config(tmp_path))


def test_counts_add_up(tmp_path):
    rng = np.random.default_rng(0)
    labels = [str(x) for x in rng.integers(0, 3, 30)]
    real = write(tmp_path / "clean", [(label, None) for label in labels], "demo0")
    write(tmp_path / "augmented", [(labels[i], real[i]) for i in range(30)] * 2, "augmented")
    write(tmp_path / "pool", [(str(x), None) for x in rng.integers(0, 3, 40)], "gen")
    cfg = config(tmp_path, max_share={"augmented": 0.4})
    report = run_fuse(cfg)
    assert_share_bounds(fused(cfg), cfg.max_share)
    for label, counts in report["per_class"].items():
        assert counts["total"] == counts["real"] + counts["augmented"] + counts["synthetic"]
        assert counts["real"] == labels.count(label)
        assert counts["synthetic"] <= counts["synthetic_target"]
