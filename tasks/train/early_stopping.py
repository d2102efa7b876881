"""Early stopping on a validation score: which evaluation is the best, and when to stop.

Pure bookkeeping, no torch: the training loop (tasks/train/stage.py) scores its EMA weights every
train.eval_every steps and hands each (step, score) to `EarlyStopping.update`; it keeps the
weights of the evaluations that come back `improved`. Lower is better.

- An improvement is a finite score strictly below the best so far: a tie keeps the earlier
  step (fewer steps for the same score), and a NaN or infinite score never improves.
- After `patience` evaluations in a row without an improvement, `stop` is set; with
  `patience` 0 it never is (the best is still tracked).
- `state_dict()` / `load_state_dict()` carry the best, the counter, the stop flag and the
  curve through a checkpoint, so a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Decision:
    improved: bool  # this evaluation is the new best: keep its weights
    stop: bool  # patience is spent: end training now


@dataclass
class EarlyStopping:
    patience: int  # evaluations without improvement before stopping; 0: never stop
    best_step: int | None = None
    best_score: float | None = None
    bad_evaluations: int = 0  # since the last improvement
    stopped: bool = False
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, score), in order

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")

    def update(self, step: int, score: float) -> Decision:
        if self.stopped:
            raise RuntimeError(f"update at step {step} after stopping at {self.curve[-1][0]}")
        if self.curve and step <= self.curve[-1][0]:
            raise ValueError(f"steps must increase: {step} after {self.curve[-1][0]}")
        self.curve.append((step, score))
        improved = math.isfinite(score) and (self.best_score is None or score < self.best_score)
        if improved:
            self.best_step, self.best_score, self.bad_evaluations = step, score, 0
        else:
            self.bad_evaluations += 1
        self.stopped = bool(self.patience) and self.bad_evaluations >= self.patience
        return Decision(improved=improved, stop=self.stopped)

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "best_step": self.best_step,
            "best_score": self.best_score,
            "bad_evaluations": self.bad_evaluations,
            "stopped": self.stopped,
            "curve": [[step, score] for step, score in self.curve],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["patience"] != self.patience:
            raise ValueError(f"patience {state['patience']} in the state, {self.patience} here")
        self.best_step = state["best_step"]
        self.best_score = state["best_score"]
        self.bad_evaluations = int(state["bad_evaluations"])
        self.stopped = bool(state["stopped"])
        self.curve = [(int(step), float(score)) for step, score in state["curve"]]
