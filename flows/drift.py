"""Drift of the real data: the evaluator-space FID between the clean train split a run
started from and the one clean wrote after new data landed.

The flow takes a `DriftProbe` before the stages run and measures once clean reran; above
`loop.drift_threshold` the generator's training state is not resumed and the pool built
from the old data is retired (flows/attempt.py). `measure()` returns None when there is no
evaluator or split yet, and infinity, never an error, when the old evaluator cannot embed
the new split: other classes, another image size or channel count, or no rows. `reason`
then says which. A split the evaluator already could not embed at the start (a run that
stopped after clean) is drift beyond measuring too: `moved_at_start` says why.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synthloop.config import Params
from tasks.shared.evaluator import Evaluator, load_evaluator
from tasks.shared.images import load_image_tensors
from tasks.shared.metrics import frechet_distance
from tasks.shared.pool import describe_sizes, image_sizes


class Unmeasurable(ValueError):
    """The evaluator cannot embed a split: the data moved beyond what FID can measure."""


def embed(evaluator: Evaluator, directory: Path) -> torch.Tensor:
    """The evaluator's features of a clean train split; Unmeasurable when it cannot embed
    it."""
    expected = {(evaluator.size, evaluator.size, evaluator.channels)}
    found = image_sizes(directory)
    if not found:
        raise Unmeasurable(f"the clean train split is empty ({directory})")
    if found != expected:  # checked on the small columns: nothing is decoded in vain
        raise Unmeasurable(
            f"image size changed: the evaluator embeds {describe_sizes(expected)}, the clean "
            f"train split holds {describe_sizes(found)}"
        )
    try:
        data = load_image_tensors(directory, evaluator.classes)
    except ValueError as err:  # new classes: beyond measuring in the old space
        raise Unmeasurable(f"classes changed: {err}") from err
    return evaluator.features(data.images)


class DriftProbe:
    """Evaluator-space statistics of the clean train split, taken before new data lands,
    so the FID between the old and the new split can be measured after clean reruns."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.evaluator: Evaluator | None = None
        self.before: torch.Tensor | None = None
        self.moved_at_start: str | None = None
        self.reason: str | None = None  # why the last measure() was infinite
        evaluator_dir = params.validation.evaluator
        train = params.clean.output / "train"
        if (evaluator_dir / "weights.safetensors").is_file() and train.is_dir():
            self.evaluator = load_evaluator(evaluator_dir)
            try:
                self.before = embed(self.evaluator, train)
            except Unmeasurable as err:  # clean already wrote other data than it knows
                self.moved_at_start = str(err)

    def measure(self) -> float | None:
        """FID between the split seen at start and the current one (None: no baseline;
        infinity: not measurable in the old evaluator's space, `reason` says why)."""
        if self.evaluator is None:
            return None
        self.reason = self.moved_at_start
        if self.before is None:
            return float("inf")
        try:
            after = embed(self.evaluator, self.params.clean.output / "train")
        except Unmeasurable as err:
            self.reason = str(err)
            return float("inf")
        return float(frechet_distance(self.before, after))
