"""Integration: the real `dvc repro`, the real CLI and the real Prefect flow, end to end on a
tiny procedural dataset."""

import asyncio
import json

import pandas as pd
import pytest
import yaml

from flows.attempt import STAGE_ORDER as ALL_STAGES
from synthloop.config import GenerateConfig
from tasks.shared.feedback import error_extra
from tests.conftest import run_tool

pytestmark = pytest.mark.integration


def set_params(workspace, update) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    update(params)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))


def test_dvc_repro_builds_every_stage_then_skips(workspace):
    first = run_tool("dvc", "repro", cwd=workspace)
    for stage in ALL_STAGES:
        assert f"Running stage '{stage}'" in first.stdout, stage
    report = json.loads((workspace / "reports/clean.json").read_text())
    assert report["ingested"] == 60 and report["kept"] + report["quarantined_total"] == 60
    assert report["expectations"]["success"]
    assert (workspace / "models/generator/weights.safetensors").is_file()
    assert (workspace / "reports/samples.png").is_file()
    # per_class of each class, plus the error quotas from the evaluator's val errors.
    evaluator = json.loads((workspace / "reports/evaluator.json").read_text())
    quota = error_extra(8, GenerateConfig().error_quota, evaluator["per_class_accuracy"]["val"])
    expected = {c: 8 + quota.get(c, 0) for c in ("ellipse", "rectangle", "triangle")}
    synthetic = pd.read_parquet(workspace / "data/synthetic")
    assert synthetic.groupby("label").size().to_dict() == expected
    validation = json.loads((workspace / "reports/validation.json").read_text())
    assert validation["synthetic"] == sum(expected.values()) and "gates" in validation

    second = run_tool("dvc", "repro", cwd=workspace)
    assert "Running stage" not in second.stdout
    assert "up to date" in run_tool("dvc", "status", cwd=workspace).stdout

    # A changed generate param reruns generate and validate only.
    set_params(workspace, lambda p: p["generate"].update(per_class=6))
    third = run_tool("dvc", "repro", cwd=workspace)
    ran = {s for s in ALL_STAGES if f"Running stage '{s}'" in third.stdout}
    assert ran == {"generate", "validate"}


def test_bad_params_stop_the_cli_before_any_work(workspace):
    set_params(workspace, lambda p: p["clean"].update(image_size=-8))
    proc = run_tool("synthloop", "stage", "ingest", cwd=workspace, check=False)
    assert proc.returncode == 2
    assert "clean.image_size" in proc.stderr and "greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workspace / "data/ingested").exists()


def read_artifact(key: str, flow_run_id) -> str:  # noqa: ANN001
    """The artifact `key` of one flow run (other tests' runs share this session's API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                )
            )
            return found[0].data if found else ""

    return asyncio.run(read())


def test_a_failed_attempt_retrains_within_its_round_then_promotes(workspace, prefect_api):
    """Row FP (max_rounds 1, max_retrains 1) of the policy table, through the real flow."""
    from flows.closed_loop import closed_loop

    set_params(
        workspace,
        lambda p: (
            # a gain of 1.0 (every seed from 0 to all right) is impossible: attempt 1 fails
            p["validate"]["gates"].update(min_utility_delta=1.0),
            p["loop"].update(
                max_rounds=1,
                max_retrains=1,
                retrain=[
                    {"train": {"steps": 18}, "validate": {"gates": {"min_utility_delta": -1.0}}}
                ],
            ),
        ),
    )
    state = closed_loop(params_path=str(workspace / "params.yaml"), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["rounds"] == 1 and result["attempts"] == 2 and result["passed"]
    assert result["message"] == "promoted in round 1"

    loop = json.loads((workspace / "reports/loop.json").read_text())
    assert loop["result"] == "promoted" and loop["params_from"] == [1, 2]
    first, second = loop["attempts"]
    assert not first["passed"] and "promotion" not in first
    assert first["validation"]["gates"]["utility_lower_bound"]["passed"] is False
    assert first["failed_gates"] == [
        "utility_lower_bound "
        + "{} < 1.0".format(first["validation"]["gates"]["utility_lower_bound"]["value"])
    ]
    assert first["retrain_overrides"] == {} and second["retrain_step"] == 1
    assert second["retrain_overrides"]["train"] == {"steps": 18}
    assert second["passed"] and (second["round"], second["attempt"]) == (1, 2)
    assert second["params"]["train"]["steps"] == 18  # the retrain really changed params
    assert second["stages"]["train"] == "ran" and second["stages"]["ingest"] == "skipped"
    # Attempt 1 computed the sharded stages' shards as tasks; attempt 2 had nothing stale there.
    assert first["shards"]["ingest"]["computed"] == first["shards"]["ingest"]["shards"] > 1
    assert set(first["shards"]) == {"ingest", "clean", "augment", "validate"}
    assert "ingest" not in second["shards"] and "validate" in second["shards"]
    assert not list((workspace / ".synthloop/shards/ingest").glob("*"))  # merged, then removed
    assert second["promotion"]["promoted"] > 0
    assert set(second["dvc"]) >= {"data/fused", "models/generator", "data/synthetic"}

    # The promoted shard is a new DVC version of the pool, named by the run, and fuse will
    # read it; the report says which run and round made it.
    promotion = second["promotion"]
    shard = workspace / "data/pool" / promotion["shard"]
    assert promotion["shard"] == f"part-{loop['run']}-r01.parquet"
    assert shard.is_file() and shard.with_name(shard.name + ".dvc").is_file()
    assert loop["pool"] == [
        {
            "shard": promotion["shard"],
            "retired": False,
            "rows": promotion["promoted"],
            "per_class": promotion["per_class"],
            "run": loop["run"],
            "round": 1,
            "family": "cgan",
        }
    ]
    assert sum(loop["pool_per_class"].values()) == promotion["promoted"]
    # The overrides that led to the promotion stay: params.yaml is what made the pool.
    assert yaml.safe_load((workspace / "params.yaml").read_text())["train"]["steps"] == 18

    run_id = state.state_details.flow_run_id
    summary = read_artifact("closed-loop-summary", run_id)
    assert "**promoted**: promoted in round 1" in summary
    assert "| 1 | 1 | cgan | FAIL |" in summary and "| 1 | 2 | cgan | pass |" in summary
    assert "against the better of real data with and without plain augmentation" in summary
    assert "(baseline, chosen on val) |" in summary and "| **verdict** |" in summary
    assert "| class | train | val | test | total |" in read_artifact("clean-report", run_id)
    assert "data:image/png;base64," in read_artifact("sample-grid", run_id)
    assert "model version" in read_artifact("training-summary", run_id)


def test_a_corrupt_pool_shard_fails_the_run_before_training(workspace, prefect_api):
    from flows.closed_loop import closed_loop
    from tasks.shared.pool import PoolCorrupt

    assert closed_loop(params_path=str(workspace / "params.yaml"))["passed"]
    shard = next((workspace / "data/pool").glob("part-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    state = closed_loop(params_path=str(workspace / "params.yaml"), return_state=True)
    assert state.is_failed()
    with pytest.raises(PoolCorrupt, match="hash differs"):
        state.result()


def test_a_permanent_stage_error_fails_fast(workspace, prefect_api):
    from flows.attempt import StageFailed
    from flows.closed_loop import closed_loop

    set_params(workspace, lambda p: p["clean"].update(min_class_count=1000))
    state = closed_loop(params_path=str(workspace / "params.yaml"), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="clean.*permanent") as err:
        state.result()
    assert "critical expectation failed" in str(err.value)


def test_a_bakeoff_keeps_the_best_family_and_the_auto_retrain_follows_it(workspace, prefect_api):
    """loop.families through the real flow: one family fails and the others still run; the
    winner's outputs come back from DVC's run cache; when the gates fail, the auto policy has
    no training evidence (no val curve, DiffAugment already on) and switches to the bake-off's
    next family; after that nothing is left to try and the round ends without a third try."""
    from flows.bakeoff import ranking
    from flows.closed_loop import closed_loop

    set_params(
        workspace,
        lambda p: (
            p["validate"]["gates"].update(min_utility_delta=1.0),  # no attempt can pass
            p["train"].update(
                eval_every=0,
                vae={"latent_dim": 8, "width": 8, "kl_warmup": 4},
                transformer={"max_tokens": 64},  # 16x16x3 tokens: refused by name
            ),
            p["train"]["cgan"].update(diffaug=True),
            p["loop"].update(max_rounds=1, max_retrains=2, retrain="auto"),
            p["loop"].update(families=["cgan", "transformer", "vae"]),
        ),
    )
    start = (workspace / "params.yaml").read_text()
    state = closed_loop(params_path=str(workspace / "params.yaml"), return_state=True)
    assert state.is_failed(), state

    loop = json.loads((workspace / "reports/loop.json").read_text())
    table = loop["bakeoff"]
    rows = {r["family"]: r for r in table["rows"]}
    assert table["families"] == ["cgan", "transformer", "vae"]
    refused = rows["transformer"]
    assert refused["status"] == "failed" and "max_tokens" in refused["detail"]
    assert rows["cgan"]["status"] == rows["vae"]["status"] == "ok"
    winner = table["winner"]
    other = ({"cgan", "vae"} - {winner}).pop()
    assert [f for f, _ in ranking(table)] == [winner, other]
    assert tuple(rows[winner]["key"]) >= tuple(rows[other]["key"])

    first, second = loop["attempts"]  # no third: the policy had nothing left
    assert first["bakeoff"] == table and "bakeoff" not in second
    assert first["params"]["train"]["family"] == winner
    assert second["params"]["train"]["family"] == other
    assert second["retrain_overrides"] == {"train": {"family": other}}
    assert second["retrain_reason"] == first["next_retrain"]
    assert f"switch to {other}" in second["retrain_reason"] and second["next_retrain"] is None
    assert "the retrain policy found no change to try" in loop["message"]
    # Both attempts' models are the bake-off's own, restored by DVC, not trained again.
    card = json.loads((workspace / "models/generator/model_card.json").read_text())
    assert card["model_version"] == rows[other]["model_version"]
    assert (workspace / "params.yaml").read_text() == start  # nothing promoted: undone
    summary = read_artifact("closed-loop-summary", state.state_details.flow_run_id)
    assert f"**{winner}** wins" in summary and f"switch to {other}" in summary
