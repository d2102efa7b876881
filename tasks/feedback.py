"""People's feedback files, and the per-class generation requests in them.

- `feedback_files`: the one way to list the feedback tables (`fuse.feedback`, default
  `data/feedback/`, `*.csv|*.parquet`, hidden files left out). Every file must resolve,
  symlinks included, inside that folder: a link that leads elsewhere is refused with
  `FeedbackOutsideFolder`, naming the file, so neither the flow (which checks before it
  writes anything), fuse (rejections) nor generate (requests) ever reads outside it.
- `read_requests`: rows `label, extra` (the same files that carry `id, verdict` rejections).
"""

from __future__ import annotations

import logging
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


def requested_extra(params: Params, classes: list[str]) -> dict[str, int]:
    """Extra images per class: generate.per_class_extra plus people's feedback requests
    (a request for an unknown class is reported and skipped). Generate draws them and
    validate expects them, from this one rule."""
    extra = dict(params.generate.per_class_extra)
    requests, problems = read_requests(params.fuse.feedback, classes)
    for problem in problems:
        log.warning("feedback request skipped: %s", problem)
    for label, count in requests.items():
        extra[label] = extra.get(label, 0) + count
    return extra
