"""The split leaves every class its training data: `SplitConfig.train_min_share` comes first,
val next, the test minimum only as far as rows are left; and the assignment stays
deterministic (tasks/clean/splits.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from synthloop.config import SplitConfig, load_params
from tasks.clean.splits import assign_splits, split_keys
from tests.conftest import REPO

# params.yaml's split, spelled out so a change there does not silently move these numbers
LONG_TAIL = SplitConfig(train=0.7, val=0.1, test=0.2, train_min_share=0.6, test_min_per_class=36)


def split_of(n: int, split: SplitConfig, seed: int = 0) -> dict[str, int]:
    """train/val/test rows assign_splits gives one class of n rows."""
    ids = np.array([f"img{i:05d}" for i in range(n)], dtype=object)
    splits = assign_splits(ids, np.array(["c"] * n, dtype=object), split, seed)
    return {s: int((splits == s).sum()) for s in ("train", "val", "test")}


def test_params_yaml_split_is_the_one_these_tests_spell_out():
    assert load_params(REPO / "params.yaml").clean.split == LONG_TAIL


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        # the Fashion-MNIST-LT shortest classes and the demo's short classes: the test
        # minimum (36) would leave 2 to train; the share keeps ceil(0.6 n)
        (39, (24, 4, 11)),
        (40, (24, 4, 12)),
        (44, (27, 4, 13)),
        (51, (31, 5, 15)),
        (120, (72, 12, 36)),  # the test minimum honoured, exactly as far as the share allows
        (180, (126, 18, 36)),  # the demo's rich classes: the test minimum, train as before
        (4000, (2800, 400, 800)),  # a large class: the fractions
    ],
)
def test_every_class_keeps_its_training_share(n, expected):
    counts = split_of(n, LONG_TAIL)
    assert (counts["train"], counts["val"], counts["test"]) == expected
    assert counts["train"] >= math.ceil(0.6 * n)
    assert counts["val"] >= 1


def test_the_test_minimum_applies_where_the_share_leaves_room():
    # With no training share the minimum takes all but 2 rows, as it used to.
    no_share = LONG_TAIL.model_copy(update={"train_min_share": 0.0})
    assert split_of(51, no_share) == {"train": 10, "val": 5, "test": 36}
    assert split_of(40, no_share) == {"train": 2, "val": 4, "test": 34}
    # A class big enough for both gets the full minimum beside its share.
    for n in (120, 150, 180):
        counts = split_of(n, LONG_TAIL)
        assert counts["test"] == 36 and counts["train"] >= math.ceil(0.6 * n), (n, counts)
    # Above that the test fraction is larger than the minimum and rules.
    assert split_of(200, LONG_TAIL)["test"] == 40


@pytest.mark.parametrize(
    ("split", "n", "expected"),
    [
        (LONG_TAIL, 1, (1, 0, 0)),
        (LONG_TAIL, 2, (2, 0, 0)),  # two rows to train before any test row
        (LONG_TAIL, 3, (2, 0, 1)),
        (LONG_TAIL, 6, (4, 1, 1)),
        (LONG_TAIL, 10, (6, 1, 3)),
        # a share of 1 still leaves the class the val row its fraction gives
        (LONG_TAIL.model_copy(update={"train_min_share": 1.0}), 10, (9, 1, 0)),
        (LONG_TAIL.model_copy(update={"train_min_share": 1.0}), 4, (4, 0, 0)),
        # 0.7 * 10 is 7.000000000000001 in floats: the share is 7 rows, not 8
        (SplitConfig(train=0.7, val=0.1, test=0.2, train_min_share=0.7), 10, (7, 1, 2)),
    ],
)
def test_tiny_classes(split, n, expected):
    val, test = split.counts(n)
    assert (n - val - test, val, test) == expected


def test_the_counts_hold_their_contract_for_every_size():
    for split in (
        LONG_TAIL,
        SplitConfig(),
        SplitConfig(train=0.5, val=0.25, test=0.25, train_min_share=0.9, test_min_per_class=50),
        SplitConfig(train=0.6, val=0.2, test=0.2, train_min_share=0.0, test_min_per_class=500),
    ):
        for n in range(0, 600):
            val, test = split.counts(n)
            train = n - val - test
            assert min(train, val, test) >= 0, (split, n)
            # the share (and 2 rows), less only the one val row the fractions give
            v = 1 if round(n * split.val) >= 1 else 0
            share = max(2, math.ceil(split.train_min_share * n - 1e-9))
            assert train >= split.train_floor(n) == min(n - v, share), (split, n)
            assert val >= v, (split, n)
            if train > split.train_floor(n):  # the floor did not bind: test got its minimum
                wanted = max(round(n * split.test), split.test_min_per_class)
                assert test == min(wanted, n - val - split.train_floor(n)), (split, n)


def test_the_assignment_is_deterministic_and_ordered_by_the_seeded_keys():
    ids = np.array([f"id{i:04d}" for i in range(231)], dtype=object)
    labels = np.array(["rich"] * 180 + ["short"] * 51, dtype=object)
    splits = assign_splits(ids, labels, LONG_TAIL, seed=0)
    order = np.random.default_rng(1).permutation(len(ids))
    again = assign_splits(ids[order], labels[order], LONG_TAIL, seed=0)
    assert dict(zip(ids[order], again, strict=True)) == dict(zip(ids, splits, strict=True))
    assert (assign_splits(ids, labels, LONG_TAIL, seed=1) != splits).any()
    # Within a class: val the lowest keys, test the next, train the rest.
    keys = split_keys(ids, 0)
    for label, (n_val, n_test) in (("rich", (18, 36)), ("short", (5, 15))):
        rows = np.flatnonzero(labels == label)
        ranked = splits[rows[np.argsort(keys[rows], kind="stable")]]
        assert list(ranked) == ["val"] * n_val + ["test"] * n_test + ["train"] * (
            len(rows) - n_val - n_test
        )


def test_train_min_share_is_validated():
    with pytest.raises(ValueError, match="train_min_share"):
        SplitConfig(train_min_share=1.5)
    with pytest.raises(ValueError, match="train_min_share"):
        SplitConfig(train_min_share=-0.1)
