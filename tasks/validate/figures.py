"""Validate's figures, one group at a time, from the evaluator features and images the stage
has gathered (tasks/validate/stage.py): `fidelity` (FID, KID, precision/recall/density/
coverage, class consistency, against the real noise floor), `utility` (the paired-seed
utility protocol, tasks/validate/utility_protocol.py) and `privacy` (near copies,
memorisation, membership attacks, tasks/validate/privacy.py).
"""

from __future__ import annotations

import logging

import torch

from synthloop.config import (
    AugmentPolicy,
    EvaluatorConfig,
    ValidateConfig,
)
from tasks.shared.evaluator import Splits
from tasks.shared.images import ImageTensors
from tasks.shared.metrics import (
    class_matched_fid,
    fid_kid_features,
    frechet_distance,
    pixel_space,
    prdc,
)
from tasks.shared.metrics import round_figure as _round
from tasks.validate.privacy import PrivacySets, privacy_figures
from tasks.validate.utility_protocol import (
    compare_arms,
    trainings,
)
from tasks.validate.utility_trainer import TrainerPool, UtilityTrainer, utility_workers

log = logging.getLogger(__name__)


def fidelity(
    train_f: torch.Tensor,
    test_f: torch.Tensor,
    syn_f: torch.Tensor,
    train_labels: torch.Tensor,
    syn_labels: torch.Tensor,
    classes: list[str],
    k: int,
    seed: int,
    test_labels: torch.Tensor | None = None,
) -> dict:
    """FID, KID and PRDC overall and per class, with the real train-vs-test floor; with
    `test_labels`, also both FIDs class-matched (`tasks.shared.metrics.class_matched_fid`: each set
    weighted to the train split's class shares), which the `fid_ratio` gate reads."""
    fid, kid, kid_std = fid_kid_features(train_f, syn_f, seed=seed)
    floor_fid, floor_kid, _ = fid_kid_features(train_f, test_f, seed=seed)
    figures = {
        "fid": _round(fid),
        "kid": _round(kid),
        "kid_std": _round(kid_std),
        "fid_real_floor": _round(floor_fid),
        "kid_real_floor": _round(floor_kid),
    }
    if test_labels is not None:
        figures["fid_class_matched"] = _round(
            class_matched_fid(train_f, train_labels, syn_f, syn_labels)
        )
        figures["fid_real_floor_class_matched"] = _round(
            class_matched_fid(train_f, train_labels, test_f, test_labels)
        )
    figures |= {key: _round(v) for key, v in prdc(train_f, syn_f, k).items()}
    figures |= {f"{key}_real_floor": _round(v) for key, v in prdc(train_f, test_f, k).items()}
    per_class = {}
    for c, label in enumerate(classes):
        real_c, syn_c = train_f[train_labels == c], syn_f[syn_labels == c]
        entry: dict = {"synthetic": len(syn_c)}
        if min(len(real_c), len(syn_c)) > k + 1:
            entry["fid"] = _round(frechet_distance(real_c, syn_c))
            entry |= {key: _round(v) for key, v in prdc(real_c, syn_c, k).items()}
        per_class[label] = entry
    figures["per_class"] = per_class
    return figures


def utility(
    cfg: ValidateConfig,
    splits: Splits,
    synthetic: ImageTensors,
    device: torch.device,
    evaluator_cfg: EvaluatorConfig,
    policy: AugmentPolicy,
    refreshed: ImageTensors | None = None,
) -> dict:
    """The paired-seed utility protocol of `tasks/validate/utility_protocol.py` with
    `synthetic` as the synthetic arm's rows (and `refreshed` as the arm with a full class
    refreshed), its classifiers trained by `tasks/validate/utility_trainer.py` (in worker
    processes where that pays)."""
    trainer = UtilityTrainer.configured(cfg, evaluator_cfg, policy, splits, device)
    seeds = [cfg.seed + s for s in range(cfg.utility_seeds)]
    count = trainings(len(seeds), refreshed is not None)
    workers = utility_workers(cfg.utility_workers, trainer, count)
    with TrainerPool(trainer, workers) as pool:
        result = compare_arms(
            splits.train,
            synthetic,
            splits.val.labels,
            splits.test.labels,
            pool,
            seeds,
            cfg.short_class_share,
            cfg.utility_max_points_per_test_image,
            refreshed,
        )
    log.info("validate: %d utility classifiers in %d process(es)", count, workers)
    return result


def privacy(
    cfg: ValidateConfig,
    splits: Splits,
    synthetic: ImageTensors,
    features: dict[str, torch.Tensor],
    classes: list[str],
) -> tuple[torch.Tensor, dict]:
    """`tasks/validate/privacy.py` on pixels and evaluator features: hold-out = val + test, the real
    images the generator never saw. Returns the per-row memorised flag and the figures."""
    holdout_labels = torch.cat([splits.val.labels, splits.test.labels])
    pixels = PrivacySets(
        pixel_space(splits.train.images),
        splits.train.labels,
        pixel_space(torch.cat([splits.val.images, splits.test.images])),
        holdout_labels,
        pixel_space(synthetic.images),
        synthetic.labels,
    )
    feats = PrivacySets(
        features["train"],
        splits.train.labels,
        torch.cat([features["val"], features["test"]]),
        holdout_labels,
        features["synthetic"],
        synthetic.labels,
    )
    return privacy_figures(
        pixels,
        feats,
        classes,
        cfg.memorisation_distance_ratio,
        cfg.privacy_bootstrap,
        cfg.density_dims,
        cfg.seed,
    )
