"""The stage registry: one entry per DVC stage, each a plain function of the params.

`synthloop stage NAME` (the command every dvc.yaml stage runs) and the flow both go
through here, so there is exactly one way to run a stage.
"""

from __future__ import annotations

from collections.abc import Callable

from synthloop.config import Params


def _ingest(params: Params) -> dict:
    from tasks.ingest import run_ingest

    return run_ingest(params.ingest)


def _clean(params: Params) -> dict:
    from tasks.clean import run_clean

    return run_clean(params.clean)


STAGES: dict[str, Callable[[Params], dict]] = {
    "ingest": _ingest,
    "clean": _clean,
}
