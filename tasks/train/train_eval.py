"""The validation score of a generator while it trains: KID against the real val split,
plus the share of the samples validate would reject for their class.

`FixedBatchScorer` is built once per run (on the rank that evaluates): it loads the
evaluator (train.evaluator, the train_evaluator stage's model) and the real val split
(train.val_data), and computes the val features once. Each `score(family)` then samples
the same batch from the family's EMA weights (`Family.sample`) - eval_per_class images of
every class, noise from a CPU generator seeded with derive_seed(seed, "eval") afresh each
time - converts it to uint8 as generate does, and scores it with the code validate uses:
the evaluator's features (`Evaluator.features`) and `tasks.shared.metrics.fid_kid_features`.

The score adds to the KID the share of the batch whose evaluator confidence in its intended
class is below validate.min_confidence: the samples validate would reject, so the loop
could not use them. KID alone is blind to labels: a checkpoint drawing convincing digits of
the wrong class scores well on it. On the long-tailed default such a checkpoint (step 500:
KID 0.075, best) drew no acceptable 8 and about half of the other short classes, where the
last one (KID 0.129) drew 74-84% of them; for a class-conditional generator whose users
come for the short classes, the label is half of what is measured. Both parts are lower-is-
better shares of the same batch, and each is kept in eval.csv and the card's curve.

The KID part (lower is better): with ~150 val images and a few hundred samples, FID
is biased upwards by an amount that depends on the sample sizes (its covariance estimates
are noisy at n close to the feature dimension); KID's estimator is unbiased at any n, and
its subsets are drawn from the same seed at every evaluation, so two evaluations differ
only by the weights. The fixed noise makes consecutive scores a paired comparison.

The class mix is uniform (the generator is asked for every class equally), while the val
split keeps the data's long tail: that offset is the same at every evaluation, so it does
not move the choice of the best step. Nothing here touches the training random streams:
sampling draws from its own generator, the KID subsets from a forked RNG.

`evaluate` is what the training loop calls at an evaluation step: score (rank 0), update the
`Evaluations` (early stopping, a CPU copy of the best export weights; checkpointed with the
run) and, under DDP, broadcast the stop decision. `write_curve` writes eval.csv.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from synthloop.dataset import atomic_file, file_hash
from tasks.shared.evaluator import CONFIG, WEIGHTS, load_evaluator
from tasks.shared.generators.base import Family, derive_seed
from tasks.shared.images import dataset_version, load_image_tensors, to_uint8
from tasks.shared.metrics import fid_kid_features
from tasks.train.early_stopping import EarlyStopping

log = logging.getLogger(__name__)

METRIC = "score"  # what early stopping minimises: PARTS summed
PARTS = ("kid", "rejected")


def check_inputs(evaluator: Path, val_data: Path) -> None:
    """A clear error before any training when what the evaluation reads is missing."""
    if not (evaluator / WEIGHTS).is_file() or not (evaluator / CONFIG).is_file():
        raise FileNotFoundError(
            f"{evaluator}: no evaluator model here (train.evaluator); run the train_evaluator "
            "stage first, or set train.eval_every: 0 to train without evaluation"
        )
    if not val_data.is_dir():
        raise FileNotFoundError(
            f"{val_data}: no real val split here (train.val_data); run the clean stage first, "
            "or set train.eval_every: 0 to train without evaluation"
        )


def inputs_version(evaluator: Path, val_data: Path, min_confidence: float) -> str:
    """What the scores depend on besides the weights: the evaluator, the val split and the
    confidence under which a sample counts as rejected."""
    return f"evaluator {file_hash(evaluator / WEIGHTS, digest_size=8)}, " + (
        f"val {dataset_version(val_data)}, rejected under {min_confidence:g}"
    )


class FixedBatchScorer:
    """KID of a fixed, seeded batch of samples against the real val split, and the share of
    the batch the evaluator gives its intended class less than `min_confidence`."""

    def __init__(
        self,
        evaluator: Path,
        val_data: Path,
        num_classes: int,
        per_class: int,
        seed: int,
        device: torch.device,
        sample_batch: int,
        min_confidence: float,
    ) -> None:
        check_inputs(evaluator, val_data)
        self.evaluator = load_evaluator(evaluator, device)
        val = load_image_tensors(val_data, classes=self.evaluator.classes)
        if len(val) < 2:
            raise ValueError(f"{val_data}: the val split needs 2 images at least, has {len(val)}")
        self.val_features = self.evaluator.features(val.images)
        self.labels = torch.arange(num_classes).repeat_interleave(per_class)
        self.seed = derive_seed(seed, "eval")
        self.sample_batch = sample_batch
        self.min_confidence = min_confidence

    def check_images(self, channels: int, size: int) -> None:
        shape = (self.evaluator.channels, self.evaluator.size)
        if shape != (channels, size):
            raise ValueError(
                f"the evaluator takes {shape[0]}-channel {shape[1]}px images, the training "
                f"data is {channels}-channel {size}px: retrain the evaluator on this data"
            )

    @torch.no_grad()
    def samples(self, family: Family) -> torch.Tensor:
        """The fixed batch, uint8 on the CPU: the same labels and noise at every call."""
        generator = torch.Generator().manual_seed(self.seed)
        chunks = [
            to_uint8(family.sample(self.labels[lo : lo + self.sample_batch], generator)).cpu()
            for lo in range(0, len(self.labels), self.sample_batch)
        ]
        return torch.cat(chunks)

    def measure(self, family: Family) -> dict[str, float]:
        """Each of PARTS for the fixed batch."""
        features = self.evaluator.features(self.samples(family))
        _, kid, _ = fid_kid_features(self.val_features, features, seed=self.seed)
        probabilities = self.evaluator.probabilities_of_features(features)
        intended = probabilities[torch.arange(len(features)), self.labels]
        return {"kid": kid, "rejected": float((intended < self.min_confidence).float().mean())}


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    """step, score and its parts per evaluation (a header alone without evaluation), for
    `dvc plots show`."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", METRIC, *PARTS])
        for point in curve:
            values = [point.get(key) for key in (METRIC, *PARTS)]
            writer.writerow([point["step"], *("" if v is None else f"{v:.8g}" for v in values)])


def figure(value: float | None) -> float | None:
    """A score for the card: 8 significant digits (as eval.csv has it; a KID can be 1e-6);
    None for a missing or non-finite one (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.8g}")


@dataclass
class Evaluations:
    """The evaluations so far: the early-stopping bookkeeping, each evaluation's parts, the
    best export weights (a CPU copy; rank 0 alone scores, so only it holds them) and the
    seconds spent. Part of every checkpoint."""

    stopping: EarlyStopping
    best_weights: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0
    parts: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> PARTS

    def state_dict(self) -> dict[str, Any]:
        return {
            "stopping": self.stopping.state_dict(),
            "best_weights": self.best_weights,
            "seconds": self.seconds,
            "parts": self.parts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopping.load_state_dict(state["stopping"])
        self.best_weights = state["best_weights"]
        self.seconds = float(state["seconds"])
        self.parts = dict(state.get("parts") or {})

    def curve(self) -> list[dict[str, float | None]]:
        """One point per evaluation: step, score and its parts (8 significant digits)."""
        return [
            {"step": step, METRIC: figure(score)}
            | {key: figure(self.parts.get(step, {}).get(key)) for key in PARTS}
            for step, score in self.stopping.curve
        ]


def evaluate(
    step: int,
    family: Family,
    scorer: FixedBatchScorer | None,
    evals: Evaluations,
    device: torch.device,
    world: int,
) -> bool:
    """Score the EMA weights (rank 0, which holds the scorer) and keep a copy when they are
    the best so far. Returns the stop decision, the same on every rank: rank 0 broadcasts
    it, one small tensor per evaluation (the other ranks wait for it meanwhile)."""
    stop = False
    if scorer is not None:
        began = time.perf_counter()
        parts = scorer.measure(family)
        score = sum(parts[key] for key in PARTS)
        evals.parts[step] = parts
        decision = evals.stopping.update(step, score)
        if decision.improved:  # clone: on the CPU export_state shares the live EMA storage
            evals.best_weights = {k: v.clone() for k, v in family.export_state().items()}
        evals.seconds += time.perf_counter() - began
        log.info(
            "eval step %d: %s %.6g (%s)%s", step, METRIC, score,
            ", ".join(f"{key} {parts[key]:.6g}" for key in PARTS),
            "  (best)" if decision.improved else "",
        )  # fmt: skip
        stop = decision.stop
    if world > 1:
        flag = torch.tensor([int(stop)], device=device)  # nccl needs it on the GPU
        dist.broadcast(flag, src=0)
        stop = bool(flag.item())
        evals.stopping.stopped |= stop  # the other ranks' cards say so too
    return stop
