"""The run's guard rails without a server: run parameters, the workspace lock, the input
fingerprint, the per-run git commit, and prefect.yaml filled in from params.yaml."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.parameters import RunParameters
from flows.workspace import (
    WorkspaceBusy,
    WorkspaceLock,
    changed_inputs,
    input_fingerprint,
    record_run,
)
from synthloop.config import ConfigError, load_params
from tests.conftest import REPO


def test_run_parameters_become_params_overrides():
    run = RunParameters.model_validate(
        {
            "sources": [{"kind": "image_folder", "path": "data/raw/x"}],
            "max_rounds": 3,
            "family": "diffusion",
            "families": ["cgan", "vae"],
            "gates": {"min_class_consistency": 0.9},
        }
    )
    assert run.overrides() == {
        "ingest": {"sources": [{"kind": "image_folder", "path": "data/raw/x"}]},
        "loop": {"max_rounds": 3, "families": ["cgan", "vae"]},
        "train": {"family": "diffusion"},
        "validate": {"gates": {"min_class_consistency": 0.9}},
    }
    assert RunParameters().overrides() == {}


@pytest.mark.parametrize(
    "bad",
    [
        {"max_rounds": 0},
        {"family": "stylegan"},  # not a family in the registry
        {"families": ["cgan", "stylegan"]},
        {"gates": {"max_near_copy_rate": 1.5}},
        {"sources": [{"kind": "ftp"}]},
        {"max_round": 2},
    ],
)
def test_bad_run_parameters_are_rejected_by_the_schema(bad):
    import jsonschema

    with pytest.raises(ValidationError):
        RunParameters.model_validate(bad)
    # The same schema the Prefect server enforces for a deployment's form.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RunParameters.model_json_schema())


def test_run_parameters_the_workspace_rejects_name_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"ingest": {"sources": [{"kind": "demo"}]}})
    )
    run = RunParameters.model_validate(
        {"sources": [{"kind": "image_folder", "path": "data/raw/nope"}]}
    )
    with pytest.raises(ConfigError, match=r"ingest.sources.0.image_folder.path.*does not exist"):
        load_params(tmp_path / "params.yaml", overrides=run.overrides())


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with WorkspaceLock(tmp_path, holder="flow run nightly-otter"):
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy, match="in use by flow run nightly-otter"):
            WorkspaceLock(tmp_path, timeout_s=0.3, holder="second").acquire()
        assert time.monotonic() - started >= 0.3
    # Released: the next run gets it.
    with WorkspaceLock(tmp_path, holder="third"):
        pass


def test_a_waiting_run_gets_the_lock_when_the_first_ends(tmp_path):
    first = WorkspaceLock(tmp_path, holder="first").acquire()
    threading.Timer(0.3, first.release).start()
    with WorkspaceLock(tmp_path, timeout_s=10, holder="second") as second:
        assert "second" in second.holder_file.read_text()


@pytest.fixture
def demo_workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "data/feedback").mkdir(parents=True)
    (ws / "data/pool").mkdir(parents=True)
    (ws / "data/raw/x/a").mkdir(parents=True)
    (ws / "data/raw/x/a/1.png").write_bytes(b"png")
    (ws / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "s": {
                        "cmd": "true",
                        "metrics": [{"reports/m.json": {"cache": False}}],
                        "outs": ["data/out"],
                    }
                }
            }
        )
    )
    (ws / "params.yaml").write_text(
        yaml.safe_dump({"ingest": {"sources": [{"kind": "image_folder", "path": "data/raw/x"}]}})
    )
    return ws


def test_the_fingerprint_names_what_changed(demo_workspace):
    ws = demo_workspace
    params_file = ws / "params.yaml"

    def fingerprint() -> dict[str, str]:
        return input_fingerprint(ws, params_file, load_params(params_file))

    state = ws / "state.json"
    import json

    state.write_text(json.dumps({"passed": True, "fingerprint": fingerprint()}))
    assert changed_inputs(state, fingerprint()) == []
    (ws / "data/raw/x/a/2.png").write_bytes(b"more")
    (ws / "data/feedback/verdicts.csv").write_text("id,verdict\nabc,reject\n")
    (ws / "data/pool/part-r0001.parquet.dvc").write_text("outs: []\n")
    assert changed_inputs(state, fingerprint()) == ["feedback", "pool", "raw"]
    # A failed last run never means "nothing to do".
    state.write_text(json.dumps({"passed": False, "fingerprint": fingerprint()}))
    assert changed_inputs(state, fingerprint()) is None


def git(ws: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ws, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_a_run_commit_goes_on_its_branch_and_leaves_the_checkout_alone(demo_workspace):
    ws = demo_workspace
    git(ws, "init", "-q", "-b", "main")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "0")
    (ws / ".gitignore").write_text("/reports/\n/data/pool/*.parquet\n")
    git(ws, "add", ".gitignore", "params.yaml")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "code")
    (ws / "dvc.lock").write_text("schema: '2.0'\n")
    (ws / "reports").mkdir()
    (ws / "reports/m.json").write_text('{"fid": 1.0}')  # ignored, but a metric: recorded
    (ws / "data/pool/part-r0001.parquet").write_bytes(b"data")  # ignored data: not recorded
    (ws / "data/pool/part-r0001.parquet.dvc").write_text("outs: []\n")
    (ws / "data/raw/x/a/wip.txt").write_text("not part of a run")
    head, status = git(ws, "rev-parse", "HEAD"), git(ws, "status", "--porcelain")

    first = record_run(ws, "synthloop/runs", "run 1")
    assert first is not None and first.created
    files = git(ws, "ls-tree", "-r", "--name-only", first.commit).splitlines()
    assert {"dvc.lock", "reports/m.json", "data/pool/part-r0001.parquet.dvc"} <= set(files)
    assert "data/pool/part-r0001.parquet" not in files and "data/raw/x/a/wip.txt" not in files
    assert git(ws, "rev-parse", f"{first.commit}^") == head  # the code that ran
    # The checkout, its branch and its index are untouched.
    assert git(ws, "rev-parse", "HEAD") == head and git(ws, "branch", "--show-current") == "main"
    assert git(ws, "status", "--porcelain") == status

    assert not record_run(ws, "synthloop/runs", "run 2").created  # nothing new: no commit
    (ws / "reports/m.json").write_text('{"fid": 0.5}')
    second = record_run(ws, "synthloop/runs", "run 3")
    assert second.created and git(ws, "rev-parse", f"{second.commit}^1") == first.commit
    assert git(ws, "rev-parse", f"{second.commit}^2") == head
    assert git(ws, "show", f"{second.commit}:reports/m.json") == '{"fid": 0.5}'


def test_no_git_no_commit(demo_workspace):
    assert record_run(demo_workspace, "synthloop/runs", "run") is None


def deployed_from_prefect_yaml(project: Path) -> dict[str, dict]:
    """`project`'s prefect.yaml deployments as `prefect deploy` fills them in there: its
    build steps run in `project`, their outputs templated in (Prefect's own templating; no
    server). tests/test_deployments.py runs the real `prefect deploy`."""
    from contextlib import chdir

    from prefect.utilities.importtools import import_object
    from prefect.utilities.templating import apply_values

    spec = yaml.safe_load((project / "prefect.yaml").read_text())
    outputs = {}
    with chdir(project):
        for step in spec["build"]:
            ((name, inputs),) = step.items()
            inputs = dict(inputs)
            step_id = inputs.pop("id")
            outputs[step_id] = import_object(name)(**inputs)
    return {d["name"]: apply_values(d, outputs) for d in spec["deployments"]}


def test_prefect_yaml_deploys_what_synthloop_serve_serves():
    from flows.deployments import DESCRIPTIONS, build_deployments

    params = load_params(REPO / "params.yaml")
    declared = deployed_from_prefect_yaml(REPO)
    assert set(declared) == {"nightly", "manual"} == set(DESCRIPTIONS)
    (schedule,) = declared["nightly"]["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == (
        params.schedule.cron,
        params.schedule.timezone,
    )
    assert not declared["manual"].get("schedules")
    served = {d.name: d for d in build_deployments(REPO / "params.yaml")}
    for name, deployment in declared.items():
        assert deployment["description"] == served[name].description == DESCRIPTIONS[name]
        assert deployment["concurrency_limit"]["limit"] == 1
        assert deployment["entrypoint"] == "flows/closed_loop.py:closed_loop"
        assert served[name].concurrency_limit == 1
    (cron,) = served["nightly"].schedules
    assert (cron.schedule.cron, cron.schedule.timezone) == (
        params.schedule.cron,
        params.schedule.timezone,
    )
    assert not served["manual"].schedules


def test_prefect_yaml_takes_the_schedule_from_params_yaml_and_writes_no_copy(tmp_path):
    from flows.deployments import DESCRIPTIONS

    text = (REPO / "prefect.yaml").read_text()
    params = load_params(REPO / "params.yaml")
    for fact in (params.schedule.cron, *DESCRIPTIONS.values()):
        assert fact not in text, f"prefect.yaml writes {fact!r} again: template it in"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["schedule"] = {"cron": "30 3 * * 1", "timezone": "Europe/Berlin"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "prefect.yaml").write_text(text)
    (schedule,) = deployed_from_prefect_yaml(tmp_path)["nightly"]["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == ("30 3 * * 1", "Europe/Berlin")


@pytest.mark.integration
def test_a_run_that_finds_the_workspace_busy_stops_without_changing_anything(
    workspace, prefect_api
):
    from flows.closed_loop import closed_loop

    params_before = (workspace / "params.yaml").read_text()
    with WorkspaceLock(workspace, holder="flow run nightly-otter"):
        state = closed_loop(
            params_path=str(workspace / "params.yaml"),
            run=RunParameters(max_rounds=3),
            return_state=True,
        )
    assert state.is_failed()
    with pytest.raises(WorkspaceBusy, match="in use by flow run nightly-otter"):
        state.result()
    assert (workspace / "params.yaml").read_text() == params_before
    assert not (workspace / "data/ingested").exists() and not (workspace / "dvc.lock").exists()


@pytest.mark.integration
def test_a_dry_run_reports_the_plan_and_writes_nothing(workspace, prefect_api):
    from flows.closed_loop import closed_loop

    params_before = (workspace / "params.yaml").read_text()
    plan = closed_loop(
        params_path=str(workspace / "params.yaml"),
        run=RunParameters(dry_run=True, family="diffusion"),
    )
    assert plan["result"] == "dry run"
    assert plan["overrides"] == {"train": {"family": "diffusion"}}
    assert set(plan["stale_stages"]) == {
        "ingest", "clean", "train_evaluator", "augment", "fuse", "train", "generate", "validate"
    }  # fmt: skip
    assert plan["changed_inputs"] is None  # no successful run yet
    assert (workspace / "params.yaml").read_text() == params_before
    assert not (workspace / "data/ingested").exists()
