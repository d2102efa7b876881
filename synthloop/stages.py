"""The stage registry: one entry per DVC stage, each a plain function of the params.

`synthloop stage NAME` (the command every dvc.yaml stage runs) and the flow both go
through here, so there is exactly one way to run a stage.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from synthloop.config import PARAMS_FILE, Params

log = logging.getLogger(__name__)


# Sharded stages (synthloop/sharding.py) merge the shards the flow computed beforehand
# (flows/sharded.py) and compute the missing ones here: the same outputs either way.
def _ingest(params: Params) -> dict:
    from synthloop.sharding import run_inline

    return run_inline("ingest", params)


def _clean(params: Params) -> dict:
    from synthloop.sharding import run_inline

    return run_inline("clean", params)


def _augment(params: Params) -> dict:
    from synthloop.sharding import run_inline

    return run_inline("augment", params)


def _fuse(params: Params) -> dict:
    from tasks.fuse import run_fuse

    return run_fuse(params.fuse)


# The params file `synthloop stage` loaded (set by the CLI): a distributed train stage
# re-runs `synthloop stage train` with it under torchrun.
PARAMS_ENV = "SYNTHLOOP_PARAMS"


def _train(params: Params) -> dict:
    from tasks.train import inside_torchrun, launch_torchrun, run_train

    if params.train.distributed.enabled and not inside_torchrun():
        return launch_torchrun(params.train, Path(os.environ.get(PARAMS_ENV, PARAMS_FILE)))
    return run_train(params.train)


def requested_extra(params: Params, classes: list[str]) -> dict[str, int]:
    """Extra images per class: generate.per_class_extra plus people's feedback requests
    (a request for an unknown class is reported and skipped)."""
    from tasks.feedback import read_requests

    extra = dict(params.generate.per_class_extra)
    requests, problems = read_requests(params.fuse.feedback, classes)
    for problem in problems:
        log.warning("feedback request skipped: %s", problem)
    for label, count in requests.items():
        extra[label] = extra.get(label, 0) + count
    return extra


def _generate(params: Params) -> dict:
    from tasks.generate import run_generate

    classes = _classes(params.generate.model / "config.json")
    extra = requested_extra(params, classes)
    return run_generate(params.generate.model_copy(update={"per_class_extra": extra}))


def _classes(model_config: Path) -> list[str]:
    if not model_config.is_file():
        raise FileNotFoundError(f"{model_config}: missing; run the stage that trains this model")
    return list(json.loads(model_config.read_text())["classes"])


def _train_evaluator(params: Params) -> dict:
    from tasks.evaluator import run_train_evaluator

    return run_train_evaluator(params.train_evaluator)


def _validate(params: Params) -> dict:
    from synthloop.sharding import run_inline

    # The feature shards, cached or computed here; tasks.validate.validate_job adds what
    # generate was asked for per class.
    return run_inline("validate", params)


STAGES: dict[str, Callable[[Params], dict]] = {
    "ingest": _ingest,
    "clean": _clean,
    "augment": _augment,
    "fuse": _fuse,
    "train": _train,
    "generate": _generate,
    "train_evaluator": _train_evaluator,
    "validate": _validate,
}
