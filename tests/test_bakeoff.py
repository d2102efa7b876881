"""The family bake-off's ranking and its table, from constructed validation reports."""

from __future__ import annotations

import pytest

from flows.bakeoff import bakeoff_row, rank_key, ranking, run_bakeoff
from flows.summaries import bakeoff_table_markdown, loop_summary_markdown
from synthloop.config import ConfigError, LoopConfig


def report(passed: bool, low: float | None, fid_ratio: float | None) -> dict:
    """A validation report with the figures the ranking reads."""
    gates = {"utility_lower_bound": {"value": low, "passed": passed}}
    if fid_ratio is not None:
        gates["fid_ratio"] = {"value": fid_ratio, "passed": True}
    utility = {} if low is None else {"delta": {"mean": low + 0.02, "low": low, "high": 0.1}}
    return {"passed": passed, "gates": gates, "utility": utility, "fid": 3.0}


def row(family: str, validation: dict) -> dict:
    card = {"steps": 100, "best_step": 50, "train_seconds": 1.5, "model_version": family}
    return bakeoff_row(family, validation, card, {"sample_images_per_second": 900.0})


def test_gates_then_the_utility_lower_bound_then_fidelity_decide():
    reports = {
        "cgan": report(False, 0.05, 1.2),  # the best utility, but it fails a gate
        "vae": report(True, -0.01, 1.5),
        "diffusion": report(True, 0.01, 3.0),  # passes, and the best lower bound of those
        "transformer": report(True, 0.01, 2.0),  # ties diffusion; better FID ratio
    }
    table = run_bakeoff(list(reports), lambda f: row(f, reports[f]))
    assert table["winner"] == "transformer"
    assert [f for f, _ in ranking(table)] == ["transformer", "diffusion", "vae", "cgan"]
    assert rank_key(reports["transformer"]) == (True, 0.01, -2.0)
    # A report without utility or FID ranks last on those parts, not first.
    assert rank_key(report(True, None, None)) < rank_key(reports["vae"])


def test_a_family_that_fails_is_recorded_and_the_others_still_run():
    ran: list[str] = []

    def run_family(family: str) -> dict:
        ran.append(family)
        if family == "vae":
            raise RuntimeError("stage 'train' failed (permanent, exit 1):\nout of memory")
        return row(family, report(False, {"cgan": -0.02, "diffusion": 0.0}[family], 2.0))

    table = run_bakeoff(["cgan", "vae", "diffusion"], run_family)
    assert ran == ["cgan", "vae", "diffusion"]
    failed = [r for r in table["rows"] if r["status"] == "failed"]
    assert [r["family"] for r in failed] == ["vae"]
    assert "out of memory" not in failed[0]["error"]  # the first line of the error only
    assert failed[0]["error"].startswith("RuntimeError: stage 'train' failed")
    assert table["winner"] == "diffusion" and "rank" not in failed[0]
    markdown = bakeoff_table_markdown(table)
    assert "**diffusion** wins" in markdown and "| vae | FAILED: RuntimeError" in markdown


def test_no_winner_when_every_family_fails():
    def run_family(family: str) -> dict:
        raise ValueError(f"{family} refused")

    table = run_bakeoff(["cgan", "vae"], run_family)
    assert table["winner"] is None and ranking(table) == []


def test_the_loop_summary_shows_the_bakeoff_and_each_retrain_reason():
    table = run_bakeoff(["cgan", "vae"], lambda f: row(f, report(False, -0.1, 1.0)))
    attempt = {"round": 1, "passed": False, "validation": {}, "params": {}}
    loop = {
        "result": "failed",
        "message": "no synthetic data promoted",
        "attempts": [
            {**attempt, "attempt": 1, "params": {"train": {"family": "cgan"}}},
            {**attempt, "attempt": 2, "retrain_reason": "switch to vae"},
        ],
        "bakeoff": table,
    }
    markdown = loop_summary_markdown(loop)
    assert "| 1 | 1 | cgan | FAIL |" in markdown
    assert "round 1 attempt 2: switch to vae" in markdown
    assert "Family bake-off" in markdown


@pytest.mark.parametrize("families", [["cgan"], ["cgan", "vae", "cgan"], ["cgan", "gan"]])
def test_a_bakeoff_needs_two_distinct_known_families(families):
    from synthloop.config import parse_params

    with pytest.raises(ConfigError, match="loop.families"):
        parse_params(
            {"ingest": {"sources": [{"kind": "demo"}]}, "loop": {"families": families}},
            root=".",
            check_paths=False,
        )
    assert LoopConfig.model_fields["families"].default_factory() == []
