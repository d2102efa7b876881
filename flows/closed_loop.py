"""The `closed-loop` Prefect flow: the DVC stages in rounds, closed by the quality gates.

DVC holds the acyclic part (dvc.yaml) and decides what is stale: a stage whose deps and
params are unchanged is skipped, every output is versioned. The flow adds what DVC cannot:
rounds, retries of transient failures, promotion of accepted samples into the pool, a
retrain policy when the gates fail, run history, logs and UI artifacts.

A deployed run works only in the workspace it was served for (`flows.binding`), reads sources
only inside `ingest.allowed_roots` and feedback only inside the feedback folder; it refuses
anything else before it takes the workspace lock or writes anything.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from flows.attempt import (
    adopt_pool_orphans,
    promote_within_room,
    read_json,
    run_attempt,
    verify_pool_task,
)
from flows.bakeoff import ranking
from flows.binding import running_in_deployment, served_params_file
from flows.loop import overrides_for, stale_stages
from flows.parameters import RunParameters
from flows.params_file import ParamsFile
from flows.retrain import Retrain, choose_retrain, evidence_from
from flows.rounds import Attempt, Finish, decide, nothing_promoted_reason
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
from synthloop.config import Params, load_params
from synthloop.dataset import write_json
from tasks.shared.feedback import feedback_files


class GatesFailed(RuntimeError):
    """No round of the run promoted anything: every attempt failed its gates."""


# Never cached: it changes params.yaml, whose text (not its arguments) decides what that
# does; a cached result would skip the write.
@task(name="retrain-params", cache_policy=NO_CACHE)
def retrain_params(run_params: ParamsFile, overrides: dict) -> None:
    run_params.apply(overrides)
    get_run_logger().info("retrain: params.yaml updated with %s", overrides)


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

    A run: check that it may use this workspace (a deployed run only the one it was served
    for, `flows.binding`) and that every path it reads lies inside the workspace's allowed
    roots; validate its parameters against params.yaml; take the workspace lock; stop with
    "nothing to do" when nothing it reads changed since the last successful run; then rounds
    of the DVC stages and the gates; on success record the versions in git and push the data
    to the DVC remote. Every refusal comes before the run writes anything.

    Args:
        params_path: the workspace's params.yaml (the run works in its folder); a deployment
            fixes it to the workspace it serves
        run: this run's settings; empty fields keep params.yaml's values
    """
    logger = get_run_logger()
    params_file = served_params_file(params_path, deployed=running_in_deployment())
    workspace = params_file.parent
    overrides = run.overrides()
    # A bad value (a missing folder, a source outside ingest.allowed_roots, a family that is
    # not there) stops before any work; so does a feedback file that leads outside. (The
    # run's own parse of params.yaml comes once it holds the lock: the file may change while
    # it waits.)
    params = load_params(params_file, overrides=overrides)
    feedback_files(params.fuse.feedback)
    run_name = _flow_run_label()
    with WorkspaceLock(workspace, params.orchestration.lock_timeout_s, holder=run_name):
        verify_pool_task(str(params.loop.pool))  # a corrupt pool fails the run before training
        run_params = ParamsFile(params_file)  # parsed here; every change goes through it
        if run.dry_run:
            return _dry_run(workspace, run_params, params, overrides)
        # A promotion killed before `dvc add` left a shard DVC does not know: settle it first.
        adopt_pool_orphans(str(workspace), str(params.loop.pool))
        if overrides and run_params.params != params:
            run_params.apply(overrides)
            logger.info("run parameters written into params.yaml: %s", overrides)
        params = run_params.params
        changed = changed_inputs(params.versioning.state, _fingerprint(workspace, run_params))
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
        # Until this run succeeds, no later run may call the workspace done.
        write_json(params.versioning.state, {"passed": False, "run": run_name})
        key = _run_key()
        result = _rounds(workspace, run_params, run.force, key)
        # Something was promoted at this data version: the next run can skip.
        _write_state(workspace, run_params, run_name)
        params = run_params.params  # as the run left it: the last promoted attempt's
        result["version"] = version_run(
            str(workspace),
            run_name,
            result,
            params.versioning.git_branch,
            params.versioning.dvc_push,
            str(params.loop.pool),
        )
    # The state's message is the end state in words ("promoted in round 1", "nothing
    # promoted: every class at its target ..."): what the UI's run list shows.
    return Completed(message=result["message"], data=result)


def _run_key() -> str:
    """This run's key in pool shard names: the UTC time its rounds start and a token of its
    flow run id."""
    from prefect.runtime import flow_run

    from tasks.shared.pool import run_key

    return run_key(datetime.now(UTC), str(flow_run.id) if flow_run.id else None)


def _fingerprint(workspace: Path, params: ParamsFile) -> dict[str, str]:
    """What the run reads, plus what DVC finds stale (a deleted output shows up there)."""
    found = input_fingerprint(workspace, params.path, params.params)
    found["dvc_status"] = ",".join(sorted(stale_stages(workspace)))
    return found


def _flow_run_label() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name} ({flow_run.id})" if flow_run.id else "a local run"


def _dry_run(workspace: Path, run_params: ParamsFile, params: Params, overrides: dict) -> dict:
    """What a run would do: the stages DVC finds stale and the params it would change.
    `params`: with the run's overrides; `run_params`: params.yaml as it stands."""
    from tasks.shared.pool import pool_orphans

    changed = changed_inputs(params.versioning.state, _fingerprint(workspace, run_params))
    stale = stale_stages(workspace)
    plan = {
        "result": "dry run",
        "overrides": overrides,
        "stale_stages": stale,
        "changed_inputs": changed,
        "nothing_to_do": changed == [] and not overrides,
        # Shards an interrupted promotion left without a DVC record: a real run settles them.
        "pool_orphans": [p.name for p in pool_orphans(params.loop.pool)],
    }
    get_run_logger().info("dry run: %s", json.dumps(plan))
    create_markdown_artifact(
        key="closed-loop-plan",
        markdown="# Closed loop: dry run\n\n```json\n" + json.dumps(plan, indent=2) + "\n```",
        description="what this run would do",
    )
    return plan


def _write_state(workspace: Path, params: ParamsFile, run_name: str) -> None:
    """The inputs at the end of a successful run: the next run compares against them."""
    write_json(
        params.params.versioning.state,
        {
            "passed": True,
            "run": run_name,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "fingerprint": _fingerprint(workspace, params),
        },
    )


@task(name="version-run")
def version_run(
    workspace: str,
    run_name: str,
    result: dict,
    git_branch: str | None,
    push: bool,
    pool: str,
) -> dict:
    """Record the run's versions in git on `git_branch` (when the workspace is a repo and a
    branch is set) and push the data to the DVC remote (when `push` and one is configured).
    Plain values in, as params.yaml's `versioning` and `loop.pool` say."""
    logger = get_run_logger()
    root = Path(workspace)
    version: dict = {}
    if git_branch:
        message = (
            f"synthloop run: {run_name}\n\n{result['message']} ({result['attempts']} "
            f"attempt(s)); pool per class: {result['pool_per_class']}"
        )
        commit = record_run(root, git_branch, message, os.path.relpath(pool, root))
        if commit is None:
            logger.info("versioning: %s is not in a git repository; no commit", root)
        else:
            version["git"] = {"branch": commit.branch, "commit": commit.commit}
            logger.info(
                "versioning: %s %s on %s",
                "committed" if commit.created else "unchanged:",
                commit.commit[:12],
                commit.branch,
            )
    remote = dvc_default_remote(root) if push else None
    if remote:
        version["dvc_remote"] = remote
        version["dvc_push"] = dvc_push(root)
        logger.info("versioning: pushed to DVC remote %r: %s", remote, version["dvc_push"])
    return version


def _rounds(workspace: Path, run_params: ParamsFile, force: bool, key: str) -> dict:
    """Attempts of: the DVC stages and the validation gates, then promote the accepted samples
    into the pool (gates pass) or retry with the next retrain step (gates fail), as
    `flows.rounds.decide` says; returns the run's result or raises GatesFailed. params.yaml
    changes only through `run_params`; it ends as `_kept_params` says."""
    logger = get_run_logger()
    loop_cfg = run_params.params.loop
    start_text = run_params.snapshot()
    ran_with: dict[tuple[int, int], str] = {}  # (round, attempt) -> params.yaml it ran with
    history: list[Attempt] = []
    records: list[dict] = []
    clean_report: dict = {}
    pending: Retrain | None = None  # the auto policy's change for the next attempt
    try:
        while True:
            step = decide(history, loop_cfg.max_rounds, loop_cfg.max_retrains)
            if isinstance(step, Finish):
                break
            applied, reason = {}, None
            if step.retrain_step:  # applied now, at the start of the attempt that uses them
                if pending is not None:
                    applied, reason = pending.overrides, pending.reason
                else:
                    applied = overrides_for(step.retrain_step, loop_cfg.retrain)
                    reason = f"loop.retrain step {step.retrain_step}"
                retrain_params(run_params, applied)
                logger.info("retrain: %s", reason)
            first = not history
            bakeoff = bool(loop_cfg.families) and step.attempt == 1
            record = run_attempt(workspace, run_params, step, force and first, first, bakeoff)
            # What it ran with, after a bake-off the winner's family: kept if it promotes.
            ran_with[(step.round, step.attempt)] = run_params.snapshot()
            record["retrain_step"], record["retrain_overrides"] = step.retrain_step, applied
            record["retrain_reason"] = reason
            params = run_params.params  # what the attempt ran with
            clean_report = read_json(params.clean.report)
            full, pending, nothing = False, None, None
            if record["passed"]:
                record["promotion"], full = promote_within_room(
                    workspace, params, key, step.round, clean_report
                )
                nothing = nothing_promoted_reason(record["promotion"])
            else:
                logger.warning(
                    "round %d attempt %d: gates failed: %s",
                    step.round,
                    step.attempt,
                    "; ".join(record["failed_gates"]),
                )
                if loop_cfg.retrain == "auto":
                    pending = _next_retrain(params, record, records, loop_cfg)
                    record["next_retrain"] = pending.reason if pending else None
            records.append(record)
            history.append(
                Attempt(
                    step.round,
                    step.attempt,
                    record["passed"],
                    tuple(record["failed_gates"]),
                    full,
                    retrainable=loop_cfg.retrain != "auto" or pending is not None,
                    nothing_promoted=nothing,
                )
            )
    except BaseException:
        run_params.restore(_kept_params(history, ran_with, start_text))
        raise
    finish = step
    restored = run_params.restore(_kept_params(history, ran_with, start_text))
    if restored:
        logger.info("params.yaml: retrain overrides that did not lead to a promotion undone")
    params = run_params.params
    promoted = [r for r in records if r["passed"]]
    from tasks.shared.pool import describe_pool, pool_counts

    loop = {
        "run": key,
        "result": run_result(finish),
        "end": finish.reason,
        "message": finish.message,
        "rounds": finish.rounds,
        "promoted_rounds": list(finish.promoted_rounds),
        "attempts": records,
        "params_from": list(finish.params_from) if finish.params_from else "start of the run",
        "params_restored": restored,
        "verdict": helped_verdict(promoted[-1]["validation"])
        if promoted
        else "No synthetic data was promoted: there is no utility verdict for this run.",
        "pool_per_class": pool_counts(loop_cfg.pool),
        "pool": describe_pool(loop_cfg.pool),
        # The verdict table of the last promoted attempt (of the last attempt: none promoted).
        "utility": (promoted or records)[-1]["validation"].get("utility"),
        # The privacy figures of that same attempt.
        "privacy": (promoted or records)[-1]["validation"].get("privacy"),
        # The last bake-off of the run (loop.families), with its winner.
        "bakeoff": next((r["bakeoff"] for r in reversed(records) if r.get("bakeoff")), None),
        # People's `label,extra` requests, each met or answered with why not.
        "requests": _answered_requests(promoted, params),
    }
    write_json(loop_cfg.report, loop)
    _publish(params, clean_report, loop)
    logger.info("closed loop: %s", finish.message)
    if not finish.succeeded:
        raise GatesFailed(
            f"{finish.message}. See {loop_cfg.report} and {params.validation.report}."
        )
    return {
        "result": loop["result"],
        "rounds": finish.rounds,
        "attempts": finish.attempts,
        "promoted_rounds": list(finish.promoted_rounds),
        "message": finish.message,
        "stages": records[-1]["stages"],
        "passed": True,
        "kept": clean_report.get("kept"),
        "ingested": clean_report.get("ingested"),
        "pool_per_class": loop["pool_per_class"],
    }


def _answered_requests(promoted: list[dict], params) -> dict[str, dict]:  # noqa: ANN001
    """The last promotion's answers to the requests; with no promotion, every request
    unmet because the gates failed."""
    for record in reversed(promoted):
        if "requests" in record.get("promotion", {}):
            return record["promotion"]["requests"]
    from tasks.shared.feedback import read_requests

    requests = read_requests(params.fuse.feedback)[0]
    why = "the gates failed: nothing was promoted"
    return {label: {"asked": extra, "met": False, "why": why} for label, extra in requests.items()}


def run_result(finish: Finish) -> str:
    """`promoted` (rows went into the pool), `nothing promoted` (the gates passed, the pool
    gained nothing: the message says why) or `failed`."""
    if finish.promoted_rounds:
        return "promoted"
    return "nothing promoted" if finish.succeeded else "failed"


def _next_retrain(params: Params, record: dict, records: list[dict], loop_cfg) -> Retrain | None:  # noqa: ANN001
    """The auto policy's change after this failed attempt (flows/retrain.py), or None.
    `params`: what the attempt ran with."""
    this_round = [r for r in (*records, record) if r["round"] == record["round"]]
    table = next((r["bakeoff"] for r in this_round if r.get("bakeoff")), {})
    evidence = evidence_from(
        read_json(params.train.output / "model_card.json"),
        params.train.model_dump(mode="json"),
        read_json(params.validation.report),
        ranking(table) if table else (),
    )
    families_run = [r["params"]["train"]["family"] for r in this_round]
    choice = choose_retrain(
        evidence, families_run, loop_cfg.retrain_max_steps, loop_cfg.overfit_sign
    )
    get_run_logger().info(
        "retrain policy: %s", choice.reason if choice else "no evidence points at a change"
    )
    return choice


def _kept_params(history: list[Attempt], ran_with: dict, start_text: str) -> str:
    """params.yaml as the last promoted attempt ran it; the run's start when none promoted."""
    promoted = [a for a in history if a.passed]
    return ran_with[(promoted[-1].round, promoted[-1].attempt)] if promoted else start_text


def _publish(params, clean_report: dict, loop: dict) -> None:  # noqa: ANN001
    """The run's Prefect artifacts: clean report, training summary, sample grid, loop table."""
    if clean_report:
        create_markdown_artifact(
            key="clean-report",
            markdown=clean_summary_markdown(clean_report, params.clean.near_duplicate_sheet),
            description="clean stage",
        )
    card = read_json(params.train.output / "model_card.json")
    summary = read_json(params.train.reports / "summary.json")
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
