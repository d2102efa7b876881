"""Validate's verdicts from its figures: which synthetic rows are accepted, one by one
(`acceptance`), in which order the pool is offered them (`delivery_order`), and which gates
the round passes (`evaluate_gates`; the privacy gates alone: `privacy_checks`). Pure
functions of the figures the stage computes (tasks/validate/stage.py); the loop reads the
gates to decide whether to promote the accepted rows.
"""

from __future__ import annotations

import math

import numpy as np

from synthloop.config import GateConfig
from tasks.shared.metrics import round_figure as _round
from tasks.validate.privacy import membership_auc_high


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


def delivery_order(confidence: np.ndarray, order: str) -> np.ndarray:
    """Positions of the accepted rows in the order the pool is offered them. A class with
    less room than accepted rows takes the first ones (tasks/shared/pool.py
    `select_for_pool`), so the order is what the promotion keeps.

    generated  as sampled.
    hardest    the least evaluator confidence in the intended class first (ties as
               sampled): the evaluator has already confirmed each row's class, and among
               confirmed rows the ones a classifier is least sure of carry the most for it
               (feedback-guided selection: Askari-Hemmat et al., TMLR 2024, keep the samples
               the downstream classifier finds hard; ActGen, ECCV 2024, generates what it gets
               wrong)."""
    if order == "generated":
        return np.arange(len(confidence))
    if order == "hardest":
        return np.argsort(confidence, kind="stable")
    raise ValueError(f"validate.delivery_order: {order!r}; use generated or hardest")


Check = tuple[float | None, str, float]  # (value, ">=" or "<=", threshold)


def passes(value: float | None, op: str, threshold: float) -> bool:
    """A gate's verdict; a figure not measured (None or NaN) fails."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value >= threshold if op == ">=" else value <= threshold)


def privacy_checks(gates: GateConfig, privacy: dict) -> dict[str, Check]:
    """The two privacy gates' checks on validate's privacy figures (`figures.privacy`)."""
    return {
        "memorisation_ratio": (
            privacy.get("memorisation", {}).get("ratio"),
            "<=",
            gates.max_memorisation_ratio,
        ),
        # The stronger attack's upper bound: a small hold-out cannot pass on luck.
        "membership_auc": (membership_auc_high(privacy), "<=", gates.max_membership_auc),
    }


def evaluate_gates(gates: GateConfig, figures: dict) -> dict:
    """Each gate's threshold, value and verdict, and `passed` overall."""
    # Like with like: both FIDs with the train split's class mix where measured (the
    # generator is asked for more of the short classes than the real data holds).
    fid = figures.get("fid_class_matched", figures["fid"])
    floor = max(figures.get("fid_real_floor_class_matched", figures["fid_real_floor"]), 1e-6)
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
        **privacy_checks(gates, figures.get("privacy") or {}),
    }
    out: dict = {}
    for name, (value, op, threshold) in checks.items():
        if unjudged and name.startswith("utility_"):
            out[name] = {"value": None, "op": op, "threshold": threshold, "passed": True}
            out[name]["note"] = "the pool is full: no row to promote"
            continue
        out[name] = {"value": _round(value), "op": op, "threshold": threshold,
                     "passed": passes(value, op, threshold)}  # fmt: skip
    out["passed"] = all(g["passed"] for g in out.values())
    return out
