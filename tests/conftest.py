"""Shared fixtures: telemetry off, tiny procedural datasets, throw-away DVC workspaces."""

from __future__ import annotations

import os

# Before anything imports Prefect, DVC or Great Expectations.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from synthloop.procedural import make_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool_env() -> dict[str, str]:
    """The environment for `dvc` and `synthloop` subprocesses: this venv's scripts first."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_tool(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def small_params(source_path: str = "data/raw/shapes", **clean: object) -> dict:
    return {
        "ingest": {
            "sources": [{"kind": "image_folder", "path": source_path}],
            "shard_rows": 16,
        },
        "clean": {
            "image_size": 16,
            "channels": 3,
            "min_class_count": 3,
            "split_tolerance": 0.1,
            "shard_rows": 16,
            **clean,
        },
    }


@pytest.fixture
def shapes_folder(tmp_path: Path) -> Path:
    """3 classes x 20 distinct 16x16 RGB PNGs."""
    return make_image_folder(tmp_path / "shapes", classes=3, per_class=20, size=16, seed=1)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A fresh project workspace: dvc.yaml, params.yaml, the code deps, a tiny raw dataset,
    DVC initialised (no git)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    for package in ("tasks", "synthloop", "flows"):
        shutil.copytree(REPO / package, ws / package, ignore=shutil.ignore_patterns("__pycache__"))
    make_image_folder(ws / "data/raw/shapes", classes=3, per_class=20, size=16, seed=1)
    (ws / "params.yaml").write_text(yaml.safe_dump(small_params()))
    run_tool("dvc", "init", "--no-scm", "-q", cwd=ws)
    run_tool("dvc", "config", "core.analytics", "false", cwd=ws)
    return ws
