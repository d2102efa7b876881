"""The `closed-loop` Prefect flow: the DVC stages in rounds, closed by the quality gates.

DVC holds the acyclic part (dvc.yaml) and decides what is stale: a stage whose deps and
params are unchanged is skipped, every output is versioned. The flow adds what DVC cannot:
rounds, retries of transient failures, promotion of accepted samples into the pool, a
retrain policy when the gates fail, run history, logs and UI artifacts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State

from flows.loop import (
    DriftProbe,
    apply_overrides,
    dvc_add,
    dvc_hashes,
    overrides_for,
    stale_stages,
    tool_env,
)
from flows.parameters import RunParameters
from flows.sharded import SHARDED_STAGES, prepare_shards
from flows.summaries import (
    clean_summary_markdown,
    helped_verdict,
    loop_summary_markdown,
    sample_grid_markdown,
    training_summary_markdown,
)
from flows.workspace import (
    WorkspaceLock,
    changed_inputs,
    dvc_default_remote,
    dvc_push,
    input_fingerprint,
    record_run,
)
from synthloop.config import load_params
from synthloop.dataset import write_json

# One round of the loop, in DVC's order; DVC skips what has not changed.
STAGE_ORDER = (
    "ingest",
    "clean",
    "train_evaluator",
    "augment",
    "fuse",
    "train",
    "generate",
    "validate",
)

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
        env=tool_env(),
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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class GatesFailed(RuntimeError):
    """No attempt passed the quality gates within loop.max_retrains."""


@task(name="promote")
def promote_accepted(workspace: str, accepted: str, pool: str, round_no: int) -> dict:
    """Append the accepted rows to the pool and version the new shard with DVC."""
    from tasks.pool import promote

    result = promote(Path(accepted), Path(pool), round_no)
    if result["shard"]:
        result["md5"] = dvc_add(Path(workspace), Path(pool) / result["shard"])
    get_run_logger().info(
        "round %d: promoted %d accepted rows (%d already in the pool)",
        round_no,
        result["promoted"],
        result["already_in_pool"],
    )
    return result


@task(name="verify-pool")
def verify_pool_task(pool: str) -> int:
    from tasks.pool import verify_pool

    return verify_pool(Path(pool))


@task(name="retrain-params")
def retrain_params(params_file: str, overrides: dict) -> None:
    apply_overrides(Path(params_file), overrides)
    get_run_logger().info("retrain: params.yaml updated with %s", overrides)


def _target_reached(pool_counts: dict[str, int], classes: list[str], target: int | None) -> bool:
    return target is not None and all(pool_counts.get(c, 0) >= target for c in classes)


@flow(
    name="closed-loop",
    log_prints=True,
    description="Ingest, clean, augment, fuse, train, generate and validate in rounds; "
    "promote the accepted synthetic data while the gates pass.",
)
def closed_loop(
    params_path: str = "params.yaml",
    run: RunParameters = RunParameters(),  # noqa: B008 (never mutated)
) -> dict | State:
    """The closed loop on one workspace (the folder of `params_path`).

    A run: validate its parameters against params.yaml; take the workspace lock; stop with
    "nothing to do" when nothing it reads changed since the last successful run; then rounds
    of the DVC stages and the gates; on success record the versions in git and push the data
    to the DVC remote.

    Args:
        params_path: the workspace's params.yaml (the run works in its folder)
        run: this run's settings; empty fields keep params.yaml's values
    """
    logger = get_run_logger()
    params_file = Path(params_path).resolve()
    workspace = params_file.parent
    overrides = run.overrides()
    # A bad value (a missing folder, a family that is not there) stops before any work.
    params = load_params(params_file, overrides=overrides)
    run_name = _flow_run_label()
    with WorkspaceLock(workspace, params.orchestration.lock_timeout_s, holder=run_name):
        verify_pool_task(str(params.loop.pool))  # a corrupt pool fails the run before training
        if run.dry_run:
            return _dry_run(workspace, params_file, params, overrides)
        if overrides and load_params(params_file) != params:
            apply_overrides(params_file, overrides)
            logger.info("run parameters written into params.yaml: %s", overrides)
        params = load_params(params_file)
        changed = changed_inputs(params.versioning.state, _fingerprint(workspace, params_file))
        if changed == [] and not run.force:
            logger.info("nothing to do: no input changed since the last successful run")
            create_markdown_artifact(
                key="closed-loop-summary",
                markdown="# Closed loop\n\nNothing to do: params, raw data, feedback, pool "
                "and code are as they were when the gates last passed.",
                description="nothing to do",
            )
            return Completed(message="nothing to do", data={"result": "nothing to do"})
        if changed:
            logger.info("changed since the last successful run: %s", ", ".join(changed))
        result = _rounds(workspace, params_file, run.force)
        params = load_params(params_file)
        if result["passed"]:  # gates passed at this data version: the next run can skip
            _write_state(params, workspace, params_file, run_name)
        result["version"] = version_run(str(params_file), run_name, result)
    return result


def _fingerprint(workspace: Path, params_file: Path) -> dict[str, str]:
    """What the run reads, plus what DVC finds stale (a deleted output shows up there)."""
    found = input_fingerprint(workspace, params_file, load_params(params_file))
    found["dvc_status"] = ",".join(sorted(stale_stages(workspace)))
    return found


def _flow_run_label() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name} ({flow_run.id})" if flow_run.id else "a local run"


def _dry_run(workspace: Path, params_file: Path, params, overrides: dict) -> dict:  # noqa: ANN001
    """What a run would do: the stages DVC finds stale and the params it would change."""
    changed = changed_inputs(params.versioning.state, _fingerprint(workspace, params_file))
    stale = stale_stages(workspace)
    plan = {
        "result": "dry run",
        "overrides": overrides,
        "stale_stages": stale,
        "changed_inputs": changed,
        "nothing_to_do": changed == [] and not overrides,
    }
    get_run_logger().info("dry run: %s", json.dumps(plan))
    create_markdown_artifact(
        key="closed-loop-plan",
        markdown="# Closed loop: dry run\n\n```json\n" + json.dumps(plan, indent=2) + "\n```",
        description="what this run would do",
    )
    return plan


def _write_state(params, workspace: Path, params_file: Path, run_name: str) -> None:  # noqa: ANN001
    """The inputs at the end of a successful run: the next run compares against them."""
    write_json(
        params.versioning.state,
        {
            "passed": True,
            "run": run_name,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "fingerprint": _fingerprint(workspace, params_file),
        },
    )


@task(name="version-run")
def version_run(params_path: str, run_name: str, result: dict) -> dict:
    """Record the run's versions in git (when the workspace is a repo) and push the data to
    the DVC remote (when one is configured)."""
    logger = get_run_logger()
    params = load_params(params_path)
    workspace = Path(params_path).parent
    version: dict = {}
    if params.versioning.git_branch:
        message = (
            f"synthloop run: {run_name}\n\n{result['rounds']} round(s), last gates "
            f"{'passed' if result['passed'] else 'failed'}; pool per class: "
            f"{result['pool_per_class']}"
        )
        pool = os.path.relpath(params.loop.pool, workspace)
        commit = record_run(workspace, params.versioning.git_branch, message, pool)
        if commit is None:
            logger.info("versioning: %s is not in a git repository; no commit", workspace)
        else:
            version["git"] = {"branch": commit.branch, "commit": commit.commit}
            logger.info(
                "versioning: %s %s on %s",
                "committed" if commit.created else "unchanged:",
                commit.commit[:12],
                commit.branch,
            )
    remote = dvc_default_remote(workspace) if params.versioning.dvc_push else None
    if remote:
        version["dvc_remote"] = remote
        version["dvc_push"] = dvc_push(workspace)
        logger.info("versioning: pushed to DVC remote %r: %s", remote, version["dvc_push"])
    return version


def _rounds(workspace: Path, params_file: Path, force: bool) -> dict:
    """Rounds of: the DVC stages, validation gates, then promote the accepted samples into the
    pool (gates pass) or retrain with the next policy step (gates fail)."""
    from tasks.pool import pool_counts

    logger = get_run_logger()
    params = load_params(params_file)
    loop_cfg = params.loop
    rounds: list[dict] = []
    retrains = 0
    failed_for_good = False
    clean_report: dict = {}

    for round_no in range(1, loop_cfg.max_rounds + 1):
        params = load_params(params_file)
        if round_no > 1:
            verify_pool_task(str(loop_cfg.pool))
        drift = DriftProbe(params) if round_no == 1 else None
        drift_fid: float | None = None
        stages: dict[str, str] = {}
        shards: dict[str, dict] = {}
        for stage in STAGE_ORDER:
            rerun = force and round_no == 1
            if stage in SHARDED_STAGES and (rerun or stale_stages(workspace, stage)):
                # Its shards as parallel tasks first; the DVC stage then assembles them.
                shards[stage] = prepare_shards(stage, str(params_file))
            stages[stage] = run_stage(stage, str(workspace), rerun)
            if stage == "clean" and drift is not None and stages["clean"] == "ran":
                drift_fid = drift.measure()
                if drift_fid is not None:
                    logger.info("drift: evaluator FID old vs new clean train = %.3f", drift_fid)
                    if drift_fid > loop_cfg.drift_threshold:
                        # New data moved the distribution: no resuming old training state.
                        shutil.rmtree(params.train.checkpoints, ignore_errors=True)
        clean_report = _read_json(params.clean.report)
        validation = _read_json(params.validation.report)
        record = {
            "round": round_no,
            "attempt": retrains + 1,
            "stages": stages,
            "params": {
                "train": params.train.model_dump(
                    mode="json", include={"family", "steps", "lr", "batch_size", "seed"}
                )
            },
            "validation": {
                k: validation.get(k)
                for k in (
                    "synthetic",
                    "accepted",
                    "rejected",
                    "fid",
                    "fid_real_floor",
                    "class_consistency",
                    "near_copy_rate",
                    "utility",
                    "gates",
                )
            },
            "shards": shards,
            "passed": bool(validation.get("passed")),
            "dvc": dvc_hashes(workspace),
        }
        if drift_fid is not None:
            record["drift_fid"] = drift_fid
            record["drift_retrain_from_scratch"] = drift_fid > loop_cfg.drift_threshold
        rounds.append(record)
        if record["passed"]:
            record["promotion"] = promote_accepted(
                str(workspace), str(params.validation.accepted), str(loop_cfg.pool), round_no
            )
            counts = pool_counts(loop_cfg.pool)
            record["pool_per_class"] = counts
            if _target_reached(
                counts, list(clean_report.get("per_class", {})), loop_cfg.target_per_class
            ):
                logger.info("every class reached %d pooled images: done", loop_cfg.target_per_class)
                break
        else:
            failed = [
                n
                for n, g in validation.get("gates", {}).items()
                if n != "passed" and not g["passed"]
            ]
            logger.warning("round %d: gates failed: %s", round_no, ", ".join(failed))
            if retrains >= loop_cfg.max_retrains:
                failed_for_good = True
                break
            retrains += 1
            overrides = overrides_for(retrains, loop_cfg.retrain)
            record["retrain_overrides"] = overrides
            retrain_params(str(params_file), overrides)

    last_validation = _read_json(params.validation.report)
    loop = {
        "rounds": rounds,
        "retrains": retrains,
        "result": "failed" if failed_for_good else "completed",
        "verdict": helped_verdict(last_validation),
        "pool_per_class": pool_counts(loop_cfg.pool),
    }
    write_json(loop_cfg.report, loop)
    _publish(params, clean_report, loop)
    if failed_for_good:
        raise GatesFailed(
            f"gates never passed in {retrains + 1} attempt(s); nothing was promoted in the last "
            f"round. See {loop_cfg.report} and {params.validation.report}."
        )
    return {
        "rounds": len(rounds),
        "stages": rounds[-1]["stages"],
        "passed": rounds[-1]["passed"],
        "kept": clean_report.get("kept"),
        "ingested": clean_report.get("ingested"),
        "pool_per_class": loop["pool_per_class"],
    }


def _publish(params, clean_report: dict, loop: dict) -> None:  # noqa: ANN001
    """The run's Prefect artifacts: clean report, training summary, sample grid, loop table."""
    if clean_report:
        create_markdown_artifact(
            key="clean-report",
            markdown=clean_summary_markdown(clean_report),
            description="clean stage",
        )
    card = _read_json(params.train.output / "model_card.json")
    summary = _read_json(params.train.reports / "summary.json")
    if card:
        create_markdown_artifact(
            key="training-summary",
            markdown=training_summary_markdown(card, summary),
            description="train stage",
        )
    if params.generate.grid.is_file():
        create_markdown_artifact(
            key="sample-grid",
            markdown=sample_grid_markdown(params.generate.grid),
            description="generate stage",
        )
    create_markdown_artifact(
        key="closed-loop-summary",
        markdown=loop_summary_markdown(loop),
        description="rounds, gates, promotion and utility",
    )
