"""The utility protocol's plain parts: the interval, the verdict, short classes, what each arm
trains on, the gate on the lower bound, and the on-the-fly augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from synthloop.config import AugmentPolicy, GateConfig
from tasks.shared.images import ImageTensors
from tasks.validate.gates import evaluate_gates
from tasks.validate.online_augment import batch_augmenter
from tasks.validate.utility_protocol import (
    RECIPES,
    Interval,
    Recipe,
    choose_recipe,
    compare_arms,
    short_classes,
    t_interval,
    verdict,
)


def test_the_interval_on_a_constructed_case():
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445: half-width 2.776445 * 1.581139 / sqrt(5)
    interval = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.mean == 3.0 and interval.n == 5
    assert interval.low == pytest.approx(3 - half, abs=1e-5)
    assert interval.high == pytest.approx(3 + half, abs=1e-5)
    assert t_interval([0.2, 0.2, 0.2]).low == pytest.approx(0.2)  # no spread, no width
    one = t_interval([0.5])
    assert one.low is None and verdict(one) == "no evidence"  # one seed is no evidence


def test_the_verdict_reads_the_interval():
    assert verdict(Interval(0.03, 0.01, 0.05, 5)) == "helped"
    assert verdict(Interval(0.03, -0.01, 0.07, 5)) == "no evidence"
    assert verdict(Interval(-0.03, -0.05, -0.01, 5)) == "hurt"


def test_short_classes_are_those_below_a_share_of_the_largest():
    counts = {"0": 140, "1": 10, "2": 69, "3": 70}
    assert short_classes(counts, 0.5) == ["1", "2"]
    assert short_classes({"a": 5, "b": 5}, 0.5) == []
    assert short_classes({}, 0.5) == []


def test_the_gate_uses_the_lower_bound():
    gates = GateConfig(min_class_consistency=0, max_near_copy_rate=1, max_fid_ratio=1e9)
    figures = {
        "class_consistency": 1.0,
        "near_copy_rate": 0.0,
        "fid": 1.0,
        "fid_real_floor": 1.0,
        "expectations_critical_ok": True,
    }
    for low, passed in ((0.001, True), (-0.001, False), (None, False)):
        resolution = {"points_per_test_image": 2.0, "max_points_per_test_image": 5.0}
        utility = {"delta": {"mean": 0.05, "low": low, "high": 0.1}, "resolution": resolution}
        result = evaluate_gates(gates, figures | {"utility": utility})
        assert result["utility_lower_bound"]["passed"] is passed, low


def test_the_fid_gate_reads_the_class_matched_figures_where_measured():
    gates = GateConfig(max_fid_ratio=10)
    resolution = {"points_per_test_image": 2.0, "max_points_per_test_image": 5.0}
    utility = {"delta": {"mean": 0.05, "low": 0.01, "high": 0.1}, "resolution": resolution}
    figures = {
        "class_consistency": 1.0,
        "near_copy_rate": 0.0,
        "fid": 6.6,  # plain: the synthetic set's balanced mix against a long tail
        "fid_real_floor": 0.58,
        "expectations_critical_ok": True,
        "utility": utility,
    }
    plain = evaluate_gates(gates, figures)["fid_ratio"]
    assert plain["value"] == pytest.approx(6.6 / 0.58) and not plain["passed"]
    matched = figures | {"fid_class_matched": 0.98, "fid_real_floor_class_matched": 0.39}
    ratio = evaluate_gates(gates, matched)["fid_ratio"]
    assert ratio["value"] == pytest.approx(0.98 / 0.39) and ratio["passed"]
    unmeasured = evaluate_gates(gates, matched | {"fid_class_matched": None})["fid_ratio"]
    assert not unmeasured["passed"]


def images(labels: list[int], start: int, classes: list[str]) -> ImageTensors:
    n = len(labels)
    return ImageTensors(
        images=torch.arange(start, start + n, dtype=torch.uint8)
        .view(n, 1, 1, 1)
        .expand(n, 1, 4, 4),
        labels=torch.tensor(labels),
        ids=[f"id{start + i}" for i in range(n)],
        classes=classes,
        sources=["real"] * n,
    )


def test_every_arm_trains_on_the_generators_real_images_and_pairs_its_seeds():
    classes = ["a", "b", "c"]
    train = images([0] * 20 + [1] * 20 + [2] * 4, 0, classes)  # c is short
    accepted = images([2] * 6, 100, classes)
    val_labels = torch.tensor([0, 1, 2])
    test_labels = torch.tensor([0, 1, 2, 2])
    calls = []

    def trainer(data: ImageTensors, seed: int, recipe: Recipe):  # noqa: ANN202
        calls.append((set(data.ids), seed, recipe))
        # with the synthetic rows, class c is always right; without, half of it
        pred = test_labels.clone()
        if not any(i.startswith("id1") and int(i[2:]) >= 100 for i in data.ids):
            pred[3] = 0
        val = val_labels.clone()
        if not recipe.augment:
            val[0] = 1  # the policy is better on val: it is the baseline
        return val, pred

    # 2 short-class test images (50 points each): resolvable only under a lax threshold
    result = compare_arms(
        train,
        accepted,
        val_labels,
        test_labels,
        trainer,
        [0, 1, 2],
        short_share=0.5,
        max_points_per_test_image=50,
    )
    real_ids, synthetic_ids = set(train.ids), set(accepted.ids)
    for ids, _, _ in calls:
        assert ids - synthetic_ids <= real_ids  # no real image beyond the generator's
    chosen = Recipe(True, "balanced")  # augmenting wins on val; the tie goes to balanced
    base = [c for c in calls if c[0] == real_ids and c[2] == chosen]
    plus = [c for c in calls if c[0] == real_ids | synthetic_ids]
    assert [c[1] for c in base] == [c[1] for c in plus] == [0, 1, 2]  # paired seeds
    assert all(c[2] == chosen for c in plus)  # the same recipe in both main arms
    assert {(frozenset(c[0]), c[2]) for c in calls if c[1] == 0} >= {
        (frozenset(real_ids), r) for r in RECIPES
    }  # every recipe of the menu, on seed 0
    assert (synthetic_ids, 0, Recipe(False, "balanced")) in calls  # tstr
    assert result["baseline"] == "real+aug, balanced"
    assert set(result["reference"]) == {
        "real, balanced",
        "real, logit-adjusted",
        "real+aug, logit-adjusted",
        "tstr",
    }
    assert result["delivered_per_class"] == {"a": 0, "b": 0, "c": 6}  # the arm's rows
    assert result["short_classes"] == ["c"] and result["decisive"] == "short"
    assert result["short"]["baseline"] == 0.5 and result["short"]["baseline+synthetic"] == 1.0
    assert result["delta"] == {"mean": 0.5, "low": 0.5, "high": 0.5, "seeds": 3}
    assert result["verdict"] == "helped" and result["overall"]["verdict"] == "helped"
    assert result["per_class"]["a"]["verdict"] == "no evidence"  # no change there
    assert result["resolution"] == {
        "test_images": 2,
        "points_per_test_image": 50.0,
        "resolves": True,
        "max_points_per_test_image": 50,
    }
    assert result["overall"]["test_images"] == 4 and result["per_class"]["c"]["test_images"] == 2


def test_the_baseline_is_chosen_on_val_never_on_test():
    """Augmentation and balanced draws that hurt on val: the baseline is plain real data with
    the logit-adjusted loss, for every seed, and the synthetic arm trains the same way, even
    though test favours augmenting with balanced draws."""
    classes = ["a", "b"]
    train = images([0] * 10 + [1] * 10, 0, classes)
    accepted = images([1] * 4, 100, classes)
    val_labels, test_labels = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1])
    calls = []

    def trainer(data: ImageTensors, seed: int, recipe: Recipe):  # noqa: ANN202
        calls.append((len(data), seed, recipe))
        val = val_labels.clone()
        if recipe.augment:
            val[:2] = 1 - val[:2]  # augmenting costs half of val
        if recipe.remedy == "balanced":
            val[2] = 1 - val[2]  # and so do balanced draws, a quarter
        good = recipe.augment and recipe.remedy == "balanced"
        test = test_labels.clone() if good else 1 - test_labels  # ... yet both win on test
        return val, test

    result = compare_arms(train, accepted, val_labels, test_labels, trainer, [0, 1], 0.5)
    assert result["baseline"] == "real, logit-adjusted"
    assert result["baseline_val_accuracy"] == {
        "real, balanced": 0.75,
        "real+aug, balanced": 0.25,
        "real, logit-adjusted": 1.0,
        "real+aug, logit-adjusted": 0.5,
    }
    main = [c for c in calls if c[0] in (20, 24) and c[1] == 1]
    plain = Recipe(False, "logit-adjusted")
    assert main == [(20, 1, plain), (24, 1, plain)]  # seed 1 of both arms: val's choice
    assert "real+aug, balanced" in result["reference"] and result["overall"]["baseline"] == 0.0


def test_online_augmentation_draws_per_image_and_is_seeded():
    off = AugmentPolicy(rotate_degrees=0, translate=0, scale_min=1, scale_max=1, noise_std=0)
    x = torch.zeros(16, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 2:6, 1:3] = 255
    assert torch.equal(batch_augmenter(off, torch.Generator())(x), x)
    flip = off.model_copy(update={"hflip": 1.0})
    assert torch.equal(batch_augmenter(flip, torch.Generator())(x), x.flip(-1))
    policy = AugmentPolicy(rotate_degrees=20, translate=0.2)
    a = batch_augmenter(policy, torch.Generator().manual_seed(3))(x)
    b = batch_augmenter(policy, torch.Generator().manual_seed(3))(x)
    assert torch.equal(a, b) and a.dtype == torch.uint8
    assert len({bytes(img.flatten().tolist()) for img in a}) > 8  # each image its own draw


def test_balanced_epochs_draw_every_class_equally_often():
    from tasks.shared.evaluator import epoch_order

    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = epoch_order(labels, True, torch.Generator().manual_seed(0))
    assert len(order) == len(labels)
    shares = torch.bincount(labels[order], minlength=3).double() / len(order)
    assert torch.allclose(shares, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.05)
    plain = epoch_order(labels, False, torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(len(labels)))  # a permutation: each row once
    again = epoch_order(labels, True, torch.Generator().manual_seed(0))
    assert torch.equal(order, again)  # seeded


def test_one_accepted_image_has_no_tstr_arm_and_the_main_arms_still_run():
    """A classifier cannot train on one image: the synthetic-only reference is left out
    (the real trainer refuses it by name) and the comparison goes on."""
    from synthloop.config import EvaluatorConfig
    from tasks.shared.evaluator import Splits, train_net

    classes = ["a", "b"]
    train = images([0] * 6 + [1] * 6, 0, classes)
    accepted = images([1], 100, classes)
    labels = torch.tensor([0, 1])
    sizes = []

    def trainer(data: ImageTensors, seed: int, recipe: Recipe):  # noqa: ANN202
        sizes.append(len(data))
        return labels, labels

    result = compare_arms(train, accepted, labels, labels, trainer, [0, 1], 0.5)
    assert "tstr" not in result["reference"] and 1 not in sizes
    assert result["synthetic_images"] == 1 and sorted(set(sizes)) == [12, 13]
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        train_net(EvaluatorConfig(epochs=1), Splits(accepted, train, train), torch.device("cpu"))


def short_class_case(short_test_images: int, seeds: list[int]) -> dict:
    """Class c is short (4 train images); the synthetic rows put 3 of its test images right
    on every seed, a gain the seeds agree on exactly."""
    classes = ["a", "b", "c"]
    train = images([0] * 20 + [1] * 20 + [2] * 4, 0, classes)
    accepted = images([2] * 6, 100, classes)
    val_labels = torch.tensor([0, 1, 2])
    test_labels = torch.tensor([0] * 10 + [1] * 10 + [2] * short_test_images)

    def trainer(data: ImageTensors, seed: int, recipe: Recipe):  # noqa: ANN202
        pred = test_labels.clone()
        if len(data) == len(train):  # no synthetic rows: three of c's images wrong
            pred[20:23] = 0
        return val_labels.clone(), pred

    return compare_arms(train, accepted, val_labels, test_labels, trainer, seeds, 0.5)


def test_a_short_test_split_too_small_to_resolve_a_gain_is_no_evidence_and_says_so():
    from flows.summaries import helped_verdict, utility_table_markdown

    small = short_class_case(15, [0, 1, 2])
    assert small["delta"]["low"] == pytest.approx(0.2)  # the interval alone would say helped
    assert small["verdict"] == "no evidence" and small["short"]["verdict"] == "no evidence"
    assert small["resolution"] == {
        "test_images": 15,
        "points_per_test_image": 6.67,
        "resolves": False,
        "max_points_per_test_image": 5.0,  # validate.utility_max_points_per_test_image
    }
    assert small["verdict_text"].startswith(
        "no evidence: the short classes' test split has 15 images (6.7 points each), "
        "too few to resolve a gain"
    ), small["verdict_text"]
    sentence = helped_verdict({"utility": small})
    assert "**no evidence**" in sentence and "on 15 test images (6.67 points each)" in sentence
    assert "too few to resolve a gain" in sentence
    assert "| test split | 35 test images (2.86 points each) | 15 test images (6.67 points" in (
        utility_table_markdown(small)
    )
    # The overall figure has 35 test images (2.9 points each): resolvable, so it reads the
    # interval.
    assert small["overall"]["resolves"] and small["overall"]["verdict"] == "helped"

    # 20 images are 5 points each, at the threshold: the same gain is resolvable.
    enough = short_class_case(20, [0, 1, 2])
    assert enough["verdict"] == "helped" and enough["resolution"]["resolves"]
    assert (
        enough["verdict_text"]
        == "helped: the short classes' test split has 20 images (5.0 points each)"
    )
    assert "too few" not in helped_verdict({"utility": enough})


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # c has no test rows to score
def test_no_test_images_of_the_decisive_classes_is_no_evidence():
    none = short_class_case(0, [0, 1])
    assert none["resolution"]["points_per_test_image"] is None
    assert none["verdict"] == "no evidence"
    assert none["verdict_text"] == "no evidence: the short classes' test split has no images"


def test_ties_on_val_go_to_the_simpler_recipe():
    assert choose_recipe(dict.fromkeys(RECIPES, 0.9)) == Recipe(False, "balanced")
    better = dict.fromkeys(RECIPES, 0.9) | {Recipe(True, "logit-adjusted"): 0.91}
    assert choose_recipe(better) == Recipe(True, "logit-adjusted")
