"""Early stopping on scripted score sequences: the best evaluation, ties, NaN, patience."""

from __future__ import annotations

import math

import pytest

from tasks.train.early_stopping import EarlyStopping


def run(patience: int, scores: list[float], every: int = 10) -> tuple[EarlyStopping, list]:
    """Feed scores at steps every, 2 every, ... until told to stop; (stopper, decisions)."""
    stopper, decisions = EarlyStopping(patience), []
    for i, score in enumerate(scores, start=1):
        decisions.append(stopper.update(i * every, score))
        if decisions[-1].stop:
            break
    return stopper, decisions


def test_the_lowest_score_is_the_best_and_patience_counts_evaluations_since_it() -> None:
    stopper, decisions = run(2, [5.0, 3.0, 4.0, 2.0, 2.5, 2.2, 1.0])
    assert [d.improved for d in decisions] == [True, True, False, True, False, False]
    assert [d.stop for d in decisions] == [False] * 5 + [True]
    assert (stopper.best_step, stopper.best_score) == (40, 2.0)
    assert stopper.stopped and stopper.bad_evaluations == 2
    assert stopper.curve == [(10, 5.0), (20, 3.0), (30, 4.0), (40, 2.0), (50, 2.5), (60, 2.2)]


def test_a_tie_is_no_improvement_so_the_earlier_step_stays_best() -> None:
    stopper, decisions = run(2, [3.0, 1.0, 1.0, 1.0, 0.5])
    assert [d.improved for d in decisions] == [True, True, False, False]
    assert (stopper.best_step, stopper.best_score, stopper.stopped) == (20, 1.0, True)


def test_nan_and_infinite_scores_never_improve_and_count_against_patience() -> None:
    stopper, decisions = run(3, [math.nan, 2.0, math.nan, math.inf, -math.inf, 1.0])
    assert [d.improved for d in decisions] == [False, True, False, False, False]
    assert (stopper.best_step, stopper.best_score, stopper.stopped) == (20, 2.0, True)
    # all NaN: no best at all; the caller then keeps the last weights
    stopper, _ = run(0, [math.nan] * 4)
    assert (stopper.best_step, stopper.best_score, stopper.stopped) == (None, None, False)


def test_patience_zero_never_stops_but_still_tracks_the_best() -> None:
    stopper, decisions = run(0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert len(decisions) == 6 and not any(d.stop for d in decisions)
    assert (stopper.best_step, stopper.best_score, stopper.bad_evaluations) == (10, 1.0, 5)


def test_patience_one_stops_at_the_first_evaluation_without_improvement() -> None:
    stopper, decisions = run(1, [3.0, 2.0, 2.0, 1.0])
    assert len(decisions) == 3 and decisions[-1].stop
    assert stopper.best_step == 20


def test_a_restored_state_decides_as_the_uninterrupted_one() -> None:
    scores = [4.0, 2.0, 3.0, 3.5, 1.0, 1.5, 1.6, 1.7]
    whole, _ = run(3, scores)
    first, _ = run(3, scores[:4])
    resumed = EarlyStopping(3)
    resumed.load_state_dict(first.state_dict())
    for i, score in enumerate(scores[4:], start=5):
        if resumed.update(i * 10, score).stop:
            break
    assert resumed.state_dict() == whole.state_dict()
    assert (whole.best_step, whole.stopped, whole.curve[-1][0]) == (50, True, 80)
    with pytest.raises(ValueError, match="patience 3 in the state"):
        EarlyStopping(2).load_state_dict(first.state_dict())


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="patience must be >= 0"):
        EarlyStopping(-1)
    stopper = EarlyStopping(1)
    stopper.update(10, 1.0)
    with pytest.raises(ValueError, match="steps must increase"):
        stopper.update(10, 0.5)
    stopper.update(20, 2.0)
    with pytest.raises(RuntimeError, match="after stopping"):
        stopper.update(30, 0.1)
