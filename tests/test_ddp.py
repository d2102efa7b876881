"""The train stage under torchrun: the launch command, and a real 2-process DDP run on CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_params
from safetensors.torch import load_file
from test_train import make_dataset, make_yardstick

from synthloop.config import PARAMS_ENV, DistributedConfig, TrainConfig, parse_params
from tasks.shared.model_dir import model_version
from tasks.train import distributed
from tasks.train import stage as train
from tasks.train.distributed import torchrun_command

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
TAIL = ["-m", "cli.main", "--params", "/p/params.yaml", "stage", "train"]


def test_torchrun_command_on_one_node_is_standalone() -> None:
    cmd = torchrun_command(DistributedConfig(nproc_per_node=4), Path("/p/params.yaml"))
    assert cmd == [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "4", "--nnodes", "1", "--standalone", *TAIL,
    ]  # fmt: skip


def test_torchrun_command_on_several_nodes_meets_at_the_endpoint() -> None:
    cfg = DistributedConfig(nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="n0:29500")
    cmd = torchrun_command(cfg, Path("/p/params.yaml"))
    assert cmd == [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "n0:29500", *TAIL,
    ]  # fmt: skip
    assert "--standalone" not in cmd


def test_train_stage_launches_torchrun_only_outside_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    raw = small_params()
    raw["train"]["distributed"] = {"nproc_per_node": 2}
    params = parse_params(raw, root=tmp_path, check_paths=False)
    calls: list[str] = []
    monkeypatch.setattr(train, "launch_torchrun", lambda cfg, path: calls.append(str(path)))
    monkeypatch.setattr(  # with validate's acceptance line, which its evaluations use
        train, "run_train", lambda cfg, line: calls.append(f"run_train {line}")
    )
    monkeypatch.setenv(PARAMS_ENV, "/p/params.yaml")
    for var in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    train.run_stage(params)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun's processes see it
    train.run_stage(params)
    monkeypatch.delenv("WORLD_SIZE")
    one_process = params.train.model_copy(update={"distributed": DistributedConfig()})
    train.run_stage(params.model_copy(update={"train": one_process}))
    line = params.validation.min_confidence
    assert calls == ["/p/params.yaml", f"run_train {line}", f"run_train {line}"]


def test_a_failed_torchrun_names_the_stage_and_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = TrainConfig.model_validate(
        {"output": tmp_path / "model", "distributed": {"nproc_per_node": 2}}
    )
    ran: list[list[str]] = []

    def fake_run(cmd: list[str], check: bool) -> subprocess.CompletedProcess:
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="stage train: torchrun exited with code 3"):
        distributed.launch_torchrun(cfg, Path("/p/params.yaml"))
    assert ran == [torchrun_command(cfg.distributed, Path("/p/params.yaml"))]


def run_processes(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a launcher in its own session; on a timeout, kill its ranks too (a hung rank
    would otherwise outlive the test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):  # as if not already inside torchrun
        env.pop(var, None)
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_stage(params: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cli.main", "--params", str(params), "stage", "train"]
    return run_processes(cmd, cwd=params.parent)


@pytest.fixture
def ddp_params(tmp_path: Path) -> Path:
    """A params file whose train stage runs 2 CPU processes (gloo) on a tiny fused set, and
    the evaluator and val split its evaluations read (rank 0 scores, every rank stops)."""
    make_dataset(tmp_path / "data/fused")
    make_yardstick(tmp_path)
    raw = small_params()
    raw["ingest"]["sources"] = [{"kind": "demo"}]  # unused here; needs no folder
    raw["train"] = {
        "steps": 4,
        "batch_size": 8,
        "checkpoint_every": 4,  # one checkpoint, at the last step
        "log_every": 2,
        "eval_every": 2,
        "eval_per_class": 4,
        "device": "cpu",
        "cgan": {"z_dim": 8, "width": 8},
        "distributed": {"nproc_per_node": 2, "backend": "gloo"},
    }
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    return params


def test_train_stage_runs_two_ddp_processes(ddp_params: Path) -> None:
    root = ddp_params.parent
    proc = run_stage(ddp_params)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    log = proc.stdout + proc.stderr
    assert "launching under torchrun" in log
    assert log.count("train: cgan on 36 images") == 1, log  # rank 0 alone logs

    checkpoints = sorted(p.name for p in (root / "models/checkpoints/train").iterdir())
    assert checkpoints == ["last.pt"]
    ckpt = torch.load(root / "models/checkpoints/train/last.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert json.loads(ckpt["fingerprint"]["world size"]) == 2
    noise = ckpt["rng"]["ranks"]  # each rank drew its own noise
    assert len(noise) == 2 and not torch.equal(noise[0], noise[1])

    out = root / "models/generator"
    card = json.loads((out / "model_card.json").read_text())
    assert card["world_size"] == 2 and card["steps"] == 4
    assert card["model_version"] == model_version(out / "weights.safetensors")
    assert load_file(out / "weights.safetensors")
    assert all(math.isfinite(v) for v in card["final_losses"].values())
    assert [row["step"] for row in ckpt["losses"]] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for row in ckpt["losses"] for v in row.values())
    assert (root / "reports/train/losses.csv").is_file()
    assert [point["step"] for point in card["eval_curve"]] == [2, 4]
    assert card["best_step"] in (2, 4) and card["stopped_early"] is False


# Each torchrun rank runs this: three trainings in one launch (processes are what costs
# time here), each rank saving the parameters and optimizer moments its family ends with.
RANK_SCRIPT = """
import sys
from pathlib import Path

import torch

from synthloop.config import load_params
from tasks.train import distributed
from tasks.train import stage as train
from tasks.shared.generators import FAMILIES
from tasks.train.train_eval import FixedBatchScorer

built = []
scored = []


class Recorded(FAMILIES["cgan"]):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        built.append(self)


FAMILIES["cgan"] = Recorded
base, root = load_params(sys.argv[1]).train, Path(sys.argv[2])
rank, world, device = distributed.init_distributed(torch.device("cpu"), "gloo")


def scripted(self, family):  # best at step 2, no better at 3: patience 1 stops there
    scored.append(family.steps)
    return {"kid": {1: 2.0, 2: 1.0, 3: 1.5}[family.steps], "rejected": 0.0}


def run(name, **update):
    out = root / name
    paths = {"output": out / "model", "checkpoints": out / "ckpt", "reports": out / "reports"}
    built.clear()
    train.train(base.model_copy(update=paths | update), device, rank, world)
    family = built[0]  # later ones are FLOP probes
    state = {k: dict(m.named_parameters()) for k, m in family.modules.items()}
    state["optimizers"] = {k: o.state_dict()["state"] for k, o in family.optimizers.items()}
    state["steps"] = family.steps
    torch.save(state, out / f"rank{rank}.pt")


run("whole", steps=6)
run("parts", steps=4)
run("parts", steps=6, resume=True)
FixedBatchScorer.measure = scripted  # only rank 0 calls it: the others learn of the stop
run("stop", steps=6, eval_every=1, patience=1)
torch.save(scored, root / f"scored{rank}.pt")
torch.distributed.destroy_process_group()
"""


def test_ddp_ranks_stay_in_step_and_resume_exactly(ddp_params: Path, tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--standalone", str(script), str(ddp_params), str(tmp_path)]
    proc = run_processes(cmd, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"

    def ranks(name: str) -> list[dict]:
        return [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    whole, parts = ranks("whole"), ranks("parts")
    assert set(whole[0]) == {"G", "D", "G_ema", "optimizers", "steps"} and whole[0]["G"]
    assert int(whole[0]["optimizers"]["G"][0]["step"]) == 6
    # gradients are averaged: the same weights and optimizer moments on every rank
    torch.testing.assert_close(whole[1], whole[0], rtol=0, atol=0)
    # 4 steps, then a resume from rank 0's checkpoint: where 6 uninterrupted steps end
    for rank in (0, 1):
        torch.testing.assert_close(parts[rank], whole[rank], rtol=0, atol=0)
    card = json.loads((tmp_path / "parts/model/model_card.json").read_text())
    assert (card["resumed_from_step"], card["world_size"]) == (4, 2)
    expected = (tmp_path / "whole/model/weights.safetensors").read_bytes()
    assert (tmp_path / "parts/model/weights.safetensors").read_bytes() == expected
    whole_card = json.loads((tmp_path / "whole/model/model_card.json").read_text())
    assert [p["step"] for p in whole_card["eval_curve"]] == [2, 4, 6]
    for key in ("best_step", "eval_curve", "model_version"):
        assert card[key] == whole_card[key], key

    # rank 0 alone scored; its stop at step 3 reached rank 1, which stopped there too
    scored = [torch.load(tmp_path / f"scored{r}.pt", weights_only=True) for r in (0, 1)]
    assert scored == [[1, 2, 3], []]
    stopped = ranks("stop")
    assert [s["steps"] for s in stopped] == [3, 3]
    torch.testing.assert_close(stopped[1], stopped[0], rtol=0, atol=0)
    stop_card = json.loads((tmp_path / "stop/model/model_card.json").read_text())
    assert (stop_card["steps"], stop_card["best_step"], stop_card["stopped_early"]) == (3, 2, True)
