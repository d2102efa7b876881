"""The loop's policy over pass/fail sequences: rounds, attempts and the end state.

Each row feeds `decide` a sequence of gate outcomes (P: the attempt passed and promoted,
F: it failed) and checks what the run comes to. Two rows also run through the real flow
(tests/test_pipeline_integration.py)."""

from __future__ import annotations

import pytest

from flows.rounds import (
    Attempt,
    Finish,
    Next,
    decide,
    failed_gate_texts,
    nothing_promoted_reason,
)

GATE = "class_consistency 0.652 < 0.7"


def walk(sequence: str, max_rounds: int, max_retrains: int, full_after: int | None = None):
    """Run `decide` over the outcomes; returns (Finish, the attempts run as (round, attempt),
    how many outcomes were used)."""
    history: list[Attempt] = []
    ran = []
    while True:
        step = decide(history, max_rounds, max_retrains)
        if isinstance(step, Finish):
            return step, ran, len(history)
        assert isinstance(step, Next)
        assert step.retrain_step == step.attempt - 1
        assert len(history) < len(sequence), f"{sequence}: ran out of outcomes at {step}"
        passed = sequence[len(history)] == "P"
        promotions = sum(a.passed for a in history) + passed
        full = passed and full_after is not None and promotions >= full_after
        history.append(Attempt(step.round, step.attempt, passed, () if passed else (GATE,), full))
        ran.append((step.round, step.attempt))


NOTHING = f"no synthetic data promoted: gates failed ({GATE})"

# sequence, max_rounds, max_retrains, succeeded, promoted rounds, attempts run,
# params.yaml at the end (the (round, attempt) it ran with; None: the run's start), message
TABLE = [
    ("P", 1, 0, True, (1,), [(1, 1)], (1, 1), "promoted in round 1"),
    ("F", 1, 0, False, (), [(1, 1)], None, NOTHING + " after 1 attempt"),
    ("FP", 1, 1, True, (1,), [(1, 1), (1, 2)], (1, 2), "promoted in round 1"),
    ("FF", 1, 1, False, (), [(1, 1), (1, 2)], None, NOTHING + " after 2 attempts"),
    ("FFP", 1, 2, True, (1,), [(1, 1), (1, 2), (1, 3)], (1, 3), "promoted in round 1"),
    ("FFF", 1, 2, False, (), [(1, 1), (1, 2), (1, 3)], None, NOTHING + " after 3 attempts"),
    # The case: max_rounds 2 no longer turns two failed attempts into "completed".
    ("FFF", 2, 2, False, (), [(1, 1), (1, 2), (1, 3)], None, NOTHING + " after 3 attempts"),
    # A failed round ends the run: round 2 never starts on a spent retrain policy.
    ("F", 2, 0, False, (), [(1, 1)], None, NOTHING + " after 1 attempt"),
    ("PP", 2, 0, True, (1, 2), [(1, 1), (2, 1)], (2, 1), "promoted in rounds 1, 2"),
    (
        "PF",
        2,
        0,
        True,
        (1,),
        [(1, 1), (2, 1)],
        (1, 1),
        f"promoted in round 1; round 2 promoted nothing: gates failed ({GATE}) after 1 attempt",
    ),
    ("PFP", 2, 1, True, (1, 2), [(1, 1), (2, 1), (2, 2)], (2, 2), "promoted in rounds 1, 2"),
    (
        "PFF",
        3,
        1,
        True,
        (1,),
        [(1, 1), (2, 1), (2, 2)],
        (1, 1),
        f"promoted in round 1; round 2 promoted nothing: gates failed ({GATE}) after 2 attempts",
    ),
    (
        "FPFP",
        2,
        1,
        True,
        (1, 2),
        [(1, 1), (1, 2), (2, 1), (2, 2)],
        (2, 2),
        "promoted in rounds 1, 2",
    ),
    ("PPP", 3, 2, True, (1, 2, 3), [(1, 1), (2, 1), (3, 1)], (3, 1), "promoted in rounds 1, 2, 3"),
    ("P", 3, 2, True, (1,), [(1, 1)], (1, 1), "promoted in round 1"),  # see full_after below
]


@pytest.mark.parametrize(
    ("sequence", "max_rounds", "max_retrains", "succeeded", "promoted", "ran", "params", "message"),
    TABLE,
    ids=[f"{row[0]}-rounds{row[1]}-retrains{row[2]}" for row in TABLE],
)
def test_end_state_over_sequences(
    sequence, max_rounds, max_retrains, succeeded, promoted, ran, params, message
):
    full_after = 1 if (sequence, max_rounds) == ("P", 3) else None
    finish, attempts, used = walk(sequence, max_rounds, max_retrains, full_after)
    assert used == len(sequence), "every outcome of the row is consumed"
    assert finish.succeeded is succeeded
    assert finish.promoted_rounds == promoted
    assert attempts == ran and finish.attempts == len(ran)
    assert finish.params_from == params
    assert finish.message == message + ("; the pool is full" if full_after else "")
    # A run commits (versioning) exactly when it succeeded; max_rounds counts rounds.
    assert finish.rounds <= max_rounds
    assert all(a <= max_retrains + 1 for _, a in attempts)


def test_the_reason_the_run_ended():
    assert walk("PP", 2, 0)[0].reason == "max_rounds"
    assert walk("PF", 2, 0)[0].reason == "round_failed"
    assert walk("P", 3, 0, full_after=1)[0].reason == "pool_full"


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_rounds"):
        decide([], 0, 1)


def test_failed_gates_read_as_comparisons():
    gates = {
        "class_consistency": {"value": 0.652, "op": ">=", "threshold": 0.7, "passed": False},
        "fid_ratio": {"value": 12.0, "op": "<=", "threshold": 10.0, "passed": False},
        "near_copy_rate": {"value": 0.0, "op": "<=", "threshold": 0.1, "passed": True},
        "passed": False,
    }
    assert failed_gate_texts(gates) == (GATE, "fid_ratio 12.0 > 10.0")


def test_a_failed_attempt_with_nothing_to_change_ends_its_round():
    """The auto retrain policy found no change (`retrainable` False): no retry burns an
    attempt, even with retrains left; a promoted earlier round still stands."""
    stuck = Attempt(1, 1, False, (GATE,), retrainable=False)
    finish = decide([stuck], max_rounds=2, max_retrains=2)
    assert isinstance(finish, Finish) and not finish.succeeded
    assert finish.attempts == 1 and "the retrain policy found no change to try" in finish.message
    history = [Attempt(1, 1, True), Attempt(2, 1, False, (GATE,))]
    assert decide(history, 2, 2) == Next(2, 2)  # retrainable: the retry runs
    history.append(Attempt(2, 2, False, (GATE,), retrainable=False))
    finish = decide(history, 2, 2)
    assert finish.succeeded and finish.reason == "round_failed" and finish.params_from == (1, 1)


FULL = "every class at its target (1068 accepted rows over it)"


def test_a_pass_that_put_no_row_in_the_pool_is_not_a_promotion():
    """The issue's night 2: the gates passed, every class was at its target, 0 rows went in."""
    from flows.closed_loop import run_result

    finish = decide([Attempt(1, 1, True, pool_full=True, nothing_promoted=FULL)], 2, 2)
    assert finish.succeeded and finish.promoted_rounds == () and finish.params_from == (1, 1)
    assert finish.message == f"nothing promoted: {FULL}"
    assert run_result(finish) == "nothing promoted"
    # after a round that did promote, the empty round is named, not counted
    history = [Attempt(1, 1, True), Attempt(2, 1, True, pool_full=True, nothing_promoted=FULL)]
    finish = decide(history, 3, 0)
    assert finish.promoted_rounds == (1,) and run_result(finish) == "promoted"
    assert finish.message == f"promoted in round 1; round 2 promoted nothing: {FULL}"
    failed = decide([Attempt(1, 1, False, (GATE,))], 1, 0)
    assert run_result(failed) == "failed"


def test_why_nothing_was_promoted_reads_the_promotion():
    assert nothing_promoted_reason({"promoted": 3, "over_target": 5}) is None
    assert nothing_promoted_reason({"promoted": 0, "over_target": 1068, "already_in_pool": 0}) == (
        FULL
    )
    assert "already in the pool (4)" in nothing_promoted_reason(
        {"promoted": 0, "over_target": 0, "already_in_pool": 4}
    )
    assert nothing_promoted_reason({"promoted": 0}) == "no synthetic row was accepted"


def test_only_a_transient_stage_failure_is_retried():
    """flows/attempt.py's retry condition: DVC's held lock is retried, anything else is not."""
    from prefect.states import Completed, Failed

    from flows.attempt import StageFailed, _retry_if_transient

    def failed_with(err: Exception):
        return Failed(data=err)

    held = StageFailed("train", 1, "Unable to acquire lock", transient=True)
    broken = StageFailed("train", 1, "Traceback ...", transient=False)
    assert _retry_if_transient(None, None, failed_with(held)) is True
    assert _retry_if_transient(None, None, failed_with(broken)) is False
    assert _retry_if_transient(None, None, failed_with(FileNotFoundError("dvc"))) is False
    assert _retry_if_transient(None, None, Completed(data=1)) is False
