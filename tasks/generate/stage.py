"""Generate: sample a labelled synthetic dataset from the trained generator.

Loads the model directory that train wrote (config.json says which family and shapes,
weights.safetensors holds the EMA weights), draws per_class images of every class, plus
per_class_extra[label] for the classes feedback asked more of, in batches from one seeded
torch.Generator, and writes them as an image dataset (IMAGE_SCHEMA): id = content hash of
the PNG, split "train", source "synthetic", parent_id "<model_version>:seed=<seed>", so
every row names the model and the seed that made it. Noise is drawn on the CPU, so a seed
gives the same images on any device (up to the device's float rounding). A rare exact
duplicate (same PNG bytes, so the same id) is written once and counted.

Also writes a labelled grid for people to look at (one row per class, the class name at
the left, nearest-neighbour upscaled) and a JSON summary beside it: the counts, and the
sampler's own seconds and img/s.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file
from tqdm import tqdm

from synthloop.config import GenerateConfig, Params, TrainConfig
from synthloop.dataset import (
    IMAGE_SCHEMA,
    ShardWriter,
    atomic_dir,
    atomic_file,
    content_id,
    remove_stale_temporaries,
    write_json,
)
from tasks.shared.feedback import requested_extra
from tasks.shared.generators import FAMILIES, Family
from tasks.shared.images import encode_rows, model_classes, resolve_device, to_uint8
from tasks.shared.model_dir import WEIGHTS, model_version

log = logging.getLogger(__name__)

MIN_CELL = 32  # grid cells are at least this many pixels, so 8x8 images are visible
PAD = 4


@dataclass
class LoadedModel:
    family: Family
    classes: list[str]
    channels: int
    size: int
    version: str


def run_generate(cfg: GenerateConfig) -> dict:
    """Sample `cfg.output` from the model in `cfg.model`; returns the summary it writes."""
    remove_stale_temporaries(cfg.output)
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device)
    counts = plan_counts(model.classes, cfg.per_class, cfg.per_class_extra)
    labels = torch.cat(
        [torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts.values())]
    )
    parent_id = f"{model.version}:seed={cfg.seed}"
    generator = torch.Generator().manual_seed(cfg.seed)  # CPU noise: device-independent

    written: Counter[str] = Counter()
    duplicates = 0
    seen: set[str] = set()
    grid_rows: list[list[torch.Tensor]] = [[] for _ in model.classes]
    bar = tqdm(total=len(labels), unit="img", disable=not sys.stderr.isatty())
    sample_seconds = 0.0  # the sampler alone, not the encoding: the family's speed
    with atomic_dir(cfg.output) as out, ShardWriter(out, IMAGE_SCHEMA, cfg.shard_rows) as rows:
        for batch in labels.split(cfg.batch_size):
            began = time.perf_counter()
            images = to_uint8(model.family.sample(batch, generator)).cpu()
            sample_seconds += time.perf_counter() - began
            for image, png, c in zip(images, encode_rows(images), batch.tolist(), strict=True):
                if len(grid_rows[c]) < cfg.grid_per_class:
                    grid_rows[c].append(image)
                row_id = content_id(png)
                if row_id in seen:
                    duplicates += 1
                    continue
                seen.add(row_id)
                label = model.classes[c]
                written[label] += 1
                rows.append(
                    {
                        "id": row_id,
                        "label": label,
                        "split": "train",
                        "source": "synthetic",
                        "parent_id": parent_id,
                        "image": png,
                        "height": model.size,
                        "width": model.size,
                        "channels": model.channels,
                    }
                )
            bar.update(len(batch))
    bar.close()
    write_grid(cfg.grid, grid_rows, model.classes, model.size, cfg.grid_per_class)

    summary = {
        "model": str(cfg.model),
        "model_version": model.version,
        "seed": cfg.seed,
        "parent_id": parent_id,
        "per_class": {label: written[label] for label in model.classes},
        "total": sum(written.values()),
        "duplicates_dropped": duplicates,
        "sample_seconds": round(sample_seconds, 3),
        "sample_images_per_second": round(len(labels) / max(sample_seconds, 1e-9), 1),
        "output": str(cfg.output),
        "grid": str(cfg.grid),
    }
    write_json(cfg.summary, summary)
    log.info(
        "generate: %d images (%d classes, %d duplicates dropped) from model %s -> %s",
        summary["total"], len(model.classes), duplicates, model.version, cfg.output,
    )  # fmt: skip
    return summary


class ModelCorrupt(RuntimeError):
    """Generator weights that no longer match the hash recorded when they were trained."""


def load_model(model_dir: Path, device: torch.device) -> LoadedModel:
    """Rebuild the trained family for sampling from config.json and weights.safetensors."""
    config, weights = model_dir / "config.json", model_dir / WEIGHTS
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no trained generator here; run the train stage first "
                "(`synthloop stage train` or `dvc repro train`)"
            )
    meta = json.loads(config.read_text())
    version = model_version(weights)
    card = model_dir / "model_card.json"
    recorded = json.loads(card.read_text()).get("model_version") if card.is_file() else None
    if recorded is not None and recorded != version:
        raise ModelCorrupt(
            f"{weights}: its hash {version} differs from the model card's {recorded}; the "
            "weights are corrupt or were replaced. Restore them with `dvc checkout "
            "models/generator` or retrain."
        )
    # Sampling a few thousand small images does not repay compiling on this machine.
    train_cfg = TrainConfig.model_validate(meta["train"]).model_copy(update={"compile": False})
    family = FAMILIES[train_cfg.family].from_export(
        train_cfg,
        meta["num_classes"],
        meta["channels"],
        meta["size"],
        load_file(weights),
        device,
    )
    return LoadedModel(family, list(meta["classes"]), meta["channels"], meta["size"], version)


def plan_counts(classes: list[str], per_class: int, extra: dict[str, int]) -> dict[str, int]:
    """Images to draw per class, in class order: per_class + per_class_extra[label]."""
    unknown = sorted(set(extra) - set(classes))
    if unknown:
        raise ValueError(
            f"generate.per_class_extra: labels {unknown} are not classes of the model {classes}"
        )
    counts = {label: per_class + extra.get(label, 0) for label in classes}
    negative = {label: n for label, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"generate.per_class_extra: negative totals {negative}")
    return counts


def cell_size(size: int) -> int:
    """The smallest integer multiple of the image size that is at least MIN_CELL pixels."""
    return size * -(-MIN_CELL // size)


def write_grid(
    path: Path, rows: list[list[torch.Tensor]], classes: list[str], size: int, columns: int
) -> None:
    """One row per class, its name at the left; cells upscaled by an integer factor."""
    cell = cell_size(size)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(measure.textlength(name, font=font)) for name in classes) + 2 * PAD
    canvas = Image.new(
        "RGB",
        (label_width + columns * (cell + PAD), len(classes) * (cell + PAD) + PAD),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(zip(classes, rows, strict=True)):
        top = PAD + r * (cell + PAD)
        left, upper, _, lower = draw.textbbox((0, 0), name, font=font)
        draw.text((PAD - left, top + (cell - (lower - upper)) // 2 - upper), name, "black", font)
        for col, image in enumerate(images):
            pixels = image.permute(1, 2, 0).squeeze(-1).numpy()  # HWC, or HW for grey
            tile = Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile.convert("RGB"), (label_width + col * (cell + PAD), top))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")


def run_stage(params: Params) -> dict:
    """The DVC stage: per_class of every class the model knows, plus the extras asked for."""
    classes = model_classes(params.generate.model / "config.json")
    extra = requested_extra(params, classes)
    return run_generate(params.generate.model_copy(update={"per_class_extra": extra}))
