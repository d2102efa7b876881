"""Train: fit a class-conditional generator (train.family) to the fused dataset.

One loop, nanoGPT-style. The dataset is decoded once into a uint8 (N, C, H, W) tensor,
kept on the GPU when it fits (train.gpu_dataset_max_bytes), so a batch is one index op.
Each step draws a random batch from a seeded generator, scales it to [-1, 1] and hands it
to the family's `train_step` (tasks/shared/generators/). The fast path is visible: TF32 and cuDNN
autotune here; bf16 autocast, channels_last, fused Adam and torch.compile (train.compile)
inside the families; losses stay on the device and are fetched once per log interval.

Best checkpoint and early stopping: every train.eval_every steps and at the last step, the
EMA (export) weights sample a fixed, seeded batch that is scored by KID against the real val
split in the evaluator's feature space plus the share of the batch validate would reject for
its class (validate.min_confidence; tasks/train/train_eval.py: the code validate uses). The
best-scoring weights (a CPU copy) are the output, not the last ones; after train.patience
evaluations without improvement training stops (tasks/train/early_stopping.py decides). The card
records best_step, best_score, the metric and the curve; eval.csv holds the curve. With
train.eval_every 0 nothing is evaluated and the last weights are the output.

Resumable (tasks/train/checkpoints.py): every checkpoint_every steps `checkpoints/last.pt` holds
the networks, their EMA copies, the optimizers, every random generator's state, the losses
and the evaluations so far (curve, best weights, patience counter), with a fingerprint of
the settings and data that made it. `train.resume: true` continues from it and ends with
the weights an uninterrupted run would have (bit-for-bit on CPU); a checkpoint of other
settings or other data is refused. The checkpoints are working state, kept apart from the
output.

Distributed (DDP; the launch: tasks/train/distributed.py): with train.distributed set to more
than one process, `synthloop stage train` re-runs itself under torchrun, one process per
device. Each
process joins the process group, wraps the trained networks in DistributedDataParallel
(`Family.distribute`; gradients are averaged) and takes its own slice of every global batch,
all drawn from the same seeded stream: train.batch_size is per process, so the global batch
is batch_size x world_size (lr is not rescaled). Each rank draws its own noise (rank 0 keeps
the single-process stream); BatchNorm statistics stay per rank, DDP hands rank 0's to the
others at every forward. The EMA is updated from identical weights on every rank; rank 0
alone logs, evaluates and writes checkpoints, reports and the model, whose card records
world_size. After each evaluation rank 0 broadcasts its stop decision, so every rank stops
at the same step.
Logged losses are averaged over the ranks. A checkpoint holds every rank's noise stream, so
a resume (each rank loads rank 0's checkpoint) needs the same world size.

Outputs (train.output, replaced atomically as a whole by tasks/shared/model_dir.py):
  weights.safetensors  the EMA generator at the best evaluation: all that generate needs
  config.json          the TrainConfig that made it, plus classes, channels, size
  model_card.json      family, steps, data version, per-class counts, losses, speed, sizes,
                       best_step, best_score, eval_metric, stopped_early, eval_curve,
                       model_version (a hash of weights.safetensors)
Reports (train.reports): losses.csv (one row per step) and eval.csv (step, score, kid,
rejected per evaluation), both for `dvc plots`; summary.json.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from synthloop.config import PARAMS_ENV, PARAMS_FILE, Params, TrainConfig, ValidateConfig
from synthloop.dataset import (
    atomic_file,
    remove_stale_temporaries,
    write_json,
)
from synthloop.threads import intra_op_threads
from tasks.shared.generators import FAMILIES
from tasks.shared.generators.base import derive_seed
from tasks.shared.images import dataset_version, load_image_tensors, resolve_device, to_float
from tasks.shared.model_dir import write_model
from tasks.train.checkpoints import (
    CHECKPOINT,
    gather_rank_rngs,
    load_checkpoint,
    make_fingerprint,
    save_checkpoint,
)
from tasks.train.distributed import init_distributed, inside_torchrun, launch_torchrun
from tasks.train.early_stopping import EarlyStopping
from tasks.train.train_eval import (
    METRIC,
    PARTS,
    Evaluations,
    FixedBatchScorer,
    check_inputs,
    evaluate,
    figure,
    inputs_version,
    write_curve,
)

log = logging.getLogger(__name__)

# validate.min_confidence's default, for callers without params (the stage passes its own)
MIN_CONFIDENCE = ValidateConfig.model_fields["min_confidence"].default
SUMMARY_KEYS = (  # reports/train/summary.json: the model card's numbers, for `dvc metrics`
    "family", "model_version", "steps", "final_losses", "images_per_second", "train_seconds",
    "wall_seconds", "resumed_from_step", "device", "world_size",
    "best_step", "best_score", "stopped_early",
)  # fmt: skip


def class_balance_weights(labels: torch.Tensor, balance: float) -> torch.Tensor | None:
    """Per-row sampling weights: a class of c rows is drawn in proportion to c^(1-balance),
    so 0 is uniform over rows (None: plain randint) and 1 draws every class equally often,
    however few its rows: a short class then gets as many steps as a rich one."""
    if balance == 0:
        return None
    counts = torch.bincount(labels).float()
    return counts[labels].pow(-balance)


def draw_batch(
    weights: torch.Tensor | None,
    n: int,
    size: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    if weights is None:
        return torch.randint(n, (size,), generator=generator, device=device)
    return torch.multinomial(weights, size, replacement=True, generator=generator)


def run_train(cfg: TrainConfig, min_confidence: float = MIN_CONFIDENCE) -> dict:
    """Train `cfg.family` on `cfg.input`; write the model to `cfg.output`; return its card.
    `min_confidence` is validate's acceptance line, which the evaluations score against.
    Inside torchrun, this process is one rank of a data-parallel run."""
    rank, world, device = init_distributed(resolve_device(cfg.device), cfg.distributed.backend)
    threads = torch.get_num_threads()  # train() sets its own for the CPU
    try:
        return train(cfg, device, rank, world, min_confidence)
    finally:
        torch.set_num_threads(threads)
        if world > 1:  # also on error, so the other ranks are not left waiting
            dist.destroy_process_group()


def train(
    cfg: TrainConfig,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    min_confidence: float = MIN_CONFIDENCE,
) -> dict:
    """The training run of one process: rank `rank` of `world` (0 of 1 without DDP)."""
    started = time.perf_counter()
    main = rank == 0  # only rank 0 logs and writes
    if not main:
        log.setLevel(logging.WARNING)
    if cfg.checkpoints.resolve().is_relative_to(cfg.output.resolve()):
        raise ValueError(
            f"train.checkpoints ({cfg.checkpoints}) must not be inside train.output "
            f"({cfg.output}): the output is replaced as a whole"
        )
    if main:
        remove_stale_temporaries(cfg.output)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convs: free speed
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune conv algorithms once

    # --- data: decoded once; on the GPU when it fits -------------------------------------
    data = load_image_tensors(cfg.input)
    n, channels, height, width = data.images.shape
    if height != width:
        raise ValueError(f"{cfg.input}: images must be square, got {height}x{width}")
    classes = data.classes
    if device.type == "cpu":  # one thread for small images: see synthloop/threads.py
        torch.set_num_threads(intra_op_threads(cfg.cpu_threads, height))
    data_version = dataset_version(cfg.input)
    evaluating = cfg.eval_every > 0
    if evaluating:  # before any work: a missing evaluator is a clear error on every rank
        check_inputs(cfg.evaluator, cfg.val_data)
    images, labels = place_dataset(data.images, data.labels, device, cfg.gpu_dataset_max_bytes)

    # --- model, random streams, and the checkpoint to resume from ------------------------
    torch.manual_seed(cfg.seed)  # weight initialisation
    family = FAMILIES[cfg.family](cfg, len(classes), channels, height, device)
    if rank:  # its own noise per rank; rank 0 keeps the single-process stream
        family.rng.manual_seed(derive_seed(cfg.seed, f"{cfg.family}-train-rank{rank}"))
    # Batch indices are drawn where the dataset lives: no host->device copy, no sync. Every
    # rank holds the same stream, draws the same global batch and keeps its own slice.
    batches = torch.Generator(images.device).manual_seed(derive_seed(cfg.seed, "batches"))
    scorer = None
    if evaluating and main:  # the val features are computed once, here
        scorer = FixedBatchScorer(
            cfg.evaluator, cfg.val_data, len(classes), cfg.eval_per_class, cfg.seed, device,
            cfg.batch_size, min_confidence,
        )  # fmt: skip
        scorer.check_images(channels, height)
    eval_version = (
        inputs_version(cfg.evaluator, cfg.val_data, min_confidence) if evaluating else None
    )
    fingerprint = make_fingerprint(cfg, data_version, device, images.device, world, eval_version)
    ckpt_path = cfg.checkpoints / CHECKPOINT
    rows: list[dict[str, float]] = []  # one per step: {"step": s, loss name: value, ...}
    evals = Evaluations(EarlyStopping(cfg.patience))
    start, train_seconds = 0, 0.0
    if cfg.resume and ckpt_path.exists():  # every rank loads rank 0's checkpoint
        start, train_seconds, rows = load_checkpoint(
            ckpt_path, fingerprint, family, batches, cfg, rank, evals
        )
        log.info("resumed from step %d (%s)", start, ckpt_path)
    elif cfg.resume:
        log.info("no checkpoint at %s: starting from step 0", ckpt_path)
    if world > 1:  # after the resume: DDP starts from the weights every rank now holds
        ids = [device.index] if device.type == "cuda" else None
        family.distribute(lambda net: DistributedDataParallel(net, device_ids=ids))

    # --- the loop ------------------------------------------------------------------------
    log.info(
        "train: %s on %d images (%d classes, %dx%dx%d) on %s x %d, steps %d..%d",
        cfg.family, n, len(classes), channels, height, width, device, world, start, cfg.steps,
    )  # fmt: skip
    bar = tqdm(
        total=cfg.steps, initial=start, unit="step", disable=not (main and sys.stderr.isatty())
    )
    global_batch = cfg.batch_size * world
    row_weights = class_balance_weights(labels, cfg.class_balance)
    window: list[dict[str, torch.Tensor]] = []  # losses since the last log, still on device
    loop_start, window_start = time.perf_counter(), time.perf_counter()
    end = start if evals.stopping.stopped else cfg.steps  # a resumed run that had stopped
    steps_done = start
    for step in range(start + 1, end + 1):
        steps_done = step
        idx = draw_batch(row_weights, n, global_batch, batches, images.device)
        idx = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]  # this rank's slice
        x, y = get_batch(images, labels, idx, device)
        window.append(family.train_step(x, y))
        bar.update(1)

        last = step == cfg.steps
        stop = False
        if evaluating and (step % cfg.eval_every == 0 or last):
            began = time.perf_counter()
            stop = evaluate(step, family, scorer, evals, device, world)
            window_start += time.perf_counter() - began  # img/s counts training alone
            last = last or stop
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
            new_rows = fetch_losses(window, first_step=step - len(window) + 1, world=world)
            rows += new_rows
            now = time.perf_counter()
            rate = len(window) * global_batch / (now - window_start)
            window, window_start = [], now
            if step % cfg.log_every == 0 or last:
                means = mean_losses(new_rows)
                log.info("step %d/%d  %s  %.0f img/s", step, cfg.steps, fmt(means), rate)
                bar.set_postfix(means)
        if step % cfg.checkpoint_every == 0 or last:
            seconds = train_seconds + time.perf_counter() - loop_start
            rank_rngs = gather_rank_rngs(family, world)  # a collective: every rank joins
            if main:
                save_checkpoint(
                    ckpt_path, family, batches, fingerprint, step, seconds, rows, rank_rngs,
                    evals,
                )  # fmt: skip
        if stop:
            best = evals.stopping
            log.info(
                "early stop at step %d: no %s improvement in %d evaluations (best %s at "
                "step %s)", step, METRIC, cfg.patience, best.best_score, best.best_step,
            )  # fmt: skip
            break
    bar.close()
    train_seconds += time.perf_counter() - loop_start
    stopping = evals.stopping
    if main:
        write_losses(cfg.reports / "losses.csv", rows)
        write_curve(cfg.reports / "eval.csv", evals.curve())

    # --- outputs -------------------------------------------------------------------------
    steps_run = steps_done - start
    final = mean_losses(rows[-cfg.log_every :])
    loop_seconds = max(train_seconds - evals.seconds, 1e-9)  # training alone
    card = {
        "family": cfg.family,
        "model_version": None,  # filled in once the weights are written
        "steps": steps_done,  # below train.steps after an early stop
        "batch_size": cfg.batch_size,
        "world_size": world,
        "resumed_from_step": start if cfg.resume and start else None,
        "data_version": data_version,
        "data": str(cfg.input),
        "classes": classes,
        "train_counts": dict(
            zip(classes, torch.bincount(data.labels, minlength=len(classes)).tolist(), strict=True)
        ),
        "image": {"channels": channels, "height": height, "width": width},
        "final_losses": final,
        "best_step": stopping.best_step,  # the step of the output weights (None: the last)
        "best_score": figure(stopping.best_score),
        "eval_metric": " + ".join(PARTS) if evaluating else None,
        "stopped_early": stopping.stopped,
        "eval_curve": evals.curve(),
        "eval_seconds": round(evals.seconds, 2),
        "images_per_second": round(steps_done * global_batch / loop_seconds, 1),
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "device": device_name(device),
        "parameters": family.parameter_counts(),
        "flops_per_image": family.flops_per_image(),
    }
    if main:
        weights = evals.best_weights
        if weights is None:
            if evaluating:
                log.warning("no finite %s at any evaluation: the last weights are output", METRIC)
            weights = family.export_state()
        card["model_version"] = write_model(cfg, weights, classes, channels, height, card)
        write_json(cfg.reports / "summary.json", {k: card[k] for k in SUMMARY_KEYS})
    if world > 1:
        dist.barrier()  # every rank returns once the model is written
    log.info(
        "train: %s, %d steps (%d this run) in %.1fs (%.1fs evaluating), %.0f img/s, %s, best "
        "%s %s at step %s -> %s (version %s)",
        cfg.family, steps_done, steps_run, train_seconds, evals.seconds,
        card["images_per_second"], fmt(final), METRIC, card["best_score"], stopping.best_step,
        cfg.output, card["model_version"],
    )  # fmt: skip
    return card


# --- data --------------------------------------------------------------------------------


def place_dataset(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, max_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """On the GPU when it fits (a batch is then an index op); else it stays in host memory
    and each batch is copied over on its own."""
    if device.type == "cuda" and images.numel() * images.element_size() <= max_bytes:
        return images.to(device), labels.to(device)
    return images, labels


def get_batch(
    images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 rows `idx` -> float [-1, 1] on `device`, converted after the copy (4x less to
    move)."""
    if images.device == device:
        return to_float(images[idx]), labels[idx]
    # host dataset, GPU training: a pinned batch copies asynchronously
    x = images[idx].pin_memory().to(device, non_blocking=True)
    return to_float(x), labels[idx].to(device, non_blocking=True)


# --- losses --------------------------------------------------------------------------------


def fetch_losses(
    window: list[dict[str, torch.Tensor]], first_step: int, world: int = 1
) -> list[dict]:
    """The window's per-step losses as rows, fetched from the device in one transfer; under
    DDP averaged over the ranks first (every rank calls this at the same steps)."""
    if not window:
        return []
    names = list(window[0])
    values = torch.stack([torch.stack([s[k].float() for k in names]) for s in window])
    if world > 1:
        dist.all_reduce(values)  # a sum: gloo has no AVG
        values /= world
    return [
        {"step": first_step + i, **dict(zip(names, row, strict=True))}
        for i, row in enumerate(values.cpu().tolist())
    ]


def mean_losses(rows: list[dict]) -> dict[str, float]:
    if not rows:
        return {}
    names = [k for k in rows[0] if k != "step"]
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in names}


def fmt(losses: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in losses.items())


def write_losses(path: Path, rows: list[dict]) -> None:
    """step,<loss>,... per step: `dvc plots show` draws it with step on the x axis."""
    fields = list(rows[0]) if rows else ["step"]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if k == "step" else f"{v:.6g}" for k, v in row.items()})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def run_stage(params: Params) -> dict:
    """The DVC stage. With `train.distributed.enabled`, outside torchrun it launches torchrun
    on the same params file, whose processes run this again, inside."""
    if params.train.distributed.enabled and not inside_torchrun():
        return launch_torchrun(params.train, Path(os.environ.get(PARAMS_ENV, PARAMS_FILE)))
    return run_train(params.train, params.validation.min_confidence)
