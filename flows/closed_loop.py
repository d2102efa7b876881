"""The `closed-loop` Prefect flow: runs the DVC stages in order, one Prefect task each.

DVC decides what is stale (a stage whose deps and params are unchanged is skipped) and
versions every output; Prefect adds retries, run history, logs and UI artifacts. Later
stages of the loop extend STAGE_ORDER and this same flow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from synthloop.config import load_params

STAGE_ORDER = ("ingest", "clean")

# DVC output that marks a failure worth retrying (another process holds the repo lock).
_TRANSIENT = re.compile(r"Unable to acquire lock|lock is held|Resource temporarily unavailable")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str, transient: bool) -> None:
        self.stage, self.returncode, self.transient = stage, returncode, transient
        kind = "transient" if transient else "permanent"
        super().__init__(f"stage {stage!r} failed ({kind}, exit {returncode}):\n{tail}")


def _retry_if_transient(task, task_run, state) -> bool:  # noqa: ANN001 (Prefect's signature)
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:
        return True
    return False


def _tool_env() -> dict[str, str]:
    """Put this interpreter's scripts (dvc, synthloop) first on PATH for the stage commands."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_if_transient,
)
def run_stage(stage: str, workspace: str, force: bool = False) -> str:
    """`dvc repro` one stage; its output is streamed into the flow run's logs."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    logger.info("$ %s  (in %s)", " ".join(cmd), workspace)
    proc = subprocess.Popen(
        cmd,
        cwd=workspace,
        env=_tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            logger.info("%s", line)
    returncode = proc.wait()
    output = "\n".join(lines)
    if returncode != 0:
        transient = bool(_TRANSIENT.search(output)) and "exited with 2" not in output
        raise StageFailed(stage, returncode, "\n".join(lines[-20:]), transient)
    skipped = "didn't change, skipping" in output or "is cached" in output
    return "skipped" if skipped else "ran"


def clean_summary_markdown(report: dict) -> str:
    """The clean report as a markdown artifact."""
    lines = [
        "# Clean data",
        "",
        f"**{report['kept']}** kept of **{report['ingested']}** ingested; "
        f"**{report['quarantined_total']}** quarantined.",
        "",
        "| quarantine reason | rows |",
        "| --- | ---: |",
        *(f"| {reason} | {count} |" for reason, count in report["quarantined"].items()),
        "",
        "| class | train | val | test | total |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {label} | {c['train']} | {c['val']} | {c['test']} | {c['total']} |"
            for label, c in report["per_class"].items()
        ),
    ]
    expectations = report.get("expectations")
    if expectations:
        verdict = "passed" if expectations["success"] else "failed"
        lines += ["", f"Great Expectations: **{verdict}** ({expectations['evaluated']} checks)"]
        lines += [
            f"- {'CRITICAL' if f['critical'] else 'warning'}: `{f['expectation']}` {f['kwargs']}"
            for f in expectations["failed"]
        ]
    return "\n".join(lines)


@flow(name="closed-loop", log_prints=True)
def closed_loop(params_path: str = "params.yaml", force: bool = False) -> dict:
    """Run the pipeline stages through DVC and publish the clean report."""
    logger = get_run_logger()
    params_file = Path(params_path).resolve()
    load_params(params_file)  # a bad params.yaml stops the run before any work
    workspace = str(params_file.parent)

    outcome = {stage: run_stage(stage, workspace, force) for stage in STAGE_ORDER}
    logger.info("stages: %s", outcome)

    report = json.loads((params_file.parent / "reports" / "clean.json").read_text())
    create_markdown_artifact(
        key="clean-report", markdown=clean_summary_markdown(report), description="clean stage"
    )
    return {"stages": outcome, "kept": report["kept"], "ingested": report["ingested"]}
