"""Integration: the real `dvc repro`, the real CLI and the real Prefect flow."""

import json

import pytest
import yaml

from tests.conftest import run_tool

pytestmark = pytest.mark.integration


def test_dvc_repro_builds_then_skips(workspace):
    first = run_tool("dvc", "repro", cwd=workspace)
    assert "Running stage 'ingest'" in first.stdout and "Running stage 'clean'" in first.stdout
    report = json.loads((workspace / "reports/clean.json").read_text())
    assert report["ingested"] == 60 and report["kept"] + report["quarantined_total"] == 60
    assert report["expectations"]["success"]
    for split in ("train", "val", "test"):
        assert list((workspace / "data/clean" / split).glob("part-*.parquet"))

    second = run_tool("dvc", "repro", cwd=workspace)
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout

    status = run_tool("dvc", "status", cwd=workspace)
    assert "up to date" in status.stdout

    # A changed clean param reruns clean only.
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["clean"]["seed"] = 7
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    third = run_tool("dvc", "repro", cwd=workspace)
    assert "Running stage 'clean'" in third.stdout and "Running stage 'ingest'" not in third.stdout


def test_bad_params_stop_the_cli_before_any_work(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["clean"]["image_size"] = -8
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_tool("synthloop", "stage", "ingest", cwd=workspace, check=False)
    assert proc.returncode == 2
    assert "clean.image_size" in proc.stderr and "greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workspace / "data/ingested").exists()


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's real local API (a temporary server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_closed_loop_flow_runs_the_stages_through_dvc(workspace, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.closed_loop import closed_loop

    state = closed_loop(params_path=str(workspace / "params.yaml"), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["stages"] == {"ingest": "ran", "clean": "ran"}
    assert result["ingested"] == 60

    # A second run finds nothing changed: DVC skips both stages.
    again = closed_loop(params_path=str(workspace / "params.yaml"))
    assert again["stages"] == {"ingest": "skipped", "clean": "skipped"}

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["clean-report"]))
            )

    import asyncio

    found = asyncio.run(artifacts())
    assert found and "| class | train | val | test | total |" in found[0].data
    assert "Great Expectations: **passed**" in found[0].data


def test_flow_fails_fast_on_a_permanent_stage_error(workspace, prefect_api):
    from flows.closed_loop import StageFailed, closed_loop

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["clean"]["min_class_count"] = 1000  # a critical expectation must fail
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    state = closed_loop(params_path=str(workspace / "params.yaml"), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="clean.*permanent") as err:
        state.result()
    assert "critical expectation failed" in str(err.value)
