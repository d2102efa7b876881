"""Production paths on loopback: a real Prefect server, the two deployments served by
`synthloop serve`, a manual run triggered through the API, `prefect deploy` of prefect.yaml,
overlapping runs, and the Prefect UI in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, build_workspace, small_params
from tests.prefect_server import PrefectServer, poll, serving, wait_for_run

pytestmark = pytest.mark.integration

SCREENSHOTS = Path(os.environ.get("SYNTHLOOP_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    srv = PrefectServer(home)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """A git workspace whose deployments `synthloop serve` registered and runs."""
    params = small_params()
    params["schedule"] = {"cron": "30 3 * * *", "timezone": "Europe/Berlin"}
    ws = build_workspace(tmp_path_factory.mktemp("served") / "ws", params, git=True)
    with serving(server, ws):
        yield ws


def test_nightly_deployment_has_the_cron_schedule_from_params(server, served):
    async def read(client):  # noqa: ANN001, ANN202
        return await client.read_deployment_by_name("closed-loop/nightly")

    nightly = server.call(read)
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "30 3 * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert schedule.active
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy == "ENQUEUE"
    assert nightly.enforce_parameter_schema
    assert nightly.parameter_openapi_schema["properties"]["run"]["$ref"].endswith("RunParameters")


def test_a_bad_parameter_is_rejected_before_a_run_exists(server, served):
    from prefect.exceptions import PrefectHTTPStatusError

    async def create_bad(client):  # noqa: ANN001, ANN202
        manual = await client.read_deployment_by_name("closed-loop/manual")
        before = len(await client.read_flow_runs())
        with pytest.raises(PrefectHTTPStatusError) as err:
            await client.create_flow_run_from_deployment(
                manual.id, parameters={"run": {"max_rounds": 0}}
            )
        return before, len(await client.read_flow_runs()), str(err.value)

    before, after, message = server.call(create_bad)
    assert after == before
    assert "max_rounds" in message or "Validation" in message, message


@pytest.mark.long
def test_a_manual_run_with_parameters_completes_with_its_artifacts_and_a_second_waits(
    server, served
):
    ws = served

    async def trigger(client):  # noqa: ANN001, ANN202
        manual = await client.read_deployment_by_name("closed-loop/manual")
        runs = []
        for _ in range(2):  # overlapping: the second waits for the first's slot
            runs.append(
                await client.create_flow_run_from_deployment(
                    manual.id,
                    parameters={"run": {"max_rounds": 1, "gates": {"max_near_copy_rate": 0.99}}},
                )
            )
        return [r.id for r in runs]

    first_id, second_id = server.call(trigger)
    first = wait_for_run(server, first_id)
    assert first.state.is_completed(), first.state
    second = wait_for_run(server, second_id)
    assert second.state.is_completed(), second.state
    assert second.state.message == "nothing to do"
    # The runs never overlapped.
    assert second.start_time >= first.end_time

    async def artifacts(client):  # noqa: ANN001, ANN202
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first_id]))
        )
        return {a.key: a.data for a in found}

    found = server.call(artifacts)
    assert {"clean-report", "training-summary", "sample-grid", "closed-loop-summary"} <= set(found)
    assert "| 1 | 1 | cgan | pass |" in found["closed-loop-summary"]

    # The run parameters landed in params.yaml; the run is one commit on synthloop/runs.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["validate"]["gates"]["max_near_copy_rate"] == 0.99
    log = subprocess.run(
        ["git", "log", "--format=%s", "synthloop/runs"], cwd=ws, capture_output=True, text=True
    ).stdout
    assert log.count("synthloop run: flow run") == 1, log
    (shard,) = (ws / "data/pool").glob("part-*-r01.parquet.dvc")
    assert (
        f"data/pool/{shard.name}"
        in subprocess.run(
            ["git", "ls-tree", "-r", "--name-only", "synthloop/runs"],
            cwd=ws,
            capture_output=True,
            text=True,
        ).stdout
    )


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


def test_the_ui_shows_the_manual_deployment_and_its_parameter_form(server, served):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it with apt-get)")
    pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    from playwright.sync_api import sync_playwright

    async def manual(client):  # noqa: ANN001, ANN202
        return await client.read_deployment_by_name("closed-loop/manual")

    deployment = server.call(manual)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=browser_path,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server.url}/deployments", wait_until="networkidle")
        page.get_by_text("manual", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("nightly", exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(SCREENSHOTS / "prefect-ui-deployments.png"), full_page=True)

        page.goto(
            f"{server.url}/deployments/deployment/{deployment.id}/run", wait_until="networkidle"
        )
        form = page.get_by_text("Max Rounds").first
        form.wait_for(timeout=60_000)
        assert page.get_by_text("Dry Run").first.is_visible()
        page.screenshot(path=str(SCREENSHOTS / "prefect-ui-manual-run-form.png"), full_page=True)

        # Submit the form as it stands (every field empty: params.yaml as it is).
        before = {r.id for r in server.call(manual_runs)}

        def submitted():  # noqa: ANN202
            return next((r for r in server.call(manual_runs) if r.id not in before), None)

        # On a loaded machine a click can land before the UI has wired the button, and then
        # nothing is sent: click again while no run has appeared (liveness waits, not timings).
        run = None
        for _ in range(3):
            page.get_by_role("button", name="Submit").click()
            run = poll(submitted, 90)
            if run is not None:
                break
        assert run is not None, "three clicks on Submit created no flow run"
        run = wait_for_run(server, run.id)
        assert run.state.is_completed(), run.state
        page.goto(f"{server.url}/runs/flow-run/{run.id}", wait_until="networkidle")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("closed-loop-summary").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SCREENSHOTS / "prefect-ui-run-artifacts.png"), full_page=True)
        browser.close()
    assert (SCREENSHOTS / "prefect-ui-manual-run-form.png").stat().st_size > 10_000


async def manual_runs(client):  # noqa: ANN001, ANN201
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    return await client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["manual"]))
    )


def test_prefect_yaml_deploys_both_deployments_to_a_work_pool(server, tmp_path):
    """`prefect deploy --all` of the committed prefect.yaml (no worker needed to register),
    its schedule filled in from the project's params.yaml, its descriptions from
    flows/deployments.py. Last in this module: it re-registers the deployments `synthloop
    serve` made."""
    from flows.deployments import DESCRIPTIONS

    ws = tmp_path / "project"
    shutil.copytree(
        REPO,
        ws,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "data",
            "models",
            "reports",
            "__pycache__",
            ".synthloop",
            "test-artifacts",
        ),
    )
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["schedule"] = {"cron": "15 4 * * 1-5", "timezone": "America/New_York"}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**server.env, "PWD": str(ws)}
    subprocess.run(
        ["prefect", "work-pool", "create", "synthloop", "--type", "process"],
        cwd=ws,
        env=env,
        check=True,
        capture_output=True,
    )
    proc = subprocess.run(
        ["prefect", "--no-prompt", "deploy", "--all"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    async def read(client):  # noqa: ANN001, ANN202
        return [
            await client.read_deployment_by_name(f"closed-loop/{n}") for n in ("nightly", "manual")
        ]

    nightly, manual = server.call(read)
    assert nightly.work_pool_name == manual.work_pool_name == "synthloop"
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (
        "15 4 * * 1-5",
        "America/New_York",
    )
    assert not manual.schedules
    assert nightly.description == DESCRIPTIONS["nightly"]
    assert manual.description == DESCRIPTIONS["manual"]
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": str(ws)
    }
