"""The utility classifiers: the same predictions from a worker process as from this one,
the worker count, and the cap on the synthetic rows' share of a class's draws."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from synthloop.config import AugmentPolicy, EvaluatorConfig
from tasks.shared.evaluator import LOGIT_TAU, Splits, epoch_order, log_prior, logit_adjusted_loss
from tasks.shared.images import ImageTensors, concat
from tasks.validate.utility_protocol import Recipe
from tasks.validate.utility_trainer import (
    POOL_MIN_IMAGES,
    TrainerPool,
    UtilityTrainer,
    utility_workers,
)


def dataset(n_per_class: list[int], tag: str, seed: int) -> ImageTensors:
    """Class c: a bright bar in column 2c of a noisy 8x8 image, so a short training learns."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    images = torch.randint(0, 60, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, 0, :, 2 * c] = 255
    return ImageTensors(
        images=images,
        labels=labels,
        ids=[f"{tag}{i}" for i in range(len(labels))],
        classes=["a", "b", "c"],
        sources=[tag] * len(labels),
    )


def trainer(**changes: object) -> UtilityTrainer:
    splits = Splits(
        dataset([12, 12, 3], "train", 0),
        dataset([4, 4, 4], "val", 1),
        dataset([5, 5, 5], "test", 2),
    )
    cfg = EvaluatorConfig(width=8, feature_dim=16, batch_size=16)
    return replace(UtilityTrainer(splits, 6, cfg, AugmentPolicy(), "cpu", 0.5), **changes)


def test_a_worker_process_predicts_exactly_what_this_process_does():
    t = trainer()
    plus = concat(t.splits.train, dataset([0, 0, 9], "synthetic", 3))
    jobs = [
        (t.splits.train, 0, Recipe(True)),
        (t.splits.train, 1, Recipe(False, "logit-adjusted")),
        (plus, 0, Recipe(True)),
    ]
    here = [t(*job) for job in jobs]
    with TrainerPool(t, workers=2) as pool:
        futures = [pool.submit(*job) for job in jobs]
        there = [f.result() for f in futures]
    for (val_a, test_a), (val_b, test_b) in zip(here, there, strict=True):
        assert torch.equal(val_a, val_b) and torch.equal(test_a, test_b)


def test_the_pool_of_one_runs_in_this_process_and_raises_here():
    t = trainer()
    with TrainerPool(t, workers=1) as pool:
        val, test = pool.submit(t.splits.train, 0, Recipe(False)).result()
        assert val.shape == (12,) and test.shape == (15,)
        one = dataset([1, 0, 0], "x", 5)
        with pytest.raises(ValueError, match="at least 2 training images"):
            pool.submit(one, 0, Recipe(False))


def test_worker_count_rule():
    long = trainer(steps=POOL_MIN_IMAGES // 16)
    assert utility_workers(3, long, trainings=12) == 3  # asked for
    assert utility_workers(30, long, trainings=12) == 12  # never more than the trainings
    assert utility_workers(0, trainer(steps=2), trainings=12) == 1  # too short to pay a start
    assert utility_workers(0, trainer(steps=POOL_MIN_IMAGES // 16, device="cuda"), 12) == 1
    auto = utility_workers(0, long, trainings=12)
    assert 1 <= auto <= 12


def test_the_synthetic_share_of_a_class_is_capped_and_the_classes_stay_balanced():
    # class 0: 100 real; class 1: 10 real + 90 synthetic; class 2: 40 real + 10 synthetic
    labels = torch.tensor([0] * 100 + [1] * 100 + [2] * 50)
    synthetic = torch.zeros(250, dtype=torch.bool)
    synthetic[110:200] = True
    synthetic[240:250] = True
    g = torch.Generator().manual_seed(0)
    order = torch.cat([epoch_order(labels, True, g, synthetic, 0.5) for _ in range(40)])
    drawn = labels[order]
    shares = torch.bincount(drawn, minlength=3).double() / len(order)
    assert torch.allclose(shares, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    syn_share = [float(synthetic[order][drawn == c].double().mean()) for c in range(3)]
    assert syn_share[0] == 0.0
    assert abs(syn_share[1] - 0.5) < 0.03  # capped: 0.9 of the rows, half the draws
    assert abs(syn_share[2] - 0.2) < 0.03  # under the cap: its natural share
    # no cap (1.0) draws exactly as the plain balanced order does
    plain = epoch_order(labels, True, torch.Generator().manual_seed(1))
    uncapped = epoch_order(labels, True, torch.Generator().manual_seed(1), synthetic, 1.0)
    assert torch.equal(plain, uncapped)
    # unbalanced with a cap: each class as often as its rows
    g = torch.Generator().manual_seed(2)
    order = torch.cat([epoch_order(labels, False, g, synthetic, 0.5) for _ in range(40)])
    shares = torch.bincount(labels[order], minlength=3).double() / len(order)
    assert torch.allclose(shares, torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64), atol=0.02)


def test_the_logit_adjusted_loss_is_plain_on_balanced_priors_and_shifted_otherwise():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    plain = torch.nn.functional.cross_entropy(logits, labels)
    flat = log_prior(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    assert torch.allclose(logit_adjusted_loss(logits, labels, flat, LOGIT_TAU), plain)
    # a long tail: 8, 2 and 1 rows; the loss is the plain loss of logits + tau * log(prior)
    prior = log_prior(torch.tensor([0] * 8 + [1] * 2 + [2]), 3)
    assert torch.allclose(prior, torch.log(torch.tensor([8, 2, 1]) / 11))
    shifted = torch.nn.functional.cross_entropy(logits + 0.5 * prior, labels)
    assert torch.allclose(logit_adjusted_loss(logits, labels, prior, 0.5), shifted)
    # the rare class's row costs more than plainly: it must win by a margin
    assert logit_adjusted_loss(logits[1:], labels[1:], prior, 1.0) > plain.new_tensor(
        torch.nn.functional.cross_entropy(logits[1:], labels[1:]).item()
    )
