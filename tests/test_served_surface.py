"""The run surface through a real, authenticated Prefect server on loopback: a client
without the auth string is refused; `synthloop serve` passes the string through and an
authenticated client's manual run completes; a run cannot leave the served workspace,
neither through `params_path` nor through a source outside `ingest.allowed_roots`."""

from __future__ import annotations

import httpx
import pytest
import yaml

from tests.conftest import build_workspace, small_params
from tests.prefect_server import PrefectServer, serving, wait_for_run

pytestmark = pytest.mark.integration

AUTH = "synthloop:loopback-test-secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-auth-home"), auth_string=AUTH)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """A workspace served with the auth string in `synthloop serve`'s environment."""
    ws = build_workspace(tmp_path_factory.mktemp("served-auth") / "ws", small_params())
    with serving(server, ws):
        yield ws


def create_manual_run(server: PrefectServer, parameters: dict):  # noqa: ANN201
    async def create(client):  # noqa: ANN001, ANN202
        manual = await client.read_deployment_by_name("closed-loop/manual")
        return (await client.create_flow_run_from_deployment(manual.id, parameters=parameters)).id

    return server.call(create)


def test_a_client_without_the_auth_string_is_refused(server, served):
    from prefect.exceptions import PrefectHTTPStatusError

    async def deployments(client):  # noqa: ANN001, ANN202
        return await client.read_deployments()

    with pytest.raises(PrefectHTTPStatusError) as err:
        server.call(deployments, authenticated=False)
    assert err.value.response.status_code == 401
    wrong = httpx.post(f"{server.api}/deployments/filter", json={}, auth=("synthloop", "guess"))
    assert wrong.status_code == 401
    assert {d.name for d in server.call(deployments)} >= {"nightly", "manual"}


def test_an_authenticated_manual_run_completes(server, served):
    run = wait_for_run(server, create_manual_run(server, {"run": {"dry_run": True}}))
    assert run.state.is_completed(), run.state
    assert run.parameters["params_path"] == str(served / "params.yaml")


def test_the_server_refuses_a_params_path_other_than_the_served_one(server, served, tmp_path):
    from prefect.exceptions import PrefectHTTPStatusError

    other = build_workspace(tmp_path / "other")

    async def runs(client):  # noqa: ANN001, ANN202
        return len(await client.read_flow_runs())

    before = server.call(runs)
    with pytest.raises(PrefectHTTPStatusError) as err:
        create_manual_run(server, {"params_path": str(other / "params.yaml")})
    assert "params_path" in str(err.value), err.value
    assert server.call(runs) == before


def test_the_runner_refuses_it_even_when_the_schema_is_not_enforced(server, served, tmp_path):
    """Someone with the auth string may switch enforcement off (the open-source server has no
    roles); the served runner still refuses another workspace before it touches it."""
    from prefect.client.schemas.actions import DeploymentUpdate

    other = build_workspace(tmp_path / "other")
    params_before = (other / "params.yaml").read_text()

    async def unenforce(client):  # noqa: ANN001, ANN202
        manual = await client.read_deployment_by_name("closed-loop/manual")
        await client.update_deployment(manual.id, DeploymentUpdate(enforce_parameter_schema=False))

    server.call(unenforce)
    try:
        run_id = create_manual_run(
            server, {"params_path": str(other / "params.yaml"), "run": {"dry_run": True}}
        )
        run = wait_for_run(server, run_id)
    finally:
        server.call(_enforce)
    assert run.state.is_failed(), run.state
    assert "is not the workspace this deployment serves" in run.state.message
    assert (other / "params.yaml").read_text() == params_before
    assert not (other / ".synthloop").exists()  # not even the workspace lock


async def _enforce(client) -> None:  # noqa: ANN001
    from prefect.client.schemas.actions import DeploymentUpdate

    manual = await client.read_deployment_by_name("closed-loop/manual")
    await client.update_deployment(manual.id, DeploymentUpdate(enforce_parameter_schema=True))


def test_a_source_outside_the_allowed_roots_fails_the_run_before_any_stage(
    server, served, tmp_path
):
    outside = tmp_path / "elsewhere"
    (outside / "a").mkdir(parents=True)
    params_before = (served / "params.yaml").read_text()
    sources = [{"kind": "image_folder", "path": "data/raw/shapes"}]
    sources.append({"kind": "image_folder", "path": str(outside)})
    run = wait_for_run(server, create_manual_run(server, {"run": {"sources": sources}}))
    assert run.state.is_failed(), run.state
    message = run.state.message
    assert "ingest.sources[1].path" in message and "outside the allowed roots" in message, message
    assert "data/raw" in message

    async def task_runs(client):  # noqa: ANN001, ANN202
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )

    assert server.call(task_runs) == []  # no stage, not even the pool check, ran
    assert (served / "params.yaml").read_text() == params_before
    assert yaml.safe_load(params_before)["ingest"]["sources"] == sources[:1]
    assert not (served / "data/ingested").exists()


def test_a_feedback_file_linked_from_outside_fails_the_run_before_any_stage(
    server, served, tmp_path
):
    secret = tmp_path / "secret.csv"
    secret.write_text("label,extra\nellipse,1\n")
    link = served / "data/feedback/requests.csv"
    link.symlink_to(secret)
    try:
        run = wait_for_run(server, create_manual_run(server, {}))
    finally:
        link.unlink()
    assert run.state.is_failed(), run.state
    assert "requests.csv resolves to" in run.state.message, run.state.message
    assert not (served / "data/ingested").exists()
