"""What promoting the accepted rows now would do, as the flow promotes
(tasks/shared/pool.py): the rows the user would have after this round (`plan_promotion`,
`refreshed_rows`, `load_pooled`), which the utility protocol scores as the synthetic arm,
and how the validate report describes them (`delivered`, `why_nothing`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch

from synthloop.config import LoopConfig
from synthloop.dataset import iter_batches
from tasks.shared.images import (
    ImageTensors,
    concat,
    decode_rows,
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
from tasks.validate.utility_protocol import per_class_counts

log = logging.getLogger(__name__)


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
