"""Utility: does the accepted synthetic data make a downstream classifier better than what
the user already has?

Every arm trains on the real images the generator trained on (the clean train split) and is
scored on the real test split, with the same number of optimizer steps whatever its size.

The *baseline* is the best of what the user already has, chosen as the user would choose
it, on the val split (overall accuracy, seed 0; the test split never chooses anything): a
`Recipe` of the menu `RECIPES`, {real, real+aug} x {class-balanced draws, logit-adjusted
loss}:
- `real+aug` applies the project's augment policy on the fly, `real` none (an augmentation
  that hurts is not a baseline to beat);
- `balanced` draws every class equally often; `logit-adjusted` draws rows as they come and
  trains on the logit-adjusted loss (Menon et al., ICLR 2021; tasks/shared/evaluator.py): the two
  cheap remedies a user with a long tail has, so synthetic rows must beat the better one,
  not an imbalanced classifier.
Ties go to the simpler recipe (earlier in `RECIPES`: no augmentation, balanced draws before
a changed loss): what val cannot tell apart is not one a user could be sure of.
`baseline+synthetic` is the same choice plus the synthetic rows the user has once this
round is promoted, and no others (drawn at most `validate.utility_synthetic_share` of their
class's draws). tasks/validate/stage.py gathers them: the pool rows fuse mixes in now (the
fused set's synthetic rows) and the accepted rows promotion would add
(`tasks.shared.pool.select_for_pool`: ids new to the pool, within each class's room to its pool
target and the pool's total room, in the accepted set's order). Fuse mixes in at most a class's
target and promotion fills at most its room, so these are the rows fuse reads after the promotion;
accepted rows past a target or already pooled are not scored. The pool already delivered is in the
arm because the user trains on real + pool: the verdict is on that set against the real data alone
(the baseline holds no synthetic row), so new rows that would make the pool worse show as a
smaller gain, and a class at its target is scored on what it holds. `delivered_per_class`
reports the arm's synthetic rows per class. When promotion would take no row, nothing is
trained (`nothing_to_score`): the verdict is `no evidence` and `verdict_text` says why.
A class at its pool target is refreshed rather than frozen: when new accepted rows would
replace its oldest pooled rows, the arm with the replacement (`refreshed`) trains on the
same seeds too, and replaces the synthetic arm only when its decisive mean is at least the
arm's (`refresh` reports the paired difference and the choice).
The recipes not chosen and `tstr` (train on the arm's synthetic rows, test on real, with the
chosen recipe's remedy and no augmentation) are reported for reference, on seed 0.
The two main arms are paired over `validate.utility_seeds` seeds: seed s gives both the same
initial weights and augmentation stream. The per-seed delta (accuracy of the second minus
the first) gives a mean and a 95% Student-t interval, overall, per class, and on the *short
classes*: those with fewer real training images than `validate.short_class_share` of the
largest class, the ones users come for. The verdict reads the interval: `helped` when its
lower bound is above 0, `hurt` when its upper bound is below 0, else `no evidence`.

A verdict is only as fine as its test split: each figure reports its test images and the
accuracy points one of them is worth (100 / images). When one image is worth more than
`validate.utility_max_points_per_test_image` (the one owner of that rule), the test split
cannot resolve a gain: the verdict is `no evidence`, whatever the interval, and
`verdict_text` says why (the split keeps short classes' training images, so their test
split may be small; clean's report gives it per class).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from synthloop.config import ValidateConfig
from tasks.shared.images import ImageTensors, concat
from tasks.shared.metrics import round_figure as _round


@dataclass(frozen=True)
class Recipe:
    """How an arm's classifier trains: with the augment policy or not, and which remedy for
    a long tail (`balanced` draws, or the `logit-adjusted` loss on rows drawn as they come)."""

    augment: bool
    remedy: str = "balanced"  # "balanced" | "logit-adjusted"

    @property
    def name(self) -> str:
        return f"{'real+aug' if self.augment else 'real'}, {self.remedy}"


# The menu a user has without synthetic data, simplest first (ties go to the earlier one).
RECIPES = tuple(Recipe(a, r) for r in ("balanced", "logit-adjusted") for a in (False, True))

# An arm's classifier: (training set, seed, recipe) -> its predictions (val, test). One
# with a `submit` method of the same arguments returning a Future is used through it.
Predictions = tuple[torch.Tensor, torch.Tensor]
Trainer = Callable[[ImageTensors, int, Recipe], Predictions]
MAX_POINTS_PER_TEST_IMAGE: float = ValidateConfig.model_fields[
    "utility_max_points_per_test_image"
].default
PROTOCOL = (
    "paired seeds; every arm trains on the clean train split; the baseline is the recipe of "
    "{real, real+aug (the augment policy on the fly)} x {class-balanced draws, logit-adjusted "
    "loss} that scores highest on val; the synthetic arm uses the same recipe and adds the "
    "synthetic rows the user has after this promotion: the pool rows fuse mixes in and the "
    "accepted rows promotion would add (at most validate.utility_synthetic_share of a "
    "class's draws); scored on the real test split"
)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None: too few seeds for an interval
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return {
            "mean": _round(self.mean),
            "low": _round(self.low),
            "high": _round(self.high),
            "seeds": self.n,
        }


def t_interval(values: list[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean and two-sided Student-t interval of paired per-seed differences."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return Interval(float("nan"), None, None, 0)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, None, None, len(x))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x))


def verdict(interval: Interval) -> str:
    if interval.low is not None and interval.low > 0:
        return "helped"
    if interval.high is not None and interval.high < 0:
        return "hurt"
    return "no evidence"


@dataclass(frozen=True)
class Resolution:
    """What a test split of `test_images` can tell apart: one image is `points` of accuracy."""

    test_images: int
    max_points: float

    @property
    def points(self) -> float | None:
        return 100 / self.test_images if self.test_images else None

    @property
    def resolves(self) -> bool:
        return self.points is not None and self.points <= self.max_points

    def as_dict(self) -> dict:
        points = self.points
        return {
            "test_images": self.test_images,
            "points_per_test_image": None if points is None else round(points, 2),
            "resolves": self.resolves,
        }


def resolved_verdict(interval: Interval, resolution: Resolution) -> str:
    """The interval's verdict where the test split can resolve a gain, else `no evidence`."""
    return verdict(interval) if resolution.resolves else "no evidence"


def verdict_text(name: str, reading: str, resolution: Resolution) -> str:
    """The verdict in words with the resolution behind it; `name` says whose test split
    ("the short classes'", "the")."""
    n, points = resolution.test_images, resolution.points
    if points is None:
        return f"no evidence: {name} test split has no images"
    size = f"{name} test split has {n} images ({points:.1f} points each)"
    if resolution.resolves:
        return f"{reading}: {size}"
    return (
        f"no evidence: {size}, too few to resolve a gain (at most "
        f"{resolution.max_points:g} points an image, validate.utility_max_points_per_test_image)"
    )


def short_classes(train_counts: dict[str, int], share: float) -> list[str]:
    """Classes with fewer real training images than `share` of the largest class."""
    if not train_counts:
        return []
    largest = max(train_counts.values())
    return sorted(c for c, n in train_counts.items() if n < share * largest)


def accuracy_of(
    pred: torch.Tensor, labels: torch.Tensor, classes: list[int] | None = None
) -> float:
    """Accuracy over the test rows whose label is in `classes` (all rows: None)."""
    mask = torch.ones_like(labels, dtype=torch.bool)
    if classes is not None:
        mask = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    if not mask.any():
        return float("nan")
    return float((pred[mask] == labels[mask]).float().mean())


def run_now(trainer: Trainer) -> Callable[[ImageTensors, int, bool], Future[Predictions]]:
    """`trainer` as a `submit` that trains at once and returns the finished Future."""

    def submit(data: ImageTensors, seed: int, recipe: Recipe) -> Future[Predictions]:
        done: Future[Predictions] = Future()
        done.set_result(trainer(data, seed, recipe))
        return done

    return submit


def trainings(seeds: int, refresh: bool = False) -> int:
    """Classifiers `compare_arms` trains: both main arms per seed (seed 0's baseline is one
    of the val candidates), the refreshed arm per seed when there is one, the candidates
    not chosen, and tstr."""
    return (3 if refresh else 2) * seeds + len(RECIPES)


def compare_arms(
    train: ImageTensors,
    synthetic: ImageTensors,
    val_labels: torch.Tensor,
    test_labels: torch.Tensor,
    trainer: Trainer,
    seeds: list[int],
    short_share: float,
    max_points_per_test_image: float = MAX_POINTS_PER_TEST_IMAGE,
    refreshed: ImageTensors | None = None,
) -> dict:
    """The protocol above, for any `trainer`; returns the report's `utility` section.
    `synthetic`: the rows the synthetic arm adds to `train`.

    `refreshed`: the same rows with a full class's oldest pooled rows replaced by new ones
    (tasks/shared/pool.py `plan_refresh`). It trains on the same seeds and recipe, and is paired
    with the `synthetic` arm on the decisive figure: kept when its mean is at least the
    arm's (at least as good), and then it is the synthetic arm the verdict reports; the
    `refresh` section gives the comparison either way."""
    classes = list(train.classes)
    short = short_classes(per_class_counts(train), short_share)
    short_idx = [classes.index(c) for c in short]
    plus_data = concat(train, synthetic) if len(synthetic) else train
    # each figure's test rows: what its verdict can resolve
    test_rows = {"overall": len(test_labels)}
    if short_idx:
        test_rows["short"] = int(
            torch.isin(test_labels, torch.tensor(short_idx, dtype=test_labels.dtype)).sum()
        )
    test_rows |= {f"class:{c}": int((test_labels == i).sum()) for i, c in enumerate(classes)}

    def figures(pred: torch.Tensor) -> dict:
        out = {"overall": accuracy_of(pred, test_labels)}
        if short_idx:
            out["short"] = accuracy_of(pred, test_labels, short_idx)
        for i, c in enumerate(classes):
            out[f"class:{c}"] = accuracy_of(pred, test_labels, [i])
        return out

    # The trainings are submitted as soon as they are known, so a pool of workers
    # (tasks/validate/utility_trainer.py) runs them side by side; a plain trainer runs each at once.
    submit = getattr(trainer, "submit", None) or run_now(trainer)
    # The baseline, as a user picks it: the menu's best recipe on val.
    first = {recipe: submit(train, seeds[0], recipe) for recipe in RECIPES}
    val_accuracy = {r: accuracy_of(f.result()[0], val_labels) for r, f in first.items()}
    chosen = choose_recipe(val_accuracy)
    # a classifier cannot train (BatchNorm) on a single image
    tstr_recipe = Recipe(False, chosen.remedy)
    tstr = None
    if refreshed is None and len(synthetic) >= 2:
        tstr = submit(synthetic, seeds[0], tstr_recipe)
    base_runs = [
        first[chosen] if seed == seeds[0] else submit(train, seed, chosen) for seed in seeds
    ]
    plus_runs = [submit(plus_data, seed, chosen) for seed in seeds]
    fresh_runs = []
    if refreshed is not None:
        fresh_runs = [submit(concat(train, refreshed), seed, chosen) for seed in seeds]
    base = [figures(run.result()[1]) for run in base_runs]
    plus = [figures(run.result()[1]) for run in plus_runs]
    decisive_key = "short" if short_idx else "overall"
    refresh = None
    if refreshed is not None:
        fresh = [figures(run.result()[1]) for run in fresh_runs]
        gap = t_interval(
            [f[decisive_key] - p[decisive_key] for p, f in zip(plus, fresh, strict=True)]
        )
        kept = not math.isnan(gap.mean) and gap.mean >= 0
        refresh = {
            "compared_on": decisive_key,
            "delta_vs_pool": gap.as_dict(),
            "kept": kept,
            "rule": "kept when its mean over the paired seeds is at least the pool's: at "
            "least as good as the pool it replaces",
        }
        if kept:
            plus, synthetic = fresh, refreshed
        if len(synthetic) >= 2:
            tstr = submit(synthetic, seeds[0], tstr_recipe)
    reference = {r.name: figures(f.result()[1]) for r, f in first.items() if r != chosen}
    if tstr is not None:
        reference["tstr"] = figures(tstr.result()[1])

    def summary(key: str) -> dict:
        deltas = [p[key] - b[key] for b, p in zip(base, plus, strict=True)]
        interval = t_interval(deltas)
        resolution = Resolution(test_rows[key], max_points_per_test_image)
        return {
            "baseline": _round(float(np.nanmean([b[key] for b in base]))),
            "baseline+synthetic": _round(float(np.nanmean([p[key] for p in plus]))),
            "delta": interval.as_dict(),
            "verdict": resolved_verdict(interval, resolution),
            **resolution.as_dict(),
        }

    overall = summary("overall")
    short_summary = summary("short") if short_idx else None
    decisive = short_summary or overall
    resolution = Resolution(test_rows[decisive_key], max_points_per_test_image)
    return {
        "protocol": PROTOCOL,
        "baseline": chosen.name,
        "baseline_val_accuracy": {r.name: _round(acc) for r, acc in val_accuracy.items()},
        "seeds": list(seeds),
        "real_images": len(train),
        "synthetic_images": len(synthetic),
        "delivered_per_class": per_class_counts(synthetic),
        "test_images": len(test_labels),
        "short_classes": short,
        "short_class_share": short_share,
        "overall": overall,
        "short": short_summary,
        "per_class": {c: summary(f"class:{c}") for c in classes},
        "reference": {
            arm: {"overall": _round(f["overall"]), "short": _round(f.get("short"))}
            for arm, f in reference.items()
        },
        # What the gate (the interval's lower bound) and the headline read: the short
        # classes when there are any.
        "decisive": decisive_key,
        "delta": decisive["delta"],
        "verdict": decisive["verdict"],
        "resolution": resolution.as_dict() | {"max_points_per_test_image": resolution.max_points},
        "verdict_text": verdict_text(
            "the short classes'" if short_idx else "the", decisive["verdict"], resolution
        ),
        "refresh": refresh,
    }


def choose_recipe(val_accuracy: dict[Recipe, float]) -> Recipe:
    """The recipe with the highest val accuracy; a tie goes to the one earlier in RECIPES."""
    return max(RECIPES, key=lambda r: (val_accuracy[r], -RECIPES.index(r)))


def per_class_counts(data: ImageTensors) -> dict[str, int]:
    """Rows per class, every class listed."""
    return {c: int((data.labels == i).sum()) for i, c in enumerate(data.classes)}


def nothing_to_score(
    train: ImageTensors,
    test_labels: torch.Tensor,
    short_share: float,
    reason: str,
    max_points_per_test_image: float = MAX_POINTS_PER_TEST_IMAGE,
) -> dict:
    """The `utility` section when the synthetic arm would add no row: nothing is trained and
    the verdict is `no evidence`, `verdict_text` saying why (`reason`). It names the decisive
    classes and their test split as `compare_arms` would; the interval is empty, so the
    utility gate reads no lower bound."""
    classes = list(train.classes)
    short = short_classes(per_class_counts(train), short_share)
    decisive = [classes.index(c) for c in short] or list(range(len(classes)))
    test_images = int(
        torch.isin(test_labels, torch.tensor(decisive, dtype=test_labels.dtype)).sum()
    )
    resolution = Resolution(test_images, max_points_per_test_image)
    return {
        "protocol": PROTOCOL,
        "seeds": [],
        "real_images": len(train),
        "synthetic_images": 0,
        "delivered_per_class": dict.fromkeys(classes, 0),
        "test_images": len(test_labels),
        "short_classes": short,
        "short_class_share": short_share,
        "overall": None,
        "short": None,
        "per_class": {},
        "reference": {},
        "decisive": "short" if short else "overall",
        "delta": {"mean": None, "low": None, "high": None, "seeds": 0},
        "verdict": "no evidence",
        "resolution": resolution.as_dict() | {"max_points_per_test_image": resolution.max_points},
        "verdict_text": f"no evidence: {reason}; nothing was scored",
        "refresh": None,
    }
