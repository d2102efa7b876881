"""Compute a sharded stage's shards as parallel Prefect tasks, before DVC runs the stage.

`prepare_shards(stage, params_path)` plans the stage's shards (synthloop/sharding.py) and
runs each as a Prefect task on the task runner `params.orchestration` names: threads in this
process, or a Dask cluster (a running one at `dask_address`, else a local one of
`max_workers` processes). Each shard's result lands in the workspace's content-addressed
shard cache; `dvc repro --single-item <stage>` then runs `synthloop stage <stage>`, which
merges them into the stage's outputs. DVC still decides what is stale and versions the
outputs; a shard computed here for params that then change is simply never used.

Tasks exchange only small summaries (paths, counts) with the flow, never images; a Dask
worker must see the workspace's files (the same machine, or a shared file system).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from synthloop.config import OrchestrationConfig, load_params
from synthloop.sharding import Shard, StageSpec, cache_dir, compute_shard, shard_key
from tasks.stages import STAGES, is_sharded, stage_module

__all__ = ["prepare_shards", "shard_stage", "task_runner"]


def stage_spec(stage: str) -> StageSpec:
    if not is_sharded(stage):
        sharded = [s for s in STAGES if is_sharded(s)]
        raise ValueError(f"stage {stage!r} is not sharded; sharded: {', '.join(sharded)}")
    return stage_module(stage).SHARDING


def task_runner(orchestration: OrchestrationConfig) -> TaskRunner:
    """The task runner `params.orchestration` asks for."""
    if orchestration.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=orchestration.max_workers)
    from prefect_dask import DaskTaskRunner  # imported here: only the dask runner needs it

    if orchestration.dask_address:
        return DaskTaskRunner(address=orchestration.dask_address)
    # Processes, one thread each: the stages hold the GIL (PNG codecs, torch on small images).
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": orchestration.max_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


# No Prefect cache and no retries: the shard cache is content-addressed already, and a
# shard that fails here is computed again (and fails loudly) when the stage itself runs.
@task(name="shard", task_run_name="{stage}-shard-{index}", cache_policy=NO_CACHE)
def run_shard(stage: str, index: int, shard: Shard, config: Any, root: str, key: str) -> dict:
    """One shard into the cache under `root` at `key`; a small summary back."""
    folder, _, reused = compute_shard(stage_spec(stage), config, shard, Path(root), key)
    return {"index": index, "folder": str(folder), "reused": reused}


@flow(name="shard-stage", flow_run_name="shard-{stage}")
def shard_stage(stage: str, params_path: str) -> dict:
    """Every shard of `stage` as a task on this flow's task runner; the counts back."""
    logger = get_run_logger()
    params_file = Path(params_path).resolve()
    spec = stage_spec(stage)
    config = spec.config(load_params(params_file))
    shards = spec.plan(config)
    root = str(cache_dir(params_file.parent, stage))
    # Keys here, in the flow's thread: they read the code's sources once, not on every worker.
    keys = [shard_key(spec, config, shard) for shard in shards]
    futures = [
        run_shard.submit(stage, shard.index, shard, config, root, key)
        for shard, key in zip(shards, keys, strict=True)
    ]
    wait(futures)
    failed = [f for f in futures if f.state.is_failed()]
    for future in failed:
        logger.error("%s", future.state.message)
    if failed:
        failed[0].result()  # raises that shard's ShardFailed (stage, shard and reason)
    reused = sum(f.result()["reused"] for f in futures)
    summary = {"stage": stage, "shards": len(shards), "computed": len(shards) - reused}
    summary["reused"] = reused
    logger.info(
        "%s: %d shard(s), %d computed, %d already cached",
        stage,
        summary["shards"],
        summary["computed"],
        reused,
    )
    return summary


def prepare_shards(
    stage: str, params_path: str, orchestration: OrchestrationConfig | None = None
) -> dict:
    """Compute `stage`'s shards on the task runner of `orchestration` (default: params.yaml's
    `orchestration`; a subflow when called inside a flow); returns {stage, shards, computed,
    reused}. The subflow reads the stage's config from `params_path` itself, as the stage
    will: its shard keys are that config's."""
    stage_spec(stage)  # not sharded: a clear error before any task runs
    if orchestration is None:
        orchestration = load_params(params_path).orchestration
    runner = task_runner(orchestration)
    return shard_stage.with_options(task_runner=runner)(stage, str(Path(params_path).resolve()))
