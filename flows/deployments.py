"""The two deployments of the closed loop, built from params.yaml.

- `closed-loop/nightly`: on params.yaml's `schedule.cron` in `schedule.timezone`.
- `closed-loop/manual`: no schedule; started from the UI's "Run" form or the API.

`synthloop serve` registers both with the Prefect server in PREFECT_API_URL and runs their
flow runs in this process's machine (no work pool needed). `prefect.yaml` declares the same
two for `prefect deploy` onto a work pool; its build step, `deployment_values`, hands it
the schedule from params.yaml and the descriptions from here, so neither is written twice.

Both are bound to the workspace they are served for (`flows.binding`): `params_path` is
frozen (read-only in the UI form, any other value refused by the server), and the serving
process names its workspace to the runs it starts, which refuse any other.

The Prefect settings of the serving process (PREFECT_API_URL, PREFECT_API_AUTH_STRING for a
server with basic authentication) apply to the registration, to the runner's polling and to
every flow run it starts: the runs inherit its environment.
"""

from __future__ import annotations

from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron
from prefect.utilities.annotations import freeze

from flows.binding import bind_served_params
from flows.closed_loop import closed_loop
from synthloop.config import PARAMS_FILE, Params, load_params

TAGS = ["synthloop"]
# One run per deployment at a time; a second one waits in the queue. Across the two
# deployments (and `make run`) the workspace lock keeps runs apart.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
DESCRIPTIONS = {
    "nightly": "The closed loop on a schedule (params.yaml `schedule`).",
    "manual": "The closed loop on demand: fill in the form (empty fields keep params.yaml).",
}


def build_deployments(params_path: Path) -> list[RunnerDeployment]:
    params_path = params_path.resolve()
    values = _values(load_params(params_path))
    nightly = closed_loop.to_deployment(
        name="nightly",
        schedules=[Cron(values["nightly"]["cron"], timezone=values["nightly"]["timezone"])],
        description=values["nightly"]["description"],
        **_common(params_path),
    )
    manual = closed_loop.to_deployment(
        name="manual", description=values["manual"]["description"], **_common(params_path)
    )
    return [nightly, manual]


def deployment_values(params_path: str = PARAMS_FILE) -> dict[str, dict[str, str]]:
    """prefect.yaml's build step: per deployment, the values `prefect deploy` templates in
    (`{{ deployments.nightly.cron }}`), read as `synthloop serve` reads them. `params_path`
    is relative to the folder `prefect deploy` runs in."""
    return _values(load_params(params_path))


def _values(params: Params) -> dict[str, dict[str, str]]:
    return {
        "nightly": {
            "description": DESCRIPTIONS["nightly"],
            "cron": params.schedule.cron,
            "timezone": params.schedule.timezone,
        },
        "manual": {"description": DESCRIPTIONS["manual"]},
    }


def _common(params_path: Path) -> dict:
    """What both deployments share (a fresh dict each: a deployment unwraps its frozen
    parameters in place)."""
    return {
        # Runs import the flow by module, whatever the runner's working directory.
        "entrypoint_type": EntrypointType.MODULE_PATH,
        # Read-only in the UI; with the schema enforced, the server refuses another value.
        "parameters": {"params_path": freeze(str(params_path))},
        "concurrency_limit": ONE_AT_A_TIME,
        "tags": TAGS,
        "enforce_parameter_schema": True,
    }


def serve(params_path: Path, limit: int = 1) -> None:
    """Register the deployments and run their flow runs until interrupted; the runs may use
    this workspace only."""
    from prefect import serve as prefect_serve

    deployments = build_deployments(bind_served_params(params_path))
    prefect_serve(*deployments, limit=limit)
