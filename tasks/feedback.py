"""Per-class generation requests from people: rows `label, extra` in the feedback tables
(`data/feedback/*.csv|*.parquet`, the same files that carry `id, verdict` rejections)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from synthloop.config import Params

log = logging.getLogger(__name__)


def read_requests(
    directory: Path, classes: list[str] | None = None
) -> tuple[dict[str, int], list[dict]]:
    """(extra images per label, problems). A bad row is reported (file, row, why) and
    skipped; the valid rows still apply."""
    extra: Counter[str] = Counter()
    problems: list[dict] = []
    directory = Path(directory)
    if not directory.is_dir():
        return {}, problems
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in {".csv", ".parquet"} or path.name.startswith("."):
            continue
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
