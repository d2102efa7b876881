"""Drift of the real data: the evaluator-space FID between the clean train split a run
started from and the one clean wrote after new data landed.

The flow takes a `DriftProbe` before the stages run and measures after clean reruns; above
`loop.drift_threshold` the generator's training state is not resumed (the distribution
moved). Returns None when there is no evaluator or split yet, infinity when the new split
has classes the old evaluator does not know.
"""

from __future__ import annotations

import torch

from synthloop.config import Params
from tasks.evaluator import load_evaluator
from tasks.images import ImageTensors, load_image_tensors
from tasks.metrics import frechet_distance


class DriftProbe:
    """Evaluator-space statistics of the clean train split, taken before new data lands,
    so the FID between the old and the new split can be measured after clean reruns."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.evaluator = None
        self.before = None
        evaluator_dir = params.validation.evaluator
        train = params.clean.output / "train"
        if (evaluator_dir / "weights.safetensors").is_file() and train.is_dir():
            self.evaluator = load_evaluator(evaluator_dir)
            self.before = self._features(load_image_tensors(train, self.evaluator.classes))

    def _features(self, data: ImageTensors) -> torch.Tensor:
        return self.evaluator.features(data.images)

    def measure(self) -> float | None:
        """FID between the split seen at start and the current one (None: no baseline)."""
        if self.evaluator is None:
            return None
        try:
            after = load_image_tensors(self.params.clean.output / "train", self.evaluator.classes)
        except ValueError:  # new classes: that is drift beyond measuring in the old space
            return float("inf")
        return float(frechet_distance(self.before, self._features(after)))
