"""What the flow does between DVC stages: change params for a retrain, read artifact
hashes for the record, version the pool. Plain functions; the flow wraps them in Prefect
tasks. (Drift, the ML part, is measured by flows/drift.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from synthloop.config import Params, load_params
from synthloop.dataset import atomic_file

# Datasets and models whose DVC hashes each round records.
RECORDED_OUTS = (
    "data/clean",
    "data/fused",
    "models/evaluator",
    "models/generator",
    "data/synthetic",
    "data/accepted",
)


def tool_env() -> dict[str, str]:
    """Put this interpreter's scripts (dvc, synthloop) first on PATH for subprocesses."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def apply_overrides(params_file: Path, overrides: dict[str, dict[str, Any]]) -> Params:
    """Write a retrain's param overrides into params.yaml, keeping its comments.

    Like `dvc exp run --set-param`, the change lives in params.yaml, where DVC sees it (the
    affected stages rerun) and `git diff` shows it. The merged file is validated before it
    is written, so a bad override never lands.
    """
    validated = load_params(params_file, overrides=overrides)
    rt = YAML()
    rt.preserve_quotes = True
    data = rt.load(params_file.read_text())
    _merge_into(data, overrides)
    with atomic_file(params_file) as tmp, open(tmp, "w") as fh:
        rt.dump(data, fh)
    return validated


def _merge_into(target: Any, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = value


def overrides_for(attempt: int, policy: list[dict[str, dict[str, Any]]]) -> dict:
    """The retrain policy's step for attempt 1, 2, ...; the last step repeats."""
    if not policy:
        return {}
    return policy[min(attempt, len(policy)) - 1]


def dvc_hashes(workspace: Path) -> dict[str, str]:
    """{path: md5} of the recorded outputs, from dvc.lock."""
    lock = workspace / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    found = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") in RECORDED_OUTS:
                found[out["path"]] = out.get("md5")
    return dict(sorted(found.items()))


def run_dvc(workspace: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc ARGS` in the workspace with this environment's tools; a failure raises with
    DVC's output unless `check` is off."""
    proc = subprocess.run(
        ["dvc", *args], cwd=workspace, env=tool_env(), capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def stale_stages(workspace: Path, *targets: str) -> list[str]:
    """The stages (of `targets`, default all) whose deps, params or outs `dvc status` finds
    changed."""
    status = json.loads(run_dvc(workspace, "status", "--json", *targets).stdout or "{}")
    return [name.split(":")[-1] for name in status if not name.endswith(".dvc")]


def dvc_add(workspace: Path, path: Path) -> str:
    """`dvc add` one file; returns the md5 DVC recorded for it."""
    run_dvc(workspace, "add", "--quiet", str(path.relative_to(workspace)))
    record = yaml.safe_load(Path(f"{path}.dvc").read_text())
    return record["outs"][0]["md5"]
