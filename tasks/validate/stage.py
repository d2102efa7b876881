"""Validate: is the synthetic data faithful, diverse, not a copy, and does it help?

Everything is measured against the real data with the evaluator (a classifier trained on
real clean data only, `tasks/shared/evaluator.py`):
- fidelity/diversity: FID and KID in evaluator feature space, precision/recall/density/
  coverage, overall and per class, beside the same figures for real train vs real test
  (the noise floor: how far two real samples of the same data already are); both FIDs
  also class-matched (each set weighted to the train split's class shares: the generator
  is asked for more of the short classes than the real data holds), which `fid_ratio`
  gates; with
  `train_evaluator.inception_weights`, also the standard (Inception) FID and its floor
  (`inception_fid`; reported, not gated);
- class consistency: the evaluator's accuracy on the labels the generator was asked for;
- privacy: each synthetic image's distance to its nearest real training image, and the
  share closer than real test images usually get (`near_copy_rate`); the memorisation
  ratio, the distance to closest record against the real hold-out (val and test, which the
  generator never saw) and two membership-inference attacks (`tasks/validate/privacy.py`);
- utility (`tasks/validate/utility_protocol.py`): a downstream classifier trained on the
  real train split with the augment policy on the fly, alone vs plus the synthetic rows the
  user has after this round's promotion, over paired seeds, scored on the real test split:
  the mean gain with a 95% interval, overall, per class and on the short classes, each
  with its test images and the points one is worth; a decisive test split too small to
  resolve a gain (`validate.utility_max_points_per_test_image`) gives `no evidence` and
  `verdict_text` says so (the classifiers: tasks/validate/utility_trainer.py, in worker
  processes where that pays). The synthetic rows are the pool rows fuse mixes in (the fused
  set's, `fuse.output`) and the accepted rows promotion would add to the pool
  (`loop.pool`): `tasks.shared.pool.select_for_pool` on the pool as it stands, with the
  pool targets of `tasks.shared.pool.pool_targets` and `loop.max_pool_rows`, as the flow
  promotes (tasks/validate/promotion.py). The utility section reports them per class
  (`delivered_per_class`, the new ones in `delivered_new_per_class`) and the rule
  (`delivered_rule`). When promotion would take no row nothing is trained: `no evidence`,
  and `verdict_text` says why;
- a Great Expectations suite on the synthetic rows.
Per sample, an image is accepted when the evaluator gives its intended class at least
`min_confidence`, it is not a near copy, it is not memorised (its nearest training image
much closer than the second nearest, in pixels) and it is not a duplicate of an accepted
image.
The gates (tasks/validate/gates.py, with the acceptance) decide whether the loop may
promote the accepted rows; this stage only reports. The utility gates read the decisive
interval's lower bound and the test split's resolution (`utility_resolution`: a split too
small to resolve a gain promotes nothing, whatever its interval; `verdict_text` says so).
Rows that promotion would not take are not evidence: with none, the utility gates fail (no lower
bound), except when the pool is full (`utility.pool_full`: no class has room, so nothing can
be promoted whatever the gates say); then they pass unmeasured and the flow ends the run.

Sharded (synthloop/sharding.py): the evaluator features of the real train, val and test
splits and of the synthetic images are computed in shards of whole batches
(tasks/validate/features.py; the flow can compute them beforehand as parallel tasks); the
merge here concatenates them and computes everything else from them (the figures:
tasks/validate/figures.py), as one process.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from synthloop.config import (
    AugmentPolicy,
    EvaluatorConfig,
    FuseConfig,
    LoopConfig,
    Params,
    ValidateConfig,
)
from synthloop.dataset import (
    IMAGE_SCHEMA,
    ShardWriter,
    atomic_dir,
    iter_batches,
    remove_stale_temporaries,
    write_json,
)
from synthloop.sharding import (
    Shard,
    StageSpec,
)
from tasks.shared.evaluator import (
    CONFIG,
    Evaluator,
    Splits,
    load_evaluator,
    small_image_cpu_threads,
)
from tasks.shared.feedback import read_requests, requested_extra
from tasks.shared.images import (
    ImageTensors,
    concat,
    load_image_tensors,
    model_classes,
    resolve_device,
)
from tasks.shared.metrics import (
    class_consistency,
    near_copy_rate,
)
from tasks.shared.metrics import round_figure as _round
from tasks.validate.features import features_shard, load_features, plan_features
from tasks.validate.figures import fidelity, privacy, utility
from tasks.validate.gates import acceptance, delivery_order, evaluate_gates
from tasks.validate.inception import standard_fid
from tasks.validate.privacy import membership_auc_high
from tasks.validate.promotion import (
    delivered,
    load_pooled,
    plan_promotion,
    refreshed_rows,
    subset,
    why_nothing,
)
from tasks.validate.utility_protocol import (
    nothing_to_score,
    per_class_counts,
)

log = logging.getLogger(__name__)


# --- the stage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """Where accepted rows go: the pool (`loop.pool`, its targets' rule, `loop.max_pool_rows`)
    and the fused set whose synthetic rows are the pool rows fuse mixes in (`fuse.output`);
    people's requests (`fuse.feedback`'s `label,extra` rows) raise their classes' targets."""

    loop: LoopConfig = LoopConfig()
    fused: Path = FuseConfig.model_fields["output"].default
    feedback: Path = FuseConfig.model_fields["feedback"].default


@dataclass(frozen=True)
class ValidateJob:
    """The stage's params and what it needs besides: `evaluator` shapes the utility
    classifiers (the evaluator's architecture); `requested` is what generate was asked for
    per class (a shortfall is an expectation); `delivery` says which rows the synthetic
    utility arm holds."""

    validate: ValidateConfig
    evaluator: EvaluatorConfig
    requested: dict[str, int] | None = None
    augment: AugmentPolicy = AugmentPolicy()
    delivery: Delivery = Delivery()


def validate_job(params: Params) -> ValidateJob:
    """The job from all params: per evaluator class, generate.per_class plus its extras
    (generate.per_class_extra and people's feedback requests)."""
    classes = model_classes(params.train_evaluator.output / CONFIG)
    extra = requested_extra(params, classes)
    requested = {c: params.generate.per_class + extra.get(c, 0) for c in classes}
    return ValidateJob(
        params.validation,
        params.train_evaluator,
        requested,
        params.augment.policy,
        Delivery(params.loop, params.fuse.output, params.fuse.feedback),
    )


def _validate(
    cfg: ValidateConfig,
    evaluator: Evaluator,
    evaluator_cfg: EvaluatorConfig,
    requested_per_class: dict[str, int] | None,
    features: dict[str, torch.Tensor],
    policy: AugmentPolicy,
    delivery: Delivery,
) -> dict:
    """Everything but the features (`features[split]`, in the rows' order) from here."""
    remove_stale_temporaries(cfg.accepted)
    device = evaluator.device
    classes = evaluator.classes
    splits = Splits(
        train=load_image_tensors(cfg.clean / "train", classes=classes),
        val=load_image_tensors(cfg.clean / "val", classes=classes),
        test=load_image_tensors(cfg.clean / "test", classes=classes),
    )
    synthetic = load_image_tensors(cfg.synthetic, classes=classes)

    train_f, test_f, syn_f = (features[split] for split in ("train", "test", "synthetic"))
    _check_rows(
        {"train": splits.train, "val": splits.val, "test": splits.test, "synthetic": synthetic},
        features,
    )
    figures = fidelity(
        train_f,
        test_f,
        syn_f,
        splits.train.labels,
        synthetic.labels,
        classes,
        cfg.k,
        cfg.seed,
        splits.test.labels,
    )

    if evaluator_cfg.inception_weights is not None:  # standard FID, beside the evaluator's
        figures["inception_fid"] = {
            k: _round(v) if isinstance(v, float) else v
            for k, v in standard_fid(
                splits.train.images,
                splits.test.images,
                synthetic.images,
                evaluator_cfg.inception_weights,
                device,
            ).items()
        }

    probs = evaluator.probabilities(synthetic.images)
    consistency, _ = class_consistency(probs, synthetic.labels)
    intended = probs.gather(1, synthetic.labels[:, None])[:, 0].cpu().numpy()
    copy_rate, copy_threshold, nearest = near_copy_rate(
        synthetic.images, splits.train.images, splits.test.images, cfg.near_copy_percentile
    )
    near_copy = (nearest < copy_threshold).cpu().numpy()
    memorised, figures["privacy"] = privacy(cfg, splits, synthetic, features, classes)
    accepted_mask, reasons = acceptance(
        synthetic.ids, intended, near_copy, cfg.min_confidence, memorised.numpy()
    )
    kept = np.flatnonzero(accepted_mask)
    kept = kept[delivery_order(intended[kept], cfg.delivery_order)]
    accepted = subset(synthetic, torch.from_numpy(kept))

    figures["class_consistency"] = _round(consistency)
    figures["near_copy_rate"] = _round(copy_rate)
    figures["near_copy_threshold"] = _round(copy_threshold)
    figures["nearest_train_distance"] = {
        q: _round(float(np.percentile(nearest.cpu().numpy(), p)))
        for q, p in (("p5", 5), ("median", 50), ("p95", 95))
    }
    # The synthetic arm: what the user has after this promotion, no more
    # (tasks/validate/utility_protocol.py).
    requests = read_requests(delivery.feedback)[0]
    promotion = plan_promotion(accepted, per_class_counts(splits.train), delivery.loop, requests)
    new = subset(accepted, torch.tensor(promotion.selection.chosen, dtype=torch.long))
    if promotion.refresh:
        pooled = load_pooled(delivery.fused, splits.train)
        arm = concat(pooled, new)
        fresh = refreshed_rows(pooled, new, promotion, accepted)
        figures["utility"] = utility(cfg, splits, arm, device, evaluator_cfg, policy, fresh)
    elif len(new):
        arm = concat(load_pooled(delivery.fused, splits.train), new)
        figures["utility"] = utility(cfg, splits, arm, device, evaluator_cfg, policy)
    else:
        figures["utility"] = nothing_to_score(
            splits.train,
            splits.test.labels,
            cfg.short_class_share,
            why_nothing(promotion, len(accepted)),
            cfg.utility_max_points_per_test_image,
        )
    figures["utility"] |= delivered(promotion, new, accepted, figures["utility"], delivery.loop)

    stats = _pixel_stats(synthetic.images)
    requested = requested_per_class or dict.fromkeys(classes, 1)
    expectations = _expectations(cfg, synthetic, classes, stats, requested)
    figures["expectations"] = expectations
    figures["expectations_critical_ok"] = not any(f["critical"] for f in expectations["failed"])
    figures["gates"] = evaluate_gates(cfg.gates, figures)
    del figures["expectations_critical_ok"]

    rejected = pd.Series([r for r in reasons if r]).value_counts().to_dict()
    report = {
        "synthetic": len(synthetic),
        "accepted": int(accepted_mask.sum()),
        "rejected": {str(k): int(v) for k, v in sorted(rejected.items())},
        "accepted_per_class": {
            label: int((accepted.labels == c).sum()) for c, label in enumerate(classes)
        },
        **figures,
        "passed": figures["gates"]["passed"],
    }
    _write_accepted(cfg, accepted.ids, in_order=bool((np.diff(kept) > 0).all()))
    write_json(cfg.report, report)
    gates = report["gates"]
    failed = [name for name, g in gates.items() if name != "passed" and not g["passed"]]
    log.info(
        "validate: %d synthetic -> %d accepted; fid %.3g (floor %.3g), consistency %.3f, "
        "near-copy %.3f, memorised %s, membership AUC high %s, "
        "utility (%s) %+.4f [%s, %s]: %s; gates %s",
        len(synthetic),
        report["accepted"],
        figures["fid"] or math.nan,
        figures["fid_real_floor"] or math.nan,
        consistency,
        copy_rate,
        figures["privacy"]["memorisation"]["ratio"],
        membership_auc_high(figures["privacy"]),
        figures["utility"]["decisive"],
        figures["utility"]["delta"]["mean"] or 0.0,
        figures["utility"]["delta"]["low"],
        figures["utility"]["delta"]["high"],
        figures["utility"]["verdict_text"],
        "passed" if gates["passed"] else f"FAILED: {', '.join(failed)}",
    )
    return report


def _pixel_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    flat = images.reshape(len(images), -1).float()
    return flat.mean(1).numpy(), flat.std(1).numpy()


def _expectations(
    cfg: ValidateConfig,
    synthetic: ImageTensors,
    classes: list[str],
    stats: tuple[np.ndarray, np.ndarray],
    requested: dict[str, int],
) -> dict:
    from tasks.shared.expectations import SYNTHETIC_COLUMNS, validate_synthetic_dataset

    meta = pd.concat(
        [b.to_pandas() for b in iter_batches(cfg.synthetic, columns=SYNTHETIC_COLUMNS[:7])],
        ignore_index=True,
    )
    meta["pixel_mean"], meta["pixel_std"] = stats
    _, channels, height, width = synthetic.images.shape
    result = validate_synthetic_dataset(
        meta,
        known_labels=classes,
        height=height,
        width=width,
        channels=channels,
        requested_per_class={c: int(requested.get(c, 0)) for c in classes},
        min_pixel_std=1.0,
        docs_dir=cfg.report.parent / "great_expectations_synthetic",
    )
    result["data_docs"] = os.path.relpath(result["data_docs"], cfg.report.parent)
    return result


def _write_accepted(cfg: ValidateConfig, accepted_ids: list[str], in_order: bool) -> None:
    """Write the accepted rows, unchanged, into `cfg.accepted` (atomically), in the order of
    `accepted_ids` (the order the pool is offered them). `in_order`: that is the synthetic
    rows' own order, and the rows stream through; otherwise the accepted rows are held until
    all are read."""
    wanted = set(accepted_ids)
    with atomic_dir(cfg.accepted) as out, ShardWriter(out, IMAGE_SCHEMA) as writer:
        seen: set[str] = set()
        held: dict[str, dict] = {}
        for batch in iter_batches(cfg.synthetic, columns=IMAGE_SCHEMA.names):
            for row in batch.to_pylist():
                if row["id"] not in wanted or row["id"] in seen:
                    continue
                seen.add(row["id"])
                if in_order:
                    writer.append(row)
                else:
                    held[row["id"]] = row
        for row_id in [] if in_order else accepted_ids:
            writer.append(held[row_id])


def _check_rows(data: dict[str, ImageTensors], features: dict[str, torch.Tensor]) -> None:
    """A dataset rewritten between planning and loading would misalign rows and features."""
    for split, rows in data.items():
        if len(features[split]) != len(rows):
            raise RuntimeError(
                f"validate: {len(features[split])} {split} features for {len(rows)} images; "
                "the dataset changed while the stage ran, run it again"
            )


# --- plan -> shard -> merge (synthloop/sharding.py; the features: tasks/validate/features.py)


def plan_validate(job: ValidateJob) -> list[Shard]:
    return plan_features(job.validate)


def run_validate_shard(job: ValidateJob, shard: Shard, out: Path) -> dict:
    return features_shard(job.validate, shard, out)


def merge_validate(job: ValidateJob, folders: list[Path]) -> dict:
    """The features from the shards; everything else computed here, into the outputs."""
    cfg = job.validate
    device = resolve_device(cfg.device)
    evaluator = load_evaluator(cfg.evaluator, device=device, batch_size=cfg.batch_size)
    features = load_features(folders)
    with small_image_cpu_threads(device, evaluator.size):
        return _validate(
            cfg, evaluator, job.evaluator, job.requested, features, job.augment, job.delivery
        )


SHARDING = StageSpec(
    stage="validate",
    config=validate_job,
    plan=plan_validate,
    run_shard=run_validate_shard,
    merge=merge_validate,
)
