"""The privacy figures bite: a generator that replays its training images fails them, one
that draws fresh samples from the same distribution passes (tasks/validate/privacy.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from synthloop.config import GateConfig
from tasks.validate.gates import acceptance, evaluate_gates, passes, privacy_checks
from tasks.validate.privacy import (
    PrivacySets,
    auc,
    auc_interval,
    balanced_subsample,
    dcr_share,
    membership_auc_high,
    membership_split,
    memorised,
    privacy_figures,
    split_holdout,
)

CLASSES = ["a", "b", "c"]
DIM = 16  # a 4x4 grey image, flattened


def draw(prototypes: torch.Tensor, per_class: int, gen: torch.Generator) -> tuple:
    """per_class samples of each class: its prototype plus noise (a class's distribution)."""
    labels = torch.arange(len(prototypes)).repeat_interleave(per_class)
    points = prototypes[labels] + 0.15 * torch.randn(len(labels), DIM, generator=gen)
    return points, labels


@pytest.fixture(scope="module")
def world() -> dict:
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.rand(len(CLASSES), DIM, generator=gen)
    train, train_labels = draw(prototypes, 60, gen)
    holdout, holdout_labels = draw(prototypes, 60, gen)
    fresh, fresh_labels = draw(prototypes, 60, gen)
    copies = train + 0.01 * torch.randn(train.shape, generator=gen)
    # "Evaluator features": a fixed random projection to 16 dimensions.
    projection = torch.randn(DIM, 16, generator=gen) / DIM**0.5

    def sets(synthetic: torch.Tensor, synthetic_labels: torch.Tensor) -> tuple:
        pixels = PrivacySets(
            train, train_labels, holdout, holdout_labels, synthetic, synthetic_labels
        )
        features = PrivacySets(
            train @ projection,
            train_labels,
            holdout @ projection,
            holdout_labels,
            synthetic @ projection,
            synthetic_labels,
        )
        return pixels, features

    return {"copying": sets(copies, train_labels), "honest": sets(fresh, fresh_labels)}


def figures(world: dict, generator: str) -> tuple[torch.Tensor, dict]:
    pixels, features = world[generator]
    return privacy_figures(pixels, features, CLASSES, 1 / 3, 500, 8, seed=0)


# --- memorisation ratio ------------------------------------------------------------------------


def test_memorised_flags_a_sample_on_one_training_image_not_one_between_two():
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    synthetic = torch.tensor([[0.1, 0.0], [5.0, 0.0], [3.0, 0.0]])
    # d1/d2: 0.1/9.9 (a copy), 5/5 (between two), 3/7 (closer to one, not much closer)
    assert memorised(synthetic, train, 1 / 3).tolist() == [True, False, False]


def test_memorisation_ratio_copying_high_honest_zero(world):
    _, copying = figures(world, "copying")
    _, honest = figures(world, "honest")
    assert copying["memorisation"]["pixels"]["ratio"] > 0.9
    assert copying["memorisation"]["ratio"] > 0.9
    assert all(v > 0.9 for v in copying["memorisation"]["pixels"]["per_class"].values())
    assert honest["memorisation"]["ratio"] < 0.02
    assert set(honest["memorisation"]["features"]["per_class"]) == set(CLASSES)


# --- DCR ---------------------------------------------------------------------------------------


def test_balanced_subsample_takes_the_smaller_count_per_class():
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([0] * 10 + [1] * 2 + [2] * 4)
    b = torch.tensor([0] * 3 + [1] * 7)
    ia, ib = balanced_subsample(a, b, 3, gen)
    for c, n in enumerate((3, 2, 0)):
        assert int((a[ia] == c).sum()) == int((b[ib] == c).sum()) == n
    assert len(set(ia.tolist())) == len(ia)  # without replacement


def test_dcr_near_half_for_honest_high_for_copying(world):
    _, copying = figures(world, "copying")
    _, honest = figures(world, "honest")
    fair = honest["dcr"]["pixels"]
    assert fair["low"] <= 0.5 <= fair["high"] and abs(fair["share"] - 0.5) < 0.1
    assert fair["per_class"]["a"]["subsample"] == 60
    # Train and hold-out are the same size here, so every copy's source is in the train
    # subsample and each copy sits on it. (The interval is wide: resampling the train rows
    # drops about a third of the sources from a replicate.)
    for space in ("pixels", "features"):
        assert copying["dcr"][space]["share"] > 0.9 and copying["dcr"][space]["low"] > 0.6


def test_dcr_leaves_out_a_class_without_hold_out():
    sets = PrivacySets(
        train=torch.zeros(4, 2),
        train_labels=torch.tensor([0, 0, 1, 1]),
        holdout=torch.ones(2, 2),
        holdout_labels=torch.tensor([0, 0]),
        synthetic=torch.zeros(2, 2),
        synthetic_labels=torch.tensor([0, 1]),
    )
    found = dcr_share(sets, 2, 50, torch.Generator().manual_seed(0))
    assert found["share"] == found["low"] == found["high"] == 1.0
    assert found["synthetic"] == 1 and found["per_class"] == [(1.0, 2), (None, 0)]
    empty = PrivacySets(
        sets.train,
        sets.train_labels,
        sets.holdout[:0],
        sets.holdout_labels[:0],
        sets.synthetic,
        sets.synthetic_labels,
    )
    nothing = dcr_share(empty, 2, 50, torch.Generator().manual_seed(0))
    assert nothing["share"] is None and nothing["per_class"] == [(None, 0), (None, 0)]


@pytest.mark.parametrize("top", [16, 2])  # 2: many rows miss and take the full path
def test_bootstrap_minima_over_resampled_columns_are_exact(monkeypatch, top):
    from tasks.validate.privacy import _SortedRows

    monkeypatch.setattr(_SortedRows, "TOP", top)
    d = torch.rand(40, 100, generator=torch.Generator().manual_seed(0))
    fast = _SortedRows(d).resampled_min(50, torch.Generator().manual_seed(1))
    cols = torch.randint(100, (50, 100), generator=torch.Generator().manual_seed(1))
    full = torch.stack([d[:, c].amin(1) for c in cols])
    assert torch.equal(fast, full)


# --- membership inference ----------------------------------------------------------------------


def test_auc_counts_ties_half():
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5
    assert auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5


def test_auc_interval_is_seeded_and_brackets_the_estimate():
    scores = torch.randn(200, generator=torch.Generator().manual_seed(1))
    a = auc_interval(scores[:100] + 0.5, scores[100:], 300, torch.Generator().manual_seed(0))
    b = auc_interval(scores[:100] + 0.5, scores[100:], 300, torch.Generator().manual_seed(0))
    assert a == b and a["low"] < a["auc"] < a["high"]


def test_non_members_and_the_density_reference_never_overlap(world):
    pixels, _ = world["honest"]
    who = membership_split(pixels, len(CLASSES), torch.Generator().manual_seed(0))
    assert not set(who.nonmembers.tolist()) & set(who.reference.tolist())
    for c in range(len(CLASSES)):  # as many members as non-members, per class
        members = int((pixels.train_labels[who.members] == c).sum())
        assert members == int((pixels.holdout_labels[who.nonmembers] == c).sum()) == 30
    scored, reference = split_holdout(pixels.holdout_labels, 3, torch.Generator().manual_seed(0))
    assert len(scored) + len(reference) == len(pixels.holdout)


def test_membership_auc_copying_high_honest_chance(world):
    _, copying = figures(world, "copying")
    _, honest = figures(world, "honest")
    assert copying["membership"]["distance"]["low"] > 0.95
    assert copying["membership"]["density"]["low"] > 0.6
    assert membership_auc_high(copying) > 0.95
    for attack in ("distance", "density"):
        fair = honest["membership"][attack]
        assert fair["low"] <= 0.5 <= fair["high"], attack
    assert honest["membership"]["members"] == honest["membership"]["nonmembers"] == 90


def test_figures_are_reproducible_from_the_seed(world):
    assert figures(world, "honest")[1] == figures(world, "honest")[1]


# --- gates and per-sample rejection ------------------------------------------------------------


def passing_figures(privacy: dict) -> dict:
    """Every non-privacy figure comfortably passing, so the verdict is the privacy gates'."""
    return {
        "fid_real_floor": 1.0,
        "fid": 1.0,
        "class_consistency": 1.0,
        "near_copy_rate": 0.0,
        "utility": {
            "delta": {"low": 0.1},
            "resolution": {"points_per_test_image": 1.0, "max_points_per_test_image": 5.0},
        },
        "expectations_critical_ok": True,
        "privacy": privacy,
    }


def test_gates_fail_a_copying_generator_and_pass_an_honest_one(world):
    gates = GateConfig()
    copying = evaluate_gates(gates, passing_figures(figures(world, "copying")[1]))
    honest = evaluate_gates(gates, passing_figures(figures(world, "honest")[1]))
    assert not copying["passed"]
    assert not copying["memorisation_ratio"]["passed"]
    assert not copying["membership_auc"]["passed"]
    assert honest["passed"], honest


def test_privacy_checks_alone_agree_with_the_round_gates(world):
    """The benchmarks judge kept rows with `privacy_checks` alone; it must give the round's
    verdicts, and an unmeasured figure fails."""
    gates = GateConfig()
    for kind in ("copying", "honest"):
        privacy = figures(world, kind)[1]
        round_gates = evaluate_gates(gates, passing_figures(privacy))
        for name, check in privacy_checks(gates, privacy).items():
            assert passes(*check) == round_gates[name]["passed"], (kind, name)
    assert not passes(None, "<=", 1.0) and not passes(math.nan, ">=", 0.0)
    assert not any(passes(*check) for check in privacy_checks(gates, {}).values())


def test_memorised_rows_are_rejected_as_memorised(world):
    pixels, features = world["copying"]
    # Half copies, half fresh: the mask must mark the copies only.
    honest_pixels, honest_features = world["honest"]
    mixed = PrivacySets(
        pixels.train,
        pixels.train_labels,
        pixels.holdout,
        pixels.holdout_labels,
        torch.cat([pixels.synthetic[:30], honest_pixels.synthetic[:30]]),
        torch.cat([pixels.synthetic_labels[:30], honest_pixels.synthetic_labels[:30]]),
    )
    mixed_features = PrivacySets(
        features.train,
        features.train_labels,
        features.holdout,
        features.holdout_labels,
        torch.cat([features.synthetic[:30], honest_features.synthetic[:30]]),
        torch.cat([features.synthetic_labels[:30], honest_features.synthetic_labels[:30]]),
    )
    mask, _ = privacy_figures(mixed, mixed_features, CLASSES, 1 / 3, 100, 8, seed=0)
    assert mask.tolist() == [True] * 30 + [False] * 30

    ids = [f"s{i}" for i in range(60)]
    confidence = np.ones(60)
    near_copy = np.zeros(60, dtype=bool)
    near_copy[0] = True  # the earlier check names the reason
    accepted, reasons = acceptance(ids, confidence, near_copy, 0.5, mask.numpy())
    assert reasons[0] == "near_copy"
    assert reasons[1:30] == ["memorised"] * 29
    assert reasons[30:] == [None] * 30 and accepted[30:].all() and not accepted[:30].any()


def test_the_summary_table_shows_every_figure_with_its_sizes(world):
    from flows.summaries import loop_summary_markdown, privacy_table_markdown

    privacy = figures(world, "copying")[1]
    table = privacy_table_markdown(privacy)
    assert "180 synthetic, 180 train, 180 hold-out" in table
    assert "90 members (train) against 90 non-members" in table
    mem = privacy["memorisation"]["pixels"]["ratio"]
    auc_ = privacy["membership"]["distance"]
    assert f"| {mem:.4f} |" in table
    assert f"{auc_['auc']:.3f} [{auc_['low']:.3f}, {auc_['high']:.3f}]" in table
    loop = {"attempts": [], "privacy": privacy}
    assert table in loop_summary_markdown(loop)
