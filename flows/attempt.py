"""One attempt of the closed loop: the DVC stages in order, the validation record, and the
promotion of the accepted rows into the pool when the gates pass.

Each stage is `dvc repro --single-item` in a Prefect task whose output streams into the
flow run's logs; a failure DVC reports as transient (a held repo lock) is retried, any
other fails fast. Sharded stages compute their shards as parallel tasks first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.bakeoff import bakeoff_row, run_bakeoff
from flows.loop import dvc_add, dvc_hashes, stale_stages, tool_env
from flows.params_file import ParamsFile
from flows.rounds import Next, failed_gate_texts
from flows.sharded import prepare_shards
from synthloop.config import Params
from tasks.stages import FAMILY_STAGES, STAGE_ORDER, is_sharded

# DVC output that marks a failure worth retrying (another process holds the repo lock).
_TRANSIENT = re.compile(r"Unable to acquire lock|lock is held|Resource temporarily unavailable")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str, transient: bool) -> None:
        self.stage, self.returncode, self.transient = stage, returncode, transient
        kind = "transient" if transient else "permanent"
        super().__init__(f"stage {stage!r} failed ({kind}, exit {returncode}):\n{tail}")


def _retry_if_transient(task, task_run, state) -> bool:  # noqa: ANN001 (Prefect's signature)
    """Retry only a stage failure DVC reported as transient; anything else fails fast (a
    missing `dvc`, a bug, a crash: a retry would only repeat it)."""
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:
        return False
    return False


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_if_transient,
)
def run_stage(stage: str, workspace: str, force: bool = False) -> None:
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


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@task(name="promote")
def promote_accepted(
    workspace: str,
    accepted: str,
    pool: str,
    key: str,
    round_no: int,
    family: str,
    room: dict[str, int | None],
    total_room: int | None,
    replace: list[list[str]] | None = None,
) -> dict:
    """Append the accepted rows to the pool, within its room, and the refresh validate kept
    (`replace`: [new id, pooled id] pairs), retiring the rows it replaces; version every
    shard written or rewritten (an emptied shard's record is removed: DVC keeps its data)."""
    from flows.pool_admin import forget_shard, migrate_legacy_names
    from tasks.shared.pool import RETIRED, promote

    renamed = migrate_legacy_names(Path(workspace), Path(pool))
    pairs = [(new, old) for new, old in replace or []]
    result = promote(Path(accepted), Path(pool), key, round_no, family, room, total_room, pairs)
    if renamed:
        result["renamed_legacy_shards"] = renamed
    if result["shard"]:
        result["md5"] = dvc_add(Path(workspace), Path(pool) / result["shard"])
    if result["retired_shard"]:
        dvc_add(Path(workspace), Path(pool) / RETIRED / result["retired_shard"])
    for name in result["rewritten"]:
        dvc_add(Path(workspace), Path(pool) / name)
    for name in result["emptied"]:
        forget_shard(Path(workspace), Path(pool) / name)
    where = f"as {result['shard']}" if result["shard"] else "(no shard written)"
    get_run_logger().info(
        "round %d: promoted %d accepted rows %s, %d of them in place of older pooled rows "
        "(retired to %s; %d already in the pool, %d over target)",
        round_no,
        result["promoted"],
        where,
        result["replaced"],
        result["retired_shard"] or "-",
        result["already_in_pool"],
        result["over_target"],
    )
    return result


@task(name="adopt-pool-orphans")
def adopt_pool_orphans(workspace: str, pool: str) -> dict[str, str]:
    """Version or set aside what an interrupted promotion left in the pool (logged)."""
    from flows.pool_admin import adopt_orphans

    done = adopt_orphans(Path(workspace), Path(pool))
    for name, what in done.items():
        get_run_logger().warning("pool: %s %s", name, what)
    return done


@task(name="verify-pool")
def verify_pool_task(pool: str) -> int:
    from tasks.shared.pool import verify_pool

    return verify_pool(Path(pool))


def run_attempt(
    workspace: Path,
    run_params: ParamsFile,
    step: Next,
    force: bool,
    probe_drift: bool,
    bakeoff: bool = False,
) -> dict:
    """One attempt: the DVC stages in order (their shards first), then the validation report.
    With `bakeoff`, the family stages run once per family of `loop.families` first
    (flows/bakeoff.py), and params.yaml is left at the winner's family. Before fuse, the
    drift since the start is measured (when clean reran) and a pool made from data the run
    moved away from is retired (`retire_stale_pool`). params.yaml changes only through
    `run_params` (the bake-off's families)."""
    params = run_params.params
    table = None
    if not probe_drift:
        verify_pool_task(str(params.loop.pool))
    drift = None
    if probe_drift:
        from flows.drift import DriftProbe  # torch: imported only when drift is measured

        drift = DriftProbe(params)
    drift_fid: float | None = None
    retired: dict | None = None
    stages: dict[str, str] = {}
    seconds: dict[str, float] = {}  # wall time of each stage that ran, its shards included
    shards: dict[str, dict] = {}
    # DVC's own verdict (`dvc status --json`) says which stages must run: asked once, and
    # again only after a stage ran (its outputs may make later stages stale).
    stale = set(stale_stages(workspace))
    for stage in STAGE_ORDER:
        if bakeoff and stage == FAMILY_STAGES[0]:
            table = _bakeoff(workspace, run_params, params.loop.families, force)
            force = False  # the winner's outputs come back from DVC's run cache
            stale = set(stale_stages(workspace))
        if stage == "fuse":  # before fuse reads the pool
            if drift is not None and (stages["clean"] == "ran" or drift.moved_at_start):
                drift_fid = _measure_drift(drift, params)
            now = run_params.params  # as the file stands now (the bake-off runs later)
            retired = retire_stale_pool(
                str(workspace),
                str(now.loop.pool),
                str(now.clean.output / "train"),
                now.loop.drift_threshold,
                drift_fid,
                drift.reason if drift else None,
            )
            if retired:
                stale = set(stale_stages(workspace))  # the pool changed: fuse must rerun
        if not (force or stage in stale):
            stages[stage] = "skipped"
            continue
        began = time.perf_counter()
        if is_sharded(stage):
            # Its shards as parallel tasks first; the DVC stage then assembles them.
            shards[stage] = prepare_shards(
                stage, str(run_params.path), run_params.params.orchestration
            )
        run_stage(stage, str(workspace), force)
        stages[stage] = "ran"
        seconds[stage] = round(time.perf_counter() - began, 2)
        if stage != STAGE_ORDER[-1]:
            stale = set(stale_stages(workspace))
    params = run_params.params  # after a bake-off: the winner's
    validation = read_json(params.validation.report)
    record = {
        "round": step.round,
        "attempt": step.attempt,
        "stages": stages,
        "stage_seconds": seconds,
        "params": {
            "train": params.train.model_dump(
                mode="json", include={"family", "steps", "lr", "batch_size", "seed"}
            )
        },
        "validation": {k: validation.get(k) for k in _RECORDED_FIGURES},
        "shards": shards,
        "passed": bool(validation.get("passed")),
        "failed_gates": list(failed_gate_texts(validation.get("gates", {}))),
        "dvc": dvc_hashes(workspace),
    }
    if table is not None:
        record["bakeoff"] = table
    if drift_fid is not None:
        record["drift_fid"] = drift_fid
        record["drift_retrain_from_scratch"] = drift_fid > params.loop.drift_threshold
        if drift is not None and drift.reason:
            record["drift_reason"] = drift.reason
    if retired:
        record["pool_retired"] = retired
    return record


def _measure_drift(drift, params) -> float | None:  # noqa: ANN001 (a DriftProbe, Params)
    """The drift since the run started; beyond the threshold, the generator's training state
    is dropped (the distribution moved: nothing to resume)."""
    fid = drift.measure()
    if fid is not None:
        get_run_logger().info(
            "drift: evaluator FID old vs new clean train = %.3f%s",
            fid,
            f" ({drift.reason})" if drift.reason else "",
        )
        if fid > params.loop.drift_threshold:
            shutil.rmtree(params.train.checkpoints, ignore_errors=True)
    return fid


# Never cached: what it retires depends on the pool on disk, not on its arguments.
@task(name="retire-stale-pool", cache_policy=NO_CACHE)
def retire_stale_pool(
    workspace: str,
    pool: str,
    clean_train: str,
    threshold: float,
    drift_fid: float | None,
    drift_reason: str | None,
) -> dict | None:
    """Retire the live pool shards made from data the run moved away from, before fuse reads
    them; returns the record (None: nothing retired). `pool`, `threshold`: `loop.pool` and
    `loop.drift_threshold`; `clean_train`: the clean stage's train split.

    Beyond `loop.drift_threshold` (infinity included) every live shard goes; within it, a
    shard whose image size differs from the clean train split's (drift beyond measuring, and
    fuse cannot mix it in: a run that stopped after clean leaves that). Retiring is `dvc move`
    into `retired/` with the reason in each `.dvc` file: restorable, and git and the DVC cache
    keep the shards; the run's commit records it.
    """
    from flows.pool_admin import retire_shards
    from tasks.shared.pool import describe_sizes, image_sizes, live_sizes

    pool = Path(pool)
    live = live_sizes(pool)
    if not live:
        return None
    if drift_fid is not None and drift_fid > threshold:
        names = sorted(live)
        why = drift_reason or f"evaluator FID {drift_fid:.3f}"
        reason = f"the real data moved beyond loop.drift_threshold ({threshold}): {why}"
    else:
        train = image_sizes(Path(clean_train))
        names = sorted(name for name, sizes in live.items() if train and not sizes <= train)
        if not names:
            return None
        drift_fid = float("inf")
        old = set().union(*(live[name] for name in names))
        reason = (
            f"image size changed: the pool holds {describe_sizes(old)}, the clean train "
            f"split {describe_sizes(train)}"
        )
    record = {
        "reason": reason,
        "drift_fid": drift_fid,
        "drift_threshold": threshold,
        **retire_shards(Path(workspace), pool, names, reason),
        "restore": f"dvc move {_rel(workspace, pool)}/retired/SHARD {_rel(workspace, pool)}/SHARD",
    }
    get_run_logger().warning(
        "pool: retired %d shard(s), %d rows, into %s: %s",
        len(names),
        record["rows"],
        pool / "retired",
        reason,
    )
    return record


def _rel(workspace: str, path: Path) -> str:
    return os.path.relpath(path, workspace)


class BakeoffFailed(RuntimeError):
    """Every family of the bake-off failed its stages."""


def _bakeoff(workspace: Path, run_params: ParamsFile, families: list[str], force: bool) -> dict:
    """Every family through the family stages on the same upstream data; params.yaml ends at
    the winner's family. Raises BakeoffFailed when no family got through."""
    logger = get_run_logger()

    def run_family(family: str) -> dict:
        params = run_params.set_family(family)
        for stage in FAMILY_STAGES:
            if force or stale_stages(workspace, stage):
                run_stage(stage, str(workspace), force)
        row = bakeoff_row(
            family,
            read_json(params.validation.report),
            read_json(params.train.output / "model_card.json"),
            read_json(params.generate.summary),
        )
        logger.info(
            "bake-off: %s: gates %s, utility %s [%s, %s], FID ratio %s",
            family, "pass" if row["passed"] else "FAIL", row["utility_delta"],
            row["utility_low"], row["utility_high"], row["fid_ratio"],
        )  # fmt: skip
        return row

    table = run_bakeoff(families, run_family)
    for row in table["rows"]:
        if row["status"] == "failed":
            logger.warning("bake-off: %s failed: %s", row["family"], row["error"])
    if table["winner"] is None:
        raise BakeoffFailed(f"every family of the bake-off failed: {table['rows']}")
    run_params.set_family(table["winner"])
    logger.info("bake-off: %s wins (%s)", table["winner"], table["rule"])
    return table


_RECORDED_FIGURES = (
    "synthetic",
    "accepted",
    "rejected",
    "fid",
    "fid_real_floor",
    "class_consistency",
    "near_copy_rate",
    "privacy",
    "utility",
    "gates",
)


def promote_within_room(
    workspace: Path, params: Params, key: str, round_no: int, clean_report: dict
) -> tuple[dict, bool]:
    """Promote within the pool's room; returns the promotion and whether the pool is full.
    `params`: what the attempt ran with."""
    from tasks.shared.feedback import read_requests
    from tasks.shared.pool import answer_requests, pool_counts, pool_full, pool_room, pool_targets

    pool = params.loop.pool
    train_per_class = {c: v["train"] for c, v in clean_report.get("per_class", {}).items()}
    requests = read_requests(params.fuse.feedback)[0]
    targets = pool_targets(
        train_per_class, params.loop.target_per_class, params.loop.synthetic_multiple, requests
    )
    before = pool_counts(pool)
    room, total = pool_room(before, targets, params.loop.max_pool_rows)
    family = read_json(params.train.output / "model_card.json").get("family", "")
    # The refresh validate scored and kept (tasks/validate/stage.py), pair by pair.
    refresh = read_json(params.validation.report).get("utility", {}).get("refresh") or {}
    promotion = promote_accepted(
        str(workspace),
        str(params.validation.accepted),
        str(pool),
        key,
        round_no,
        family,
        room,
        total,
        refresh.get("pairs") or None,
    )
    promotion["targets"] = targets
    after = Counter(pool_counts(pool))
    _, disk_room = pool_room(dict(after), targets, params.loop.max_pool_rows)
    promotion["requests"] = answer_requests(requests, targets, dict(after), disk_room)
    return promotion, pool_full(dict(after), targets, params.loop.max_pool_rows)
