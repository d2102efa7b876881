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
from collections.abc import Iterator  # noqa: E402
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
    """A tiny configuration of every stage: seconds per stage on a 2-core CPU. The source's
    parent folder is the one allowed root (`data/raw` for the default)."""
    return {
        "ingest": {
            "sources": [{"kind": "image_folder", "path": source_path}],
            "allowed_roots": [str(Path(source_path).parent)],
            "shard_rows": 16,
        },
        "clean": {
            "image_size": 16,
            "channels": 3,
            "min_class_count": 3,
            "split_tolerance": 0.1,
            "shard_rows": 16,
            "workers": 1,
            **clean,
        },
        "augment": {
            "min_copies": 1,
            "max_copies": 2,
            "policy": {"hflip": 0.5, "color_jitter": 0.1},
        },
        "fuse": {"seed": 0},
        "train": {
            "steps": 12,
            "batch_size": 16,
            "checkpoint_every": 6,
            "log_every": 6,
            "cgan": {"z_dim": 16, "width": 8},
        },
        "generate": {"per_class": 8, "batch_size": 32, "grid_per_class": 4},
        "train_evaluator": {"width": 8, "feature_dim": 16, "epochs": 3, "batch_size": 32},
        "validate": {
            "k": 3,
            "utility_steps": 10,
            "utility_seeds": 2,
            # A handful of test images resolves no gain; these workspaces test the loop's
            # paths, so the resolution gate is opened as far as it goes.
            "utility_max_points_per_test_image": 100.0,
            "min_confidence": 0.0,
            "gates": {
                "min_class_consistency": 0.0,
                "max_near_copy_rate": 1.0,
                "max_fid_ratio": 1e9,
                "min_utility_delta": -1.0,
                # A dozen training steps on 60 images: the privacy figures are measured,
                # not judged (their intervals are wide at this size).
                "max_memorisation_ratio": 1.0,
                "max_membership_auc": 1.0,
            },
        },
        # Three equal classes: `auto` targets fill the gap to the largest class, which is
        # 0 for each, so these workspaces pool up to a fixed number of rows per class.
        # (DVC tracks synthetic_multiple, max_pool_rows and refresh_share as params: they
        # must be written.)
        "loop": {
            "max_rounds": 1,
            "max_retrains": 0,
            "target_per_class": 100,
            "synthetic_multiple": 1.0,
            "max_pool_rows": 50000,
            "refresh_share": 0.25,
        },
    }


@pytest.fixture
def shapes_folder(tmp_path: Path) -> Path:
    """3 classes x 20 distinct 16x16 RGB PNGs."""
    return make_image_folder(tmp_path / "shapes", classes=3, per_class=20, size=16, seed=1)


def build_workspace(ws: Path, params: dict | None = None, git: bool = False) -> Path:
    """A project workspace: dvc.yaml, params.yaml, the code deps, a tiny raw dataset, DVC
    initialised; with `git`, a git repository with the project committed (as a clone is)
    and the raw data under DVC."""
    ws.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    for package in ("tasks", "synthloop", "flows"):
        shutil.copytree(REPO / package, ws / package, ignore=shutil.ignore_patterns("__pycache__"))
    make_image_folder(ws / "data/raw/shapes", classes=3, per_class=20, size=16, seed=1)
    for folder in ("pool", "feedback"):
        (ws / "data" / folder).mkdir(parents=True)
        (ws / "data" / folder / "README.md").write_text("kept by git\n")
    (ws / "params.yaml").write_text(yaml.safe_dump(params or small_params()))
    if git:
        shutil.copy(REPO / ".gitignore", ws / ".gitignore")
        shutil.copy(REPO / "prefect.yaml", ws / "prefect.yaml")
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=ws, check=True)
        run_tool("dvc", "init", "-q", cwd=ws)
        run_tool("dvc", "config", "core.analytics", "false", cwd=ws)
        run_tool("dvc", "add", "-q", "data/raw/shapes", cwd=ws)  # raw data under DVC
        git_commit(ws, "project")
    else:
        run_tool("dvc", "init", "--no-scm", "-q", cwd=ws)
        run_tool("dvc", "config", "core.analytics", "false", cwd=ws)
    return ws


def git_commit(ws: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True, capture_output=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message],
        cwd=ws,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A fresh project workspace with DVC initialised (no git)."""
    return build_workspace(tmp_path / "ws")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box a second
    thread makes every op wait for a core: such tests run several times faster on one.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's real local API (a temporary server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`make test`'s `-n auto`: the CPUs this process may use (affinity and cgroup quota),
    not the host's cores, which a container's quota may be a small share of."""
    from synthloop.threads import usable_cpus

    return usable_cpus()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts Prefect's API runs the real tools: it is an integration test,
    whether or not its module says so (`pytest -m "not integration"` skips it).

    The long tests run first, then the other integration tests, then the rest, each group in
    its own order: `make test` spreads the tests over one worker per CPU (pytest-xdist,
    work stealing), and a minutes-long test started last would leave the other workers idle.
    """
    for item in items:
        if "prefect_api" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("long"):
            return 0
        return 1 if item.get_closest_marker("integration") else 2

    items.sort(key=rank)  # stable: the collected order within a group
