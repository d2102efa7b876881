"""The stage registry: every pipeline stage, in run order, and the module that runs it.

`STAGES` is the one list of stages. dvc.yaml declares the same stages in the same order,
each with the command `synthloop stage NAME` (tests/test_stage_registry.py holds the two
in step), and the flow runs them in this order. Each stage is a package of its own,
`tasks/<stage>/` (train_evaluator's is `tasks/evaluator/`), whose `stage.py` is the module
named here: it exposes `run_stage(params) -> dict` (its summary), or is sharded: its
`SHARDING` (a `synthloop.sharding.StageSpec`) runs through `run_inline`, reusing the shards
the flow computed beforehand; a sharded stage that needs more around it keeps a
`run_stage`. What several stages use is `tasks/shared/`; tests/test_stage_registry.py holds
the tree to this list.

`stage_code(name)` is the code a stage runs: the import closure of this registry and the
stage's module (synthloop/codegraph.py). dvc.yaml's code deps must be exactly those files,
so changing any line a stage runs makes `dvc status` report the stage, and nothing else.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from synthloop.codegraph import import_closure, source_files
from synthloop.config import Params
from synthloop.sharding import run_inline

STAGES: dict[str, str] = {
    "ingest": "tasks.ingest.stage",
    "clean": "tasks.clean.stage",
    "train_evaluator": "tasks.evaluator.stage",
    "augment": "tasks.augment.stage",
    "fuse": "tasks.fuse.stage",
    "train": "tasks.train.stage",
    "generate": "tasks.generate.stage",
    "validate": "tasks.validate.stage",
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)
# The stages a generator family changes (train.family is read from train on): a bake-off
# runs these once per family on the same upstream outputs.
FAMILY_STAGES: tuple[str, ...] = STAGE_ORDER[STAGE_ORDER.index("train") :]


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])


def run_stage(name: str, params: Params) -> dict:
    """Run one stage on the params; what `synthloop stage NAME` (so DVC) and the flow run."""
    module = stage_module(name)
    if hasattr(module, "run_stage"):
        return module.run_stage(params)
    return run_inline(module.SHARDING, params)


def is_sharded(name: str) -> bool:
    return hasattr(stage_module(name), "SHARDING")


def stage_code(name: str) -> list[str]:
    """The project source files the stage runs (paths as dvc.yaml names them)."""
    stage_module(name)  # an unknown name fails here, with the list
    return source_files(import_closure(__name__, STAGES[name]))
