"""The run surface stays inside its workspace: source paths inside `ingest.allowed_roots`
(symlinks included), feedback files inside the feedback folder, a deployed run bound to the
workspace it was served for. Unit-level; the same refusals through a real, authenticated
Prefect server are in tests/test_served_surface.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.binding import SERVED_PARAMS_ENV, WorkspaceNotServed, served_params_file
from flows.parameters import RunParameters
from synthloop.config import ConfigError, IngestConfig, load_params, parse_params
from tasks.ingest.stage import plan_ingest
from tasks.shared.feedback import FeedbackOutsideFolder, feedback_files, read_requests
from tests.conftest import REPO


def workspace_params(ws: Path, sources: list[dict], **ingest: object) -> Path:
    (ws / "data/raw").mkdir(parents=True, exist_ok=True)
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump({"ingest": {"sources": sources, **ingest}}))
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the workspace, not in it."""
    folder = tmp_path / "elsewhere"
    (folder / "a").mkdir(parents=True)
    return folder


def test_the_default_allowed_roots_are_params_yaml_s():
    default = IngestConfig.model_fields["allowed_roots"].default_factory()
    assert [str(p) for p in default] == yaml.safe_load((REPO / "params.yaml").read_text())[
        "ingest"
    ]["allowed_roots"]


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ({"kind": "image_folder", "path": "OUTSIDE"}, "sources[1].path"),
        ({"kind": "image_folder", "path": "data/raw/../../elsewhere"}, "sources[1].path"),
        ({"kind": "manifest", "path": "OUTSIDE/m.csv"}, "sources[1].path"),
        ({"kind": "torchvision", "dataset": "MNIST", "root": "OUTSIDE"}, "sources[1].root"),
        ({"kind": "image_folder", "path": "data/raw/link"}, "sources[1].path"),  # a symlink
    ],
)
def test_a_run_source_outside_the_allowed_roots_is_refused_naming_the_key(
    tmp_path, outside, source, key
):
    ws = tmp_path / "ws"
    params_file = workspace_params(ws, [{"kind": "demo"}])
    (ws / "data/raw/link").symlink_to(outside)
    source = {k: str(v).replace("OUTSIDE", str(outside)) for k, v in source.items()}
    run = RunParameters.model_validate({"sources": [{"kind": "demo"}, source]})
    with pytest.raises(ConfigError) as err:
        load_params(params_file, overrides=run.overrides())
    message = str(err.value)
    assert f"ingest.{key}" in message and "outside the allowed roots (data/raw" in message
    assert "ingest.allowed_roots" in message  # what to do


def test_a_refused_path_is_not_looked_at(tmp_path):
    """The refusal comes first: it does not say whether the outside path exists."""
    ws = tmp_path / "ws"
    params_file = workspace_params(ws, [{"kind": "image_folder", "path": "/no/such/place"}])
    with pytest.raises(ConfigError, match="outside the allowed roots") as err:
        load_params(params_file)
    assert "does not exist" not in str(err.value)


def test_sources_inside_the_roots_and_listed_roots_load(tmp_path, outside):
    ws = tmp_path / "ws"
    (ws / "data/raw/mine/a").mkdir(parents=True)
    params_file = workspace_params(
        ws,
        [{"kind": "image_folder", "path": "data/raw/mine"}, {"kind": "demo"}],
        allowed_roots=["data/raw", str(outside)],
    )
    params = load_params(params_file)
    assert params.ingest.allowed_roots == [(ws / "data/raw").resolve(), outside.resolve()]
    run = RunParameters.model_validate(
        {"sources": [{"kind": "image_folder", "path": str(outside)}]}
    )
    assert load_params(params_file, overrides=run.overrides()).ingest.sources[0].path == outside


def test_a_manifest_row_outside_the_allowed_roots_is_quarantined(tmp_path, outside):
    ws = tmp_path / "ws"
    (outside / "a" / "x.png").write_bytes(b"not yours")
    raw = ws / "data/raw"
    raw.mkdir(parents=True)
    (raw / "m.csv").write_text(f"path,label\n{outside / 'a' / 'x.png'},a\n")
    params = parse_params(
        {"ingest": {"sources": [{"kind": "manifest", "path": "data/raw/m.csv"}]}}, root=ws
    )
    (shard,) = plan_ingest(params.ingest)
    ((_, rejected),) = shard.work
    assert rejected.reason == "path_outside_allowed_roots"


def test_a_feedback_file_linked_from_outside_is_refused_naming_it(tmp_path, outside):
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    (feedback / "ok.csv").write_text("label,extra\n3,5\n")
    assert feedback_files(feedback) == [feedback / "ok.csv"]
    (outside / "secret.csv").write_text("label,extra\n3,1\n")
    (feedback / "linked.csv").symlink_to(outside / "secret.csv")
    with pytest.raises(FeedbackOutsideFolder, match=r"linked\.csv resolves to .*outside"):
        read_requests(feedback, ["3"])


def test_a_deployed_run_is_bound_to_the_served_workspace(tmp_path, monkeypatch):
    served = tmp_path / "ws" / "params.yaml"
    other = tmp_path / "other" / "params.yaml"
    monkeypatch.delenv(SERVED_PARAMS_ENV, raising=False)
    # Outside a deployment (synthloop run): any params file.
    assert served_params_file(str(other), deployed=False) == other
    # A deployed run in a process that names no workspace: refused.
    with pytest.raises(WorkspaceNotServed, match=SERVED_PARAMS_ENV):
        served_params_file(str(served), deployed=True)
    monkeypatch.setenv(SERVED_PARAMS_ENV, str(served))
    assert served_params_file(str(served), deployed=True) == served
    with pytest.raises(WorkspaceNotServed, match=r"params_path: .* is not the workspace"):
        served_params_file(str(other), deployed=True)
    monkeypatch.chdir(served.parent.parent)
    assert served_params_file("ws/params.yaml", deployed=True) == served  # relative: same file


def test_the_deployments_freeze_params_path():
    from flows.deployments import build_deployments

    for deployment in build_deployments(REPO / "params.yaml"):
        schema = deployment._parameter_openapi_schema.properties["params_path"]
        assert schema["readOnly"] and schema["enum"] == [str(REPO / "params.yaml")]
        assert deployment.parameters == {"params_path": str(REPO / "params.yaml")}
        assert deployment.enforce_parameter_schema
