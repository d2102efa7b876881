"""Great Expectations (GX Core 1.x) checks over the metadata of a cleaned image dataset.

Three real GX validations run on three real pandas batches:

* ``rows``    - the row table itself (schema, nulls, label/split sets, image shape, unique ids),
  as one frame or as a stream of frames, each validated as its own batch of the one suite
  (memory stays one frame's, whatever the dataset's size; the caller keeps each id in one
  frame, so uniqueness within each is uniqueness over all);
* ``splits``  - a one-row-per-split summary (count, fraction, target, abs_error); the fraction
  check is a *warning* (non-critical) because GX has no built-in for shares on the row table;
* ``classes`` - a one-row-per-known-label summary (label, count; absent labels count 0).

The summaries count the rows as the ``rows`` batches pass. A batched suite's result is one per
expectation: it succeeds when every batch does, its counts are the batches' sums.

Every expectation carries ``meta={"critical": bool}``. :func:`validate_clean_dataset` never
raises on failed expectations; :func:`raise_on_critical` turns critical failures into an error.
A GX Data Docs HTML site for the run is written to ``docs_dir`` (``docs_dir/index.html``).

``great_expectations`` is imported lazily (it takes seconds) with telemetry switched off.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from synthloop.dataset import atomic_dir

COLUMNS = ["id", "label", "split", "source", "parent_id", "height", "width", "channels"]
_NOT_NULL = ["id", "label", "split", "height", "width", "channels"]
_OBSERVED_KEYS = (
    "observed_value",
    "element_count",
    "unexpected_count",
    "unexpected_percent",
    "partial_unexpected_list",
    "partial_unexpected_index_list",
)
_KEYS = {"rows": None, "splits": "split", "classes": "label"}


class CriticalExpectationFailed(RuntimeError):
    """At least one expectation marked ``critical`` failed."""


def _import_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def _split_summary(counts: Counter, split_fractions: dict[str, float]) -> pd.DataFrame:
    names = list(split_fractions) + [s for s in counts if s not in split_fractions]
    total = sum(counts.values())
    out = pd.DataFrame({"split": [str(s) for s in names]})
    out["count"] = [int(counts.get(s, 0)) for s in names]
    out["fraction"] = out["count"] / total if total else 0.0
    out["target"] = [float(split_fractions.get(s, 0.0)) for s in names]
    out["abs_error"] = (out["fraction"] - out["target"]).abs()
    return out


def _class_summary(counts: Counter, known_labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"label": list(known_labels), "count": [int(counts.get(lb, 0)) for lb in known_labels]}
    )


@dataclass(frozen=True)
class CleanExpectations:
    """What the clean dataset must hold: its labels, image shape, split fractions and bounds."""

    known_labels: list[str]
    height: int
    width: int
    channels: int
    split_fractions: dict[str, float]
    split_tolerance: float
    min_class_count: int


def _suites(spec: CleanExpectations) -> dict[str, list[tuple[Any, bool]]]:
    """Batch name -> [(expectation, critical)]."""
    gxe = _import_gx().expectations
    rows: list[tuple[Any, bool]] = [
        (gxe.ExpectTableColumnsToMatchSet(column_set=COLUMNS, exact_match=True), True),
        *[(gxe.ExpectColumnValuesToNotBeNull(column=c), True) for c in _NOT_NULL],
        (gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(spec.known_labels)), True),
        *[
            (gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[v]), True)
            for c, v in (
                ("height", spec.height),
                ("width", spec.width),
                ("channels", spec.channels),
            )
        ],
        (gxe.ExpectColumnValuesToBeUnique(column="id"), True),
        (
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(spec.split_fractions)),
            True,
        ),
    ]
    splits = [
        (
            gxe.ExpectColumnValuesToBeBetween(column="abs_error", max_value=spec.split_tolerance),
            False,
        )
    ]
    classes = [
        (gxe.ExpectColumnValuesToBeBetween(column="count", min_value=spec.min_class_count), True)
    ]
    return {"rows": rows, "splits": splits, "classes": classes}


def _run_suite(
    context,
    name: str,
    batches: Iterable[pd.DataFrame],
    expectations: list[tuple[Any, bool]],
    key: str | None,
    dataset: str = "clean_dataset",
) -> list[list]:
    """Validate each of ``batches`` against ``expectations``: one GX ValidationDefinition,
    run once per batch (runs after the first are named ``batch-K``). Returns, per
    expectation (in the order GX reports them), its result on each batch.

    ``key`` names the column that identifies a failing row in the result (summary batches).
    """
    gx = _import_gx()
    from great_expectations.core.run_identifier import RunIdentifier

    batch_def = (
        context.data_sources.add_pandas(name=f"{name}_source")
        .add_dataframe_asset(name=name)
        .add_batch_definition_whole_dataframe(name)
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{dataset}_{name}"))
    for expectation, critical in expectations:
        expectation.meta = {"critical": critical}
        suite.add_expectation(expectation)
    vd = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{dataset}_{name}", data=batch_def, suite=suite)
    )
    result_format: dict[str, Any] = {"result_format": "SUMMARY"}
    if key:
        result_format["unexpected_index_column_names"] = [key]
    per_expectation: dict[str, list] = {}  # by the expectation's id in the suite
    for k, df in enumerate(batches):
        run_id = RunIdentifier(run_name=f"batch-{k + 1}") if k else None
        result = vd.run(
            batch_parameters={"dataframe": df}, result_format=result_format, run_id=run_id
        )
        for res in result.results:
            per_expectation.setdefault(res.expectation_config.id, []).append(res)
    return list(per_expectation.values())


def _json_safe(value: Any) -> Any:
    """Plain JSON types only (numpy scalars -> str/number, NaN/inf -> None)."""
    value = json.loads(json.dumps(value, default=str))
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _exception_message(info: dict) -> str | None:
    """GX puts ``{raised_exception, exception_message}`` flat or keyed by metric id."""
    for entry in [info, *info.values()]:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message"))[:300]
    return None


def _observed(results: list) -> Any:
    """What one expectation saw over its batches: the failing batches' examples (at most
    10), the counts summed over every batch."""
    failing = [r for r in results if not r.success]
    for res in failing:
        error = _exception_message(res.exception_info or {})
        if error is not None:
            return {"exception": error}
    first = failing[0].result or {}
    out = {k: first[k] for k in _OBSERVED_KEYS if k in first}
    for k in ("partial_unexpected_list", "partial_unexpected_index_list"):
        if k in out:
            out[k] = [v for r in failing for v in (r.result or {}).get(k, [])][:10]
    if "unexpected_count" in out:
        for k in ("element_count", "unexpected_count", "missing_count"):
            out[k] = sum((r.result or {}).get(k, 0) for r in results)
        nonmissing = out["element_count"] - out.pop("missing_count")
        out["unexpected_percent"] = 100 * out["unexpected_count"] / nonmissing if nonmissing else 0
    if not all(isinstance(i, dict) for i in out.get("partial_unexpected_index_list", [])):
        del out["partial_unexpected_index_list"]  # bare pandas index positions: noise
    return _json_safe(out)


def _summarise(results: list[list], docs_index: Path) -> dict:
    failed = []
    for batches in results:
        if all(res.success for res in batches):
            continue
        cfg = batches[0].expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
        failed.append(
            {
                "expectation": cfg.type,
                "kwargs": _json_safe(kwargs),
                "critical": bool((cfg.meta or {}).get("critical", True)),
                "observed": _observed(batches),
            }
        )
    return {
        "success": not failed,
        "evaluated": len(results),
        "failed": failed,
        "data_docs": str(docs_index),
    }


Batches = pd.DataFrame | Iterable[pd.DataFrame] | Callable[[], pd.DataFrame]


def run_suites(
    frames: dict[str, Batches],
    suites: dict[str, list[tuple[Any, bool]]],
    keys: dict[str, str | None],
    docs_dir: Path,
    dataset: str,
) -> dict:
    """Validate each named frame against its suite in one fresh GX context; build Data Docs.

    A frame may be a stream of frames (each validated as a batch of the suite) or a
    function that makes it when its suite's turn comes (in ``suites``' order: a summary of
    an earlier suite's stream). Returns ``{"success", "evaluated", "failed": [...],
    "data_docs"}`` with one entry per expectation; never raises on failed expectations (see
    :func:`raise_on_critical`).
    """
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    docs_dir = Path(docs_dir).resolve()
    with atomic_dir(docs_dir) as build_dir:  # the old Data Docs stay until the new are built
        context = gx.get_context(mode="ephemeral")  # fresh, in-memory context per call
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        site = f"{dataset}_site"
        context.add_data_docs_site(
            site_name=site,
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(build_dir),
                },
            },
        )
        results = []
        for name, suite in suites.items():
            batches = frames[name]
            if callable(batches):
                batches = batches()
            if isinstance(batches, pd.DataFrame):
                batches = [batches]
            results += _run_suite(context, name, batches, suite, keys.get(name), dataset)
        context.build_data_docs(site_names=[site])
    return _summarise(results, docs_dir / "index.html")


def validate_clean_dataset(
    rows: pd.DataFrame | Iterable[pd.DataFrame], spec: CleanExpectations, docs_dir: Path
) -> dict:
    """Run the clean-dataset expectation suites and build GX Data Docs into ``docs_dir``.

    ``rows`` is the row table, or a stream of frames that holds each id in one frame (each
    frame is a batch of the rows suite; the summaries count them all)."""
    suites = _suites(spec)
    splits: Counter = Counter()
    labels: Counter = Counter()

    def counted(frames: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for df in frames:
            for column, counts in (("split", splits), ("label", labels)):
                if column in df:
                    counts.update(df[column].value_counts().to_dict())
            yield df

    frames: dict[str, Batches] = {
        "rows": counted([rows] if isinstance(rows, pd.DataFrame) else rows),
        "splits": lambda: _split_summary(splits, spec.split_fractions),
        "classes": lambda: _class_summary(labels, spec.known_labels),
    }
    return run_suites(frames, suites, _KEYS, docs_dir, "clean_dataset")


SYNTHETIC_COLUMNS = [
    "id",
    "label",
    "source",
    "parent_id",
    "height",
    "width",
    "channels",
    "pixel_mean",
    "pixel_std",
]


def validate_synthetic_dataset(
    rows: pd.DataFrame,
    *,
    known_labels: list[str],
    height: int,
    width: int,
    channels: int,
    requested_per_class: dict[str, int],
    min_pixel_std: float,
    docs_dir: Path,
) -> dict:
    """The synthetic dataset's suite: schema, labels, one size, sane pixels, per-class counts.

    ``rows`` has SYNTHETIC_COLUMNS; pixel_mean/pixel_std are per image on the 0-255 scale.
    Schema, labels, size and ids are critical; a blank-looking image or a class short of its
    request is a warning (the gates judge quality).
    """
    gxe = _import_gx().expectations
    row_suite: list[tuple[Any, bool]] = [
        (gxe.ExpectTableColumnsToMatchSet(column_set=SYNTHETIC_COLUMNS, exact_match=True), True),
        (gxe.ExpectColumnValuesToNotBeNull(column="label"), True),
        (gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(known_labels)), True),
        *[
            (gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[v]), True)
            for c, v in (("height", height), ("width", width), ("channels", channels))
        ],
        (gxe.ExpectColumnValuesToBeUnique(column="id"), True),
        (gxe.ExpectColumnValuesToBeBetween(column="pixel_mean", min_value=0, max_value=255), True),
        (gxe.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=min_pixel_std), False),
    ]
    counts = rows["label"].value_counts()
    classes = pd.DataFrame(
        {
            "label": list(requested_per_class),
            "shortfall": [
                int(n) - int(counts.get(label, 0)) for label, n in requested_per_class.items()
            ],
        }
    )
    class_suite = [(gxe.ExpectColumnValuesToBeBetween(column="shortfall", max_value=0), False)]
    return run_suites(
        {"rows": rows, "classes": classes},
        {"rows": row_suite, "classes": class_suite},
        {"rows": None, "classes": "label"},
        docs_dir,
        "synthetic_dataset",
    )


def _describe(item: dict) -> str:
    kw = item.get("kwargs", {})
    target = kw.get("column") or ",".join(map(str, kw.get("column_set") or [])) or "table"
    obs = item.get("observed") or {}
    if isinstance(obs, dict) and "unexpected_count" in obs:
        detail = f"{obs['unexpected_count']} unexpected values"
        examples = obs.get("partial_unexpected_index_list") or obs.get("partial_unexpected_list")
        if examples:
            detail += f" (e.g. {examples[:5]})"
    else:
        detail = f"observed {obs}"
    return f"{item['expectation']}({target}): {detail}"


def raise_on_critical(result: dict) -> None:
    """Raise :class:`CriticalExpectationFailed` if any failed expectation is critical."""
    critical = [f for f in result.get("failed", []) if f.get("critical")]
    if critical:
        raise CriticalExpectationFailed(
            "critical expectation failed: " + "; ".join(_describe(f) for f in critical)
        )
