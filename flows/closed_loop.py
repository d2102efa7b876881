"""The `closed-loop` Prefect flow: the DVC stages in rounds, closed by the quality gates.

DVC holds the acyclic part (dvc.yaml) and decides what is stale: a stage whose deps and
params are unchanged is skipped, every output is versioned. The flow adds what DVC cannot:
rounds, retries of transient failures, promotion of accepted samples into the pool, a
retrain policy when the gates fail, run history, logs and UI artifacts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.loop import (
    DriftProbe,
    apply_overrides,
    dvc_add,
    dvc_hashes,
    overrides_for,
    tool_env,
)
from flows.summaries import (
    clean_summary_markdown,
    helped_verdict,
    loop_summary_markdown,
    sample_grid_markdown,
    training_summary_markdown,
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


@flow(name="closed-loop", log_prints=True)
def closed_loop(params_path: str = "params.yaml", force: bool = False) -> dict:
    """Rounds of: the DVC stages, validation gates, then promote the accepted samples into the
    pool (gates pass) or retrain with the next policy step (gates fail)."""
    from tasks.pool import pool_counts

    logger = get_run_logger()
    params_file = Path(params_path).resolve()
    params = load_params(params_file)  # a bad params.yaml stops the run before any work
    workspace = params_file.parent
    loop_cfg = params.loop
    rounds: list[dict] = []
    retrains = 0
    failed_for_good = False
    clean_report: dict = {}

    for round_no in range(1, loop_cfg.max_rounds + 1):
        params = load_params(params_file)
        verify_pool_task(str(loop_cfg.pool))  # a corrupt pool fails the run before training
        drift = DriftProbe(params) if round_no == 1 else None
        drift_fid: float | None = None
        stages: dict[str, str] = {}
        for stage in STAGE_ORDER:
            stages[stage] = run_stage(stage, str(workspace), force and round_no == 1)
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
