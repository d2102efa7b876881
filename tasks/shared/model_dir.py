"""The model directory train writes and generate reads (train.output).

  weights.safetensors  the family's export weights (the EMA generator at the best evaluation)
  config.json          the TrainConfig that made it, plus classes, channels, size
  model_card.json      the card train composes, plus model_version: a hash of the weights

`write_model` replaces the directory as a whole, so a reader never sees half a model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from synthloop.config import TrainConfig
from synthloop.dataset import atomic_dir, file_hash, write_json

WEIGHTS = "weights.safetensors"


def model_version(weights: Path) -> str:
    """A content hash of the weights file: the version samples and reports refer to."""
    return file_hash(weights, digest_size=8)


def write_model(
    cfg: TrainConfig,
    weights: dict[str, torch.Tensor],
    classes: list[str],
    channels: int,
    size: int,
    card: dict,
) -> str:
    """weights.safetensors (the family's export weights), config.json and model_card.json,
    replacing the output as one."""
    with atomic_dir(cfg.output) as out:
        save_file(weights, out / WEIGHTS, metadata={"family": cfg.family})
        version = model_version(out / WEIGHTS)
        write_json(
            out / "config.json",
            {
                "train": cfg.model_dump(mode="json"),
                "num_classes": len(classes),
                "classes": classes,
                "channels": channels,
                "size": size,
            },
        )
        write_json(out / "model_card.json", {**card, "model_version": version})
    return version
