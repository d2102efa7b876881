"""Distributed training (DDP): the torchrun launch and each rank's set-up.

With train.distributed set to more than one process, `synthloop stage train` re-runs
itself under torchrun (`torchrun_command`), one process per device; each process joins the
process group (`init_distributed`) and takes its device. tasks/train/stage.py holds the loop.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from synthloop.config import DistributedConfig, TrainConfig

log = logging.getLogger(__name__)


def inside_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_command(cfg: DistributedConfig, params_path: Path) -> list[str]:
    """The torchrun command that runs `synthloop stage train` once per process; on several
    nodes, every node runs it with its own node_rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nproc_per_node", str(cfg.nproc_per_node), "--nnodes", str(cfg.nnodes)]
    if cfg.nnodes == 1:
        cmd.append("--standalone")  # a local rendezvous on a free port
    else:
        cmd += ["--node_rank", str(cfg.node_rank)]
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", str(cfg.rdzv_endpoint)]
    return cmd + ["-m", "cli.main", "--params", str(params_path), "stage", "train"]


def launch_torchrun(cfg: TrainConfig, params_path: Path) -> dict:
    """Run the train stage under torchrun and wait; returns the model card rank 0 wrote
    (empty on a node that does not hold it)."""
    cmd = torchrun_command(cfg.distributed, params_path)
    log.info("train: launching under torchrun: %s", " ".join(cmd))
    card = cfg.output / "model_card.json"
    before = card.stat().st_mtime_ns if card.is_file() else None
    returncode = subprocess.run(cmd, check=False).returncode
    if returncode != 0:
        raise RuntimeError(
            f"stage train: torchrun exited with code {returncode} (see the ranks' output above)"
        )
    # rank 0 may have run on another node: an unchanged card here is not this run's
    if card.is_file() and card.stat().st_mtime_ns != before:
        return json.loads(card.read_text())
    return {}


def init_distributed(device: torch.device, backend: str) -> tuple[int, int, torch.device]:
    """Inside torchrun with more than one process: join the process group and take this
    process's device (cuda:LOCAL_RANK). Returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), world, device
