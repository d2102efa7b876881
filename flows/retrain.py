"""The auto retrain policy (`loop.retrain: auto`): what to change when an attempt fails its
gates, read from the evidence that attempt left, and why.

A retrain that changes nothing that could help only spends an attempt. `choose_retrain`
returns the first change the evidence points at, with its reason in words for the run's
record, or None: nothing points anywhere, and the round ends there. In order:

1. **Train longer** when the val curve was still improving: of two evaluations or more, the
   last one is the best, and training did not stop early. train.steps doubles, up to
   loop.retrain_max_steps.
2. **DiffAugment for D** when the discriminator overfits: the mean sign of D's output on
   real training images over the last log window (ADA's r_t, the cgan's `d_real_sign`)
   is above loop.overfit_sign, and the family's DiffAugment is off.
3. **Switch family** when nothing above applies and this round's bake-off ranked another
   family that no attempt of the round has trained yet: the best-ranked of them, with the
   round's other changes kept. Its own evidence then decides the retrain after it.

`evidence_from` gathers the figures from the attempt's model card, train config and
validation report; `choose_retrain` is pure, so tests/test_retrain.py walks it through
constructed cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flows.bakeoff import RankKey, rank_key


@dataclass(frozen=True)
class Evidence:
    """What a failed attempt shows about its training."""

    family: str
    steps: int
    evaluations: int  # points on the val curve (0 with train.eval_every 0)
    best_step: int | None
    last_eval_step: int | None
    stopped_early: bool
    d_real_sign: float | None  # None: the family has no discriminator
    diffaug: bool | None  # None: the family has no DiffAugment switch
    key: RankKey  # the attempt's rank key (flows.bakeoff.rank_key)
    bakeoff: tuple[tuple[str, RankKey], ...] = ()  # this round's bake-off, best first


@dataclass(frozen=True)
class Retrain:
    overrides: dict[str, dict[str, Any]]
    reason: str


def choose_retrain(
    ev: Evidence, families_run: Sequence[str], max_steps: int, overfit_sign: float
) -> Retrain | None:
    """The change the evidence points at, or None. `families_run`: the families this round's
    attempts trained (never switched back to)."""
    # One evaluation shows no trend: "still improving" needs a curve that got to its best last.
    improving = ev.evaluations >= 2 and ev.best_step == ev.last_eval_step == ev.steps
    if improving and not ev.stopped_early and ev.steps * 2 <= max_steps:
        return Retrain(
            {"train": {"steps": ev.steps * 2}},
            f"the val curve was still improving at the last step (step {ev.steps} was the "
            f"best): train {ev.steps * 2} steps",
        )
    if ev.diffaug is False and ev.d_real_sign is not None and ev.d_real_sign > overfit_sign:
        return Retrain(
            {"train": {ev.family: {"diffaug": True}}},
            f"D overfits: mean sign(D(real)) {ev.d_real_sign:.2f} > {overfit_sign}: "
            "switch on DiffAugment",
        )
    for rank, (family, key) in enumerate(ev.bakeoff, start=1):
        if family not in families_run:
            return Retrain(
                {"train": {"family": family}},
                f"nothing left to change for {ev.family}; the bake-off ranked {family} "
                f"#{rank} (utility lower bound {_low(key)}): switch to {family}",
            )
    return None


def evidence_from(
    card: dict, train: dict, validation: dict, bakeoff: Sequence[tuple[str, RankKey]] = ()
) -> Evidence:
    """The evidence of one attempt: its model card, its train params (as a dict) and its
    validation report."""
    family = card.get("family", train.get("family", ""))
    curve = card.get("eval_curve") or []
    section = train.get(family) if isinstance(train.get(family), dict) else {}
    diffaug = section.get("diffaug")
    return Evidence(
        family=family,
        steps=int(card.get("steps", train.get("steps", 0))),
        evaluations=len(curve),
        best_step=card.get("best_step") if curve else None,
        last_eval_step=curve[-1]["step"] if curve else None,
        stopped_early=bool(card.get("stopped_early")),
        d_real_sign=(card.get("final_losses") or {}).get("d_real_sign"),
        diffaug=diffaug if isinstance(diffaug, bool) else None,
        key=rank_key(validation),
        bakeoff=tuple(bakeoff),
    )


def _low(key: RankKey) -> str:
    return "none" if key[1] == float("-inf") else f"{key[1]:+.3f}"
