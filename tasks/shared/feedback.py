"""People's feedback files, and the per-class generation requests in them.

- `feedback_files`: the one way to list the feedback tables (`fuse.feedback`, default
  `data/feedback/`, `*.csv|*.parquet`, hidden files left out). Every file must resolve,
  symlinks included, inside that folder: a link that leads elsewhere is refused with
  `FeedbackOutsideFolder`, naming the file, so neither the flow (which checks before it
  writes anything), fuse (rejections) nor generate (requests) ever reads outside it.
- `read_requests`: rows `label, extra` (the same files that carry `id, verdict` rejections).
- `error_extra`: the loop's automatic feedback. Generation quotas follow the downstream
  classifier's per-class errors: the evaluator's accuracy on the real val split
  (`reports/evaluator.json`; never the test split, which decides nothing). Class c gets
  `round(generate.per_class * generate.error_quota * error_c / largest error)` extra images:
  the worst class `error_quota` times `per_class` more, a class without errors none.
- `requested_extra`: the one rule generate draws by and validate expects: the configured
  extras, plus people's requests, plus the error quotas.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import pandas as pd

from synthloop.config import Params

log = logging.getLogger(__name__)

FEEDBACK_SUFFIXES = {".csv", ".parquet"}


class FeedbackOutsideFolder(ValueError):
    """A feedback file that resolves outside the feedback folder (a symlink elsewhere)."""


def feedback_files(directory: Path) -> list[Path]:
    """The feedback tables in `directory`, sorted by name; [] when it does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    folder = directory.resolve()
    files = []
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in FEEDBACK_SUFFIXES or path.name.startswith("."):
            continue
        target = path.resolve()
        if folder not in target.parents:
            raise FeedbackOutsideFolder(
                f"fuse.feedback: {path} resolves to {target}, outside the feedback folder "
                f"{folder}; copy the file into the folder instead of linking it"
            )
        files.append(path)
    return files


def read_requests(
    directory: Path, classes: list[str] | None = None
) -> tuple[dict[str, int], list[dict]]:
    """(extra images per label, problems). A bad row is reported (file, row, why) and
    skipped; the valid rows still apply."""
    extra: Counter[str] = Counter()
    problems: list[dict] = []
    for path in feedback_files(directory):
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            table = pd.read_parquet(path).astype(str)
        table.columns = [str(c).strip().lower() for c in table.columns]
        if not {"label", "extra"} <= set(table.columns):
            continue
        for row, (label, count) in enumerate(zip(table["label"], table["extra"], strict=True), 1):
            label, count = str(label).strip(), str(count).strip()
            if not label and not count:
                continue
            why = None
            if classes is not None and label not in classes:
                why = "unknown label"
            elif not count.isdigit():
                why = f"extra must be a whole number >= 0, got {count!r}"
            if why:
                problems.append({"file": path.name, "row": row, "label": label, "reason": why})
            else:
                extra[label] += int(count)
    return dict(sorted(extra.items())), problems


def error_extra(per_class: int, quota: float, val_accuracy: dict[str, float]) -> dict[str, int]:
    """Extra images per class in proportion to its val error (the rule in the docstring);
    classes without a finite accuracy (absent from val) get none."""
    errors = {
        c: 1.0 - float(a) for c, a in val_accuracy.items() if a is not None and math.isfinite(a)
    }
    worst = max(errors.values(), default=0.0)
    if quota <= 0 or worst <= 0:
        return {}
    extra = {c: round(per_class * quota * e / worst) for c, e in sorted(errors.items())}
    return {c: n for c, n in extra.items() if n > 0}


def evaluator_val_accuracy(report: Path) -> dict[str, float]:
    """Per-class val accuracy from the train_evaluator stage's report."""
    try:
        figures = json.loads(Path(report).read_text())
        return dict(figures["per_class_accuracy"]["val"])
    except FileNotFoundError:
        raise FileNotFoundError(
            f"generate.error_quota needs the evaluator's report {report}: run the "
            "train_evaluator stage first, or set generate.error_quota: 0"
        ) from None
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{report}: no per_class_accuracy.val ({err}); rerun the train_evaluator stage"
        ) from None


def requested_extra(params: Params, classes: list[str]) -> dict[str, int]:
    """Extra images per class: generate.per_class_extra, plus people's feedback requests
    (a request for an unknown class is reported and skipped), plus the error quotas.
    Generate draws them and validate expects them, from this one rule."""
    extra = Counter(params.generate.per_class_extra)
    requests, problems = read_requests(params.fuse.feedback, classes)
    for problem in problems:
        log.warning("feedback request skipped: %s", problem)
    extra.update(requests)
    if params.generate.error_quota > 0:
        accuracy = evaluator_val_accuracy(params.train_evaluator.report)
        known = {c: a for c, a in accuracy.items() if c in classes}
        quotas = error_extra(params.generate.per_class, params.generate.error_quota, known)
        if quotas:
            log.info("generate: extra images for classes with val errors: %s", quotas)
        extra.update(quotas)
    return dict(sorted(extra.items()))
