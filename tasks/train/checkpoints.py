"""Training checkpoints: everything a bit-exact resume needs, and the fingerprint that
refuses a resume under other settings or data.

`checkpoints/last.pt` holds the networks, their EMA copies, the optimizers, every random
generator's state (torch, CUDA, the batch stream, and under DDP every rank's noise), the
losses and the evaluations so far, with a fingerprint of the settings and data that made it.
It is written to a temporary file and renamed, so a kill never leaves half a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from synthloop.config import TrainConfig
from synthloop.dataset import atomic_file
from tasks.shared.generators import Family
from tasks.train.train_eval import Evaluations

CHECKPOINT = "last.pt"
# The settings a checkpoint can only be resumed with; steps, logging and paths may change
# between runs. The active family's own section (train.cgan or train.diffusion), the data
# version and the kind of device are added.
FINGERPRINT_KEYS = (
    "family", "batch_size", "lr", "ema_decay", "seed", "class_balance",
    "eval_every", "patience", "eval_per_class",  # they choose the output and the last step
)  # fmt: skip


def make_fingerprint(
    cfg: TrainConfig,
    data_version: str,
    device: torch.device,
    data_device: torch.device,
    world: int = 1,
    eval_version: str | None = None,
) -> dict[str, str]:
    values: dict[str, Any] = {f"train.{k}": getattr(cfg, k) for k in FINGERPRINT_KEYS}
    values[f"train.{cfg.family}"] = getattr(cfg, cfg.family).model_dump(mode="json")
    values["data version"] = data_version
    # CPU and CUDA random generators differ, so a run resumes on the kind of device it began
    values["device"] = f"{device.type}, dataset on {data_device.type}"
    if world > 1:  # the batch slices and the per-rank noise streams depend on it
        values["world size"] = world
    if eval_version is not None:  # the scores, so the best step, depend on them
        values["evaluation"] = eval_version
    return {k: json.dumps(v, sort_keys=True) for k, v in values.items()}


def save_checkpoint(
    path: Path,
    family: Family,
    batches: torch.Generator,
    fingerprint: dict[str, str],
    step: int,
    train_seconds: float,
    rows: list[dict],
    rank_rngs: list[torch.Tensor] | None = None,
    evals: Evaluations | None = None,
) -> None:
    """Everything a bit-exact resume needs, written to a temporary file and renamed."""
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "family": family.state_dict(),  # networks, EMA, optimizers, the family's rng
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "batches": batches.get_state(),
            "ranks": rank_rngs,  # DDP: every rank's family noise stream, by rank
        },
        "train_seconds": train_seconds,
        "losses": rows,
        "evaluations": evals.state_dict() if evals is not None else None,
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(
    path: Path,
    fingerprint: dict[str, str],
    family: Family,
    batches: torch.Generator,
    cfg: TrainConfig,
    rank: int = 0,
    evals: Evaluations | None = None,
) -> tuple[int, float, list[dict]]:
    """Restore `family`, the random streams and `evals`; returns (step, train seconds, loss
    rows)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["fingerprint"]
    keys = [*fingerprint, *(k for k in saved if k not in fingerprint)]  # e.g. world size
    changed = [
        f"{key}: {saved.get(key, 'unset')} -> {fingerprint.get(key, 'unset')}"
        for key in keys
        if saved.get(key) != fingerprint.get(key)
    ]
    if changed:
        raise ValueError(
            f"{path}: cannot resume, this checkpoint was made with other settings or data "
            f"({'; '.join(changed)}). Set train.resume: false to start over, or delete "
            f"{path.parent}."
        )
    if state["step"] > cfg.steps:
        raise ValueError(
            f"{path}: the checkpoint is at step {state['step']}, beyond train.steps="
            f"{cfg.steps}; raise train.steps or set train.resume: false"
        )
    family.load_state_dict(state["family"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    batches.set_state(state["rng"]["batches"])
    if state["rng"].get("ranks"):
        family.rng.set_state(state["rng"]["ranks"][rank])
    if evals is not None and state.get("evaluations") is not None:
        evals.load_state_dict(state["evaluations"])
    return state["step"], state["train_seconds"], state["losses"]


def gather_rank_rngs(family: Family, world: int) -> list[torch.Tensor] | None:
    """Every rank's family random state, for rank 0's checkpoint; None without DDP."""
    if world == 1:
        return None
    states: list[Any] = [None] * world
    dist.all_gather_object(states, family.rng.get_state())
    return states
