"""Which workspace a flow run may work in: the one its deployment was served for.

A deployment binds its workspace twice, so that nobody with access to the Prefect UI or API
can point a run at another folder:

- On the server: `build_deployments` freezes the `params_path` parameter
  (`prefect.utilities.annotations.freeze`). The UI form shows it read-only, and with
  `enforce_parameter_schema` the server refuses a flow run with any other value before the
  run exists.
- In the runner: `synthloop serve` puts the absolute path of its params.yaml in
  `SYNTHLOOP_SERVED_PARAMS` before it serves. A served deployment runs the runner's own flow
  object in a process that inherits the runner's environment (no pull steps, no job
  variables), so nothing sent through the API can change that value. A deployed run whose
  `params_path` resolves to another file is refused before it reads or writes anything; so
  is a deployed run in a process that names no workspace (a worker started without the
  variable). This second check holds even when someone edits the deployment through the API
  (Prefect's open-source server has no roles: whoever has the auth string may change a
  deployment's parameters or switch schema enforcement off).

A run outside a deployment (`synthloop run`, a test calling the flow) uses the params file it
is given: the command line is trusted, the UI is not.
"""

from __future__ import annotations

import os
from pathlib import Path

SERVED_PARAMS_ENV = "SYNTHLOOP_SERVED_PARAMS"


class WorkspaceNotServed(ValueError):
    """A deployed run asked for a workspace its runner does not serve."""


def bind_served_params(params_path: Path) -> Path:
    """Name `params_path` as this process's served workspace (for the runs it starts)."""
    served = params_path.resolve()
    os.environ[SERVED_PARAMS_ENV] = str(served)
    return served


def served_params_file(params_path: str, deployed: bool) -> Path:
    """The params file a run may use: `params_path` resolved, after checking it against the
    served workspace (when this process serves one, or when the run is deployed)."""
    asked = Path(params_path).resolve()
    served = os.environ.get(SERVED_PARAMS_ENV)
    if served:
        if asked != Path(served).resolve():
            raise WorkspaceNotServed(
                f"params_path: {params_path!r} is not the workspace this deployment serves "
                f"({served}); runs of it use that params.yaml only. Leave params_path as the "
                "deployment sets it, or serve the other workspace with its own "
                "`synthloop serve`."
            )
        return asked
    if deployed:
        raise WorkspaceNotServed(
            f"params_path: this deployed run's process names no workspace ({SERVED_PARAMS_ENV} "
            "is not set), so it cannot tell whether it may use "
            f"{params_path!r}. Serve the deployments with `synthloop serve`, or start the "
            f"worker with {SERVED_PARAMS_ENV}=<workspace>/params.yaml."
        )
    return asked


def running_in_deployment() -> bool:
    """Whether the current flow run was created from a deployment."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)
