"""The loop's policy: rounds and attempts, decided by one pure function over the records.

- An *attempt* runs the stages and the gates once.
- A *round* is one or more attempts. An attempt that passes the gates promotes its accepted
  rows and ends the round. A failed attempt is retried with the retrain policy's next change,
  at most `loop.max_retrains` times within the round, and only while the retrain policy has
  a change to try (`Attempt.retrainable`; flows/retrain.py); the first attempt of every
  round runs with params.yaml as it stands. A round whose attempts run out has failed, and
  it ends the run: the retrain policy is spent.
- After a promotion the next round starts, up to `loop.max_rounds` rounds, unless the pool
  is full (`loop.target_per_class`, `loop.max_pool_rows`).
- The words match the rows: an attempt that passed but put no row into the pool (every
  class at its target, every accepted row already pooled) records why (`nothing_promoted`);
  its round is not a promoted round, and a run whose passing rounds all promoted nothing
  ends "nothing promoted: <why>", not "promoted".

The end state is the truth:
- a run whose gates passed in some round succeeded: its params.yaml is the one the last
  passing attempt ran with (later retrain overrides are undone) and it is versioned; it
  promoted, or says why nothing was promoted;
- a run whose gates never passed failed: params.yaml goes back to what the run started
  from, nothing is versioned, and "nothing to do" never treats it as done.
The flow feeds `decide` the records so far and does what it returns; the table test in
tests/test_rounds.py walks it through pass/fail sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    """What one attempt came to: the gates, and whether the pool is full after it."""

    round: int
    attempt: int  # within its round: 1, then 2 for retrain step 1, ...
    passed: bool
    failed_gates: tuple[str, ...] = ()  # e.g. "class_consistency 0.652 < 0.7"
    pool_full: bool = False
    retrainable: bool = True  # False: the retrain policy has no change to try after it
    # A passed attempt that put no row into the pool: why (None: it promoted rows, or failed).
    nothing_promoted: str | None = None

    @property
    def promoted(self) -> bool:
        return self.passed and self.nothing_promoted is None


@dataclass(frozen=True)
class Next:
    """Run this attempt next."""

    round: int
    attempt: int

    @property
    def retrain_step(self) -> int:
        """The step of `loop.retrain` to apply first (0: none, params.yaml as it stands)."""
        return self.attempt - 1


@dataclass(frozen=True)
class Finish:
    """The run is over; this is its end state."""

    succeeded: bool  # some round passed its gates
    reason: str  # "max_rounds" | "pool_full" | "round_failed"
    rounds: int
    attempts: int
    promoted_rounds: tuple[int, ...]  # rounds that put rows into the pool
    params_from: tuple[int, int] | None  # (round, attempt) whose params stay; None: the start
    message: str


def decide(history: Sequence[Attempt], max_rounds: int, max_retrains: int) -> Next | Finish:
    """The next attempt to run, or the end of the run, given the attempts so far."""
    if max_rounds < 1 or max_retrains < 0:
        raise ValueError(
            f"max_rounds must be >= 1 and max_retrains >= 0, got {max_rounds}, {max_retrains}"
        )
    if not history:
        return Next(1, 1)
    last = history[-1]
    if last.passed:
        if last.pool_full:
            return _finish(history, "pool_full")
        if last.round >= max_rounds:
            return _finish(history, "max_rounds")
        return Next(last.round + 1, 1)
    if last.attempt <= max_retrains and last.retrainable:
        return Next(last.round, last.attempt + 1)
    return _finish(history, "round_failed")


def _finish(history: Sequence[Attempt], reason: str) -> Finish:
    passed = [a for a in history if a.passed]
    rounds = tuple(a.round for a in passed if a.promoted)
    last = history[-1]
    gates = f"gates failed ({'; '.join(last.failed_gates) or 'see the validation report'})"
    tries = f"{last.attempt} attempt{'s' if last.attempt > 1 else ''}"
    if not last.passed and not last.retrainable:
        tries += " (the retrain policy found no change to try)"
    if not passed:
        message = f"no synthetic data promoted: {gates} after {tries}"
    elif not rounds:
        message = f"nothing promoted: {passed[-1].nothing_promoted}"
    else:
        message = f"promoted in round{'s' if len(rounds) > 1 else ''} " + ", ".join(
            map(str, rounds)
        )
        if last.passed and not last.promoted:
            message += f"; round {last.round} promoted nothing: {last.nothing_promoted}"
        elif reason == "pool_full":
            message += "; the pool is full"
        elif reason == "round_failed":
            message += f"; round {last.round} promoted nothing: {gates} after {tries}"
    return Finish(
        succeeded=bool(passed),
        reason=reason,
        rounds=last.round,
        attempts=len(history),
        promoted_rounds=rounds,
        params_from=(passed[-1].round, passed[-1].attempt) if passed else None,
        message=message,
    )


def nothing_promoted_reason(promotion: dict) -> str | None:
    """Why a promotion put no row into the pool, in words (None: it promoted rows)."""
    if promotion.get("promoted"):
        return None
    over, known = promotion.get("over_target", 0), promotion.get("already_in_pool", 0)
    if over:
        return f"every class at its target ({over} accepted rows over it)"
    if known:
        return f"every accepted row is already in the pool ({known})"
    return "no synthetic row was accepted"


def failed_gate_texts(gates: dict) -> tuple[str, ...]:
    """`name value < threshold` for each failed gate of a validation report's `gates`."""
    flip = {">=": "<", "<=": ">"}
    return tuple(
        f"{name} {g.get('value')} {flip.get(g.get('op'), '!')} {g.get('threshold')}"
        for name, g in gates.items()
        if name != "passed" and isinstance(g, dict) and not g.get("passed")
    )
