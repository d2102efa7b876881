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
  real train split with the augment policy on the fly, alone vs plus the synthetic rows the user has
  after this round's promotion, over paired seeds, scored on the real test split: the mean gain
  with a 95% interval, overall, per class and on the short classes, each with its test
  images and the points one is worth; a decisive test split too small to resolve a gain
  (`validate.utility_max_points_per_test_image`) gives `no evidence` and `verdict_text` says
  so (the classifiers: tasks/validate/utility_trainer.py, in worker processes where that
  pays). The
  synthetic rows are the pool rows fuse mixes in (the fused set's, `fuse.output`) and the
  accepted rows promotion would add to the pool (`loop.pool`): `tasks.shared.pool.select_for_pool`
  on the pool as it stands, with the pool targets of `tasks.shared.pool.pool_targets` and
  `loop.max_pool_rows`, as the flow promotes. The utility section reports them per class
  (`delivered_per_class`, the new ones in `delivered_new_per_class`) and the rule
  (`delivered_rule`). When promotion would take no row nothing is trained: `no evidence`,
  and `verdict_text` says why;
- a Great Expectations suite on the synthetic rows.
Per sample, an image is accepted when the evaluator gives its intended class at least
`min_confidence`, it is not a near copy, it is not memorised (its nearest training image
much closer than the second nearest, in pixels) and it is not a duplicate of an accepted
image.
The gates decide whether the loop may promote the accepted rows; this stage only reports.
The utility gates read the decisive interval's lower bound and the test split's resolution
(`utility_resolution`: a split too small to resolve a gain promotes nothing, whatever its
interval; `verdict_text` says so). Rows
that promotion would not take are not evidence: with none, the utility gates fail (no lower
bound), except when the pool is full (`utility.pool_full`: no class has room, so nothing can
be promoted whatever the gates say); then they pass unmeasured and the flow ends the run.

Sharded (synthloop/sharding.py): the evaluator features of the real train, val and test
splits and of the synthetic images are computed in shards of whole batches
(tasks/validate/features.py; the flow can compute them beforehand as parallel tasks); the
merge here concatenates them and computes everything else from them, as one process.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch

from synthloop.config import (
    AugmentPolicy,
    EvaluatorConfig,
    FuseConfig,
    GateConfig,
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
    run_inline,
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
    decode_rows,
    load_image_tensors,
    model_classes,
    resolve_device,
)
from tasks.shared.metrics import (
    class_consistency,
    class_matched_fid,
    fid_kid_features,
    frechet_distance,
    near_copy_rate,
    pixel_space,
    prdc,
)
from tasks.shared.metrics import (
    round_figure as _round,
)
from tasks.shared.pool import (
    Selection,
    describe_targets,
    plan_refresh,
    pool_counts,
    pool_full,
    pool_ids,
    pool_room,
    pool_rows,
    pool_targets,
    select_for_pool,
)
from tasks.validate.features import features_shard, load_features, plan_features
from tasks.validate.inception import standard_fid
from tasks.validate.privacy import PrivacySets, membership_auc_high, privacy_figures
from tasks.validate.utility_protocol import (
    compare_arms,
    nothing_to_score,
    per_class_counts,
    trainings,
)
from tasks.validate.utility_trainer import TrainerPool, UtilityTrainer, utility_workers

log = logging.getLogger(__name__)


# --- pure pieces ---------------------------------------------------------------------------


def acceptance(
    ids: list[str],
    intended_confidence: np.ndarray,
    near_copy: np.ndarray,
    min_confidence: float,
    memorised: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """(accepted mask, rejection reason per row) in row order; the first copy of an id wins.
    The first failed check names the reason: low_confidence, near_copy, memorised, duplicate."""
    accepted = np.zeros(len(ids), dtype=bool)
    reasons: list[str | None] = [None] * len(ids)
    seen: set[str] = set()
    for i, row_id in enumerate(ids):
        if intended_confidence[i] < min_confidence:
            reasons[i] = "low_confidence"
        elif near_copy[i]:
            reasons[i] = "near_copy"
        elif memorised is not None and memorised[i]:
            reasons[i] = "memorised"
        elif row_id in seen:
            reasons[i] = "duplicate"
        else:
            accepted[i] = True
            seen.add(row_id)
    return accepted, reasons


def evaluate_gates(gates: GateConfig, figures: dict) -> dict:
    """Each gate's threshold, value and verdict, and `passed` overall."""
    # Like with like: both FIDs with the train split's class mix where measured (the
    # generator is asked for more of the short classes than the real data holds).
    fid = figures.get("fid_class_matched", figures["fid"])
    floor = max(figures.get("fid_real_floor_class_matched", figures["fid_real_floor"]), 1e-6)
    privacy = figures.get("privacy") or {}
    resolution = figures["utility"].get("resolution") or {}
    # A full pool takes no row whatever the gates say: its utility gates have nothing to
    # judge, so they pass unmeasured and the flow ends the run (the pool is full).
    unjudged = figures["utility"].get("pool_full") is True
    checks = {
        "class_consistency": (figures["class_consistency"], ">=", gates.min_class_consistency),
        "near_copy_rate": (figures["near_copy_rate"], "<=", gates.max_near_copy_rate),
        "fid_ratio": (None if fid is None else fid / floor, "<=", gates.max_fid_ratio),
        # The interval's lower bound: "no evidence" of a gain promotes nothing.
        "utility_lower_bound": (
            figures["utility"]["delta"]["low"],
            ">=",
            gates.min_utility_delta,
        ),
        # A test split too small to resolve a gain promotes nothing, whatever its interval.
        "utility_resolution": (
            resolution.get("points_per_test_image"),
            "<=",
            resolution.get("max_points_per_test_image"),
        ),
        "expectations": (float(figures["expectations_critical_ok"]), ">=", 1.0),
        # Not measured (None) fails, as for every gate.
        "memorisation_ratio": (
            privacy.get("memorisation", {}).get("ratio"),
            "<=",
            gates.max_memorisation_ratio,
        ),
        # The stronger attack's upper bound: a small hold-out cannot pass on luck.
        "membership_auc": (membership_auc_high(privacy), "<=", gates.max_membership_auc),
    }
    out: dict = {}
    for name, (value, op, threshold) in checks.items():
        if unjudged and name.startswith("utility_"):
            out[name] = {"value": None, "op": op, "threshold": threshold, "passed": True}
            out[name]["note"] = "the pool is full: no row to promote"
            continue
        if value is None or (isinstance(value, float) and math.isnan(value)):
            ok = False
        else:
            ok = bool(value >= threshold if op == ">=" else value <= threshold)
        out[name] = {"value": _round(value), "op": op, "threshold": threshold, "passed": ok}
    out["passed"] = all(g["passed"] for g in out.values())
    return out


def subset(data: ImageTensors, index: torch.Tensor) -> ImageTensors:
    rows = index.tolist()
    return ImageTensors(
        images=data.images[index],
        labels=data.labels[index],
        ids=[data.ids[i] for i in rows],
        classes=data.classes,
        sources=[data.sources[i] for i in rows],
    )


@dataclass(frozen=True)
class Promotion:
    """What promoting the accepted rows now would do, as the flow promotes
    (tasks/shared/pool.py)."""

    targets: dict[str, int | None]
    selection: Selection
    full: bool  # no class has room: nothing can enter the pool but by refresh
    # (accepted position, pooled id it would replace): a full class's refresh
    refresh: tuple[tuple[int, str], ...] = ()


def plan_promotion(
    accepted: ImageTensors,
    train_per_class: dict[str, int],
    loop: LoopConfig,
    requests: dict[str, int] | None = None,
) -> Promotion:
    """The pool's targets and room as they stand, the accepted rows promotion would add, and
    those that would refresh a full class (`tasks.shared.pool.plan_refresh`)."""
    targets = pool_targets(
        train_per_class, loop.target_per_class, loop.synthetic_multiple, requests
    )
    counts = pool_counts(loop.pool)
    room, total = pool_room(counts, targets, loop.max_pool_rows)
    labels = [accepted.classes[i] for i in accepted.labels.tolist()]
    known = pool_ids(loop.pool)
    selection = select_for_pool(accepted.ids, labels, known, room, total)
    refresh = plan_refresh(
        pool_rows(loop.pool),
        targets,
        accepted.ids,
        labels,
        known,
        selection.chosen,
        loop.refresh_share,
    )
    full = pool_full(counts, targets, loop.max_pool_rows)
    return Promotion(targets, selection, full, tuple(refresh))


def refreshed_rows(
    pooled: ImageTensors, new: ImageTensors, promotion: Promotion, accepted: ImageTensors
) -> ImageTensors:
    """The synthetic arm with the refresh: the pooled rows but those it replaces, the new
    rows, then the replacing ones."""
    replaced = {old for _, old in promotion.refresh}
    keep = [i for i, row_id in enumerate(pooled.ids) if row_id not in replaced]
    replacing = torch.tensor([i for i, _ in promotion.refresh], dtype=torch.long)
    return concat(
        concat(subset(pooled, torch.tensor(keep, dtype=torch.long)), new),
        subset(accepted, replacing),
    )


def load_pooled(fused: Path, like: ImageTensors) -> ImageTensors:
    """The pool rows fuse mixed in (the fused set's rows from the `synthetic` source), with
    `like`'s classes and image shape."""
    images, labels, ids = [like.images[:0]], [], []
    index = {label: i for i, label in enumerate(like.classes)}
    for batch in iter_batches(fused, columns=["id", "label", "source", "image"]):
        rows = batch.filter(pc.equal(batch.column("source"), "synthetic")).to_pydict()
        if rows["id"]:
            images.append(decode_rows(rows["image"], like.images.shape[1]))
            labels += [index[label] for label in rows["label"]]
            ids += rows["id"]
    return ImageTensors(
        images=torch.cat(images),
        labels=torch.tensor(labels, dtype=torch.int64),
        ids=ids,
        classes=like.classes,
        sources=["synthetic"] * len(ids),
    )


def why_nothing(promotion: Promotion, accepted: int) -> str:
    """Why promotion would take no accepted row, in words."""
    if promotion.full:
        return (
            f"the pool is full (every class at its target or loop.max_pool_rows reached): "
            f"promotion would take none of the {accepted} accepted rows"
        )
    if not accepted:
        return "no synthetic row was accepted"
    picked = promotion.selection
    return (
        f"promotion would take none of the {accepted} accepted rows ({picked.already_in_pool} "
        f"already in the pool, {picked.over_target} over their class's target or "
        "loop.max_pool_rows)"
    )


def delivered(
    promotion: Promotion, new: ImageTensors, accepted: ImageTensors, scored: dict, loop: LoopConfig
) -> dict:
    """The utility section's account of the synthetic arm's rows (besides
    `delivered_per_class`, which the arm reports itself). A refresh the verdict kept adds
    its rows, and `refresh.pairs` ([new id, pooled id]) tells the promotion which to retire;
    with no row to add and no refresh kept, a full pool has nothing to judge (`pool_full`)."""
    refresh = scored.get("refresh")
    kept = bool(refresh and refresh["kept"])
    new_per_class = per_class_counts(new)
    replacing = 0
    if refresh is not None:
        positions = torch.tensor([i for i, _ in promotion.refresh], dtype=torch.long)
        per_class = per_class_counts(subset(accepted, positions))
        refresh = refresh | {
            "replacing_per_class": per_class,
            "pairs": [[accepted.ids[i], old] for i, old in promotion.refresh] if kept else [],
        }
        if kept:
            new_per_class = {c: n + per_class[c] for c, n in new_per_class.items()}
            replacing = len(promotion.refresh)
    return {
        "refresh": refresh,
        "delivered_rule": "the pool rows fuse mixes in (fuse.output, source synthetic) and "
        "the accepted rows promotion would add: ids new to loop.pool (retired shards "
        "included), in the accepted set's order, within each class's room to its target "
        f"({describe_targets(loop.target_per_class, loop.synthetic_multiple)}) and "
        f"loop.max_pool_rows ({loop.max_pool_rows}); a class at its target: new rows in "
        f"place of its oldest pooled ones (at most loop.refresh_share {loop.refresh_share:g} "
        "of its target), when the refreshed arm scores at least as well as the pool",
        "delivered_new_per_class": new_per_class,
        "not_delivered": {
            "already_in_pool": promotion.selection.already_in_pool,
            "over_target": promotion.selection.over_target - replacing,
        },
        "pool_targets": promotion.targets,
        "pool_full": promotion.full and not kept,
    }


# --- metric groups -------------------------------------------------------------------------


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
    accepted = subset(synthetic, torch.from_numpy(np.flatnonzero(accepted_mask)))

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
    _write_accepted(cfg, set(accepted.ids))
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


def _write_accepted(cfg: ValidateConfig, accepted_ids: set[str]) -> None:
    """Stream the accepted rows, unchanged, into `cfg.accepted` (atomically)."""
    with atomic_dir(cfg.accepted) as out, ShardWriter(out, IMAGE_SCHEMA) as writer:
        written: set[str] = set()
        for batch in iter_batches(cfg.synthetic, columns=IMAGE_SCHEMA.names):
            for row in batch.to_pylist():
                if row["id"] in accepted_ids and row["id"] not in written:
                    written.add(row["id"])
                    writer.append(row)


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


def run_stage(params: Params) -> dict:
    """The DVC stage: reuse the shards the flow computed beforehand, compute the rest."""
    return run_inline(SHARDING, params)
