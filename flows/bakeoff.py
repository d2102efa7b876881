"""The family bake-off: every family of `loop.families` trained on the same fused data and
validated by the same utility protocol; the loop keeps the one whose samples help most.

- `rank_key(validation)` orders families: those that pass every gate first (only they can be
  promoted), then the lower bound of the decisive utility interval (the short classes when
  there are any, as the gate reads it), then fidelity (FID over the real floor, lower first).
- `bakeoff_row` is one family's line of the table, from the reports its stages wrote.
- `run_bakeoff` runs the families one after the other through a callable. A family whose
  stages fail is recorded with its error and the others go on.
  The table's `winner` is the best-ranked family that did not fail; None when all failed.

Plain functions: the flow (flows/attempt.py) supplies the callable that runs a family's DVC
stages. DVC's run cache keeps every family's outputs, so switching params.yaml back to the
winner restores its model, samples and report without training again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

# The table's columns, in order (the summary artifact and loop.json show these).
COLUMNS = (
    "family", "status", "steps", "best_step", "train_seconds", "sample_images_per_second",
    "fid", "fid_ratio", "precision", "recall", "coverage", "class_consistency",
    "utility_delta", "utility_low", "utility_high", "utility_verdict", "passed", "rank",
)  # fmt: skip

RankKey = tuple[bool, float, float]


def rank_key(validation: dict) -> RankKey:
    """Higher is better: (passed every gate, utility lower bound, -FID ratio). A missing
    figure ranks last on its part of the key."""
    gates = validation.get("gates") or {}
    delta = ((validation.get("utility") or {}).get("delta")) or {}
    low = delta.get("low")
    fid_ratio = (gates.get("fid_ratio") or {}).get("value")
    return (
        bool(validation.get("passed")),
        -math.inf if low is None else float(low),
        -math.inf if fid_ratio is None else -float(fid_ratio),
    )


def bakeoff_row(family: str, validation: dict, card: dict, generate: dict) -> dict[str, Any]:
    """One family's figures, from its validation report, model card and generate summary."""
    gates = validation.get("gates") or {}
    util = validation.get("utility") or {}
    delta = util.get("delta") or {}
    return {
        "family": family,
        "status": "ok",
        "model_version": card.get("model_version"),
        "steps": card.get("steps"),
        "best_step": card.get("best_step"),
        "train_seconds": card.get("train_seconds"),
        "sample_images_per_second": generate.get("sample_images_per_second"),
        "fid": validation.get("fid"),
        "fid_ratio": (gates.get("fid_ratio") or {}).get("value"),
        "precision": validation.get("precision"),
        "recall": validation.get("recall"),
        "coverage": validation.get("coverage"),
        "class_consistency": validation.get("class_consistency"),
        "utility_decisive": util.get("decisive"),
        "utility_delta": delta.get("mean"),
        "utility_low": delta.get("low"),
        "utility_high": delta.get("high"),
        "utility_verdict": util.get("verdict"),
        "passed": bool(validation.get("passed")),
        "failed_gates": [
            n for n, g in gates.items() if isinstance(g, dict) and not g.get("passed")
        ],
        "key": list(rank_key(validation)),
    }


def failed_row(family: str, error: BaseException) -> dict[str, Any]:
    """A family that failed: the error's first line for the table, the whole text (a stage
    failure carries the tail of DVC's output) for the record."""
    text = str(error).strip()
    return {
        "family": family,
        "status": "failed",
        "error": f"{type(error).__name__}: {text.splitlines()[0] if text else ''}",
        "detail": text,
        "passed": False,
    }


def run_bakeoff(
    families: Sequence[str], run_family: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """Each family through `run_family` (which returns its `bakeoff_row`), in order; a family
    that raises is recorded as failed and the next one runs. Returns the table, ranked,
    and the winner (None when every family failed)."""
    rows: list[dict[str, Any]] = []
    for family in families:
        try:
            rows.append(run_family(family))
        except Exception as err:  # noqa: BLE001 (one family's failure must not stop the rest)
            rows.append(failed_row(family, err))
    ranked = sorted(
        (r for r in rows if r["status"] == "ok"), key=lambda r: tuple(r["key"]), reverse=True
    )
    for rank, row in enumerate(ranked, start=1):
        row["rank"] = rank
    best = ranked[0]["family"] if ranked else None
    return {
        "families": list(families),
        "rows": rows,
        "winner": best,
        "rule": "gates passed, then the utility interval's lower bound, then FID / floor",
    }


def ranking(table: dict[str, Any]) -> list[tuple[str, RankKey]]:
    """(family, key) of the families that ran, best first."""
    ok = [r for r in table.get("rows", []) if r.get("status") == "ok"]
    return [(r["family"], tuple(r["key"])) for r in sorted(ok, key=lambda r: r["rank"])]
