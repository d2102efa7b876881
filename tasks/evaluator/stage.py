"""The train_evaluator stage: train the evaluator (tasks/shared/evaluator.py) on the real
clean train split.

Writes `cfg.output/weights.safetensors` and `config.json` (atomically, as one directory)
and the report `cfg.report`; `tasks.shared.evaluator.load_evaluator` reads them back.
"""

from __future__ import annotations

import logging
import math
import time

from safetensors.torch import save_file

from synthloop.config import EvaluatorConfig, Params
from synthloop.dataset import atomic_dir, remove_stale_temporaries, write_json
from tasks.shared.evaluator import (
    ARCHITECTURE,
    CONFIG,
    WEIGHTS,
    Splits,
    accuracy,
    load_splits,
    train_net,
)
from tasks.shared.images import ImageTensors, dataset_version, resolve_device

log = logging.getLogger(__name__)

_PATH_FIELDS = {"input", "output", "report", "inception_weights"}


def run_train_evaluator(cfg: EvaluatorConfig) -> dict:
    """Train the evaluator on `cfg.input/train`; write it to `cfg.output`, report to
    `cfg.report`; returns the report."""
    remove_stale_temporaries(cfg.output)
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.input)
    _, channels, size, width = splits.train.images.shape
    if size != width:
        raise ValueError(f"{cfg.input}: images must be square, got {size}x{width}")
    start = time.perf_counter()
    net, training = train_net(cfg, splits, device)
    seconds = time.perf_counter() - start
    classes = splits.train.classes
    scores = {name: accuracy(net, data, cfg.batch_size) for name, data in _scored(splits)}
    report = {
        "accuracy": {name: acc for name, (acc, _) in scores.items()},
        "per_class_accuracy": {
            name: {c: _finite(a) for c, a in zip(classes, per, strict=True)}
            for name, (_, per) in scores.items()
        },
        "counts": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "classes": classes,
        "image": {"height": size, "width": size, "channels": channels},
        "data_version": dataset_version(cfg.input / "train"),
        "feature_dim": cfg.feature_dim,
        "epochs": cfg.epochs,
        "best_epoch": training["best_epoch"],
        "history": training["history"],
        "train_seconds": round(seconds, 3),
        "device": str(device),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    with atomic_dir(cfg.output) as out:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(out / WEIGHTS), metadata={"architecture": ARCHITECTURE})
        meta = {
            "architecture": ARCHITECTURE,
            "classes": classes,
            "channels": channels,
            "size": size,
            "data_version": report["data_version"],
            # Hyperparameters only: absolute paths would make the artefact machine-specific.
            "config": cfg.model_dump(mode="json", exclude=_PATH_FIELDS),
        }
        write_json(out / CONFIG, meta)
        write_json(cfg.report, report)
    log.info(
        "train_evaluator: %d train images, %d epochs in %.1fs on %s -> val %.3f, test %.3f",
        len(splits.train),
        cfg.epochs,
        seconds,
        device,
        report["accuracy"]["val"],
        report["accuracy"]["test"],
    )
    return report


def _scored(splits: Splits) -> list[tuple[str, ImageTensors]]:
    return [("val", splits.val), ("test", splits.test)]


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value  # NaN (class absent from the split) -> null


def run_stage(params: Params) -> dict:
    return run_train_evaluator(params.train_evaluator)
