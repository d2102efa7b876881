"""The honest scarce experiment: does synthetic data beat plain augmentation for a user who
has only n labelled images per class?

    python benchmarks/utility.py [--dataset digits shapes] [--sizes 5 10 20 50]
                                 [--seeds 5] [--steps 1500] [--per-class 100]

For each dataset, each n and each seed (the unit of replication):
  1. draw n train and n val images per class from the pool (seeded); the test set is fixed
     for the dataset (drawn once, disjoint from every pool, balanced, large);
  2. the user's yardstick: the evaluator CNN trained on those n + n images alone, for
     `validate.utility_steps` steps;
  3. the generator (`train.family` from params.yaml, its settings, `--steps`) trained on the
     n train images per class alone: nothing it learns comes from images the arms lack;
  4. `--per-class` samples per class; *selected* keeps those the yardstick gives at least
     `validate.min_confidence` in the intended class (validate's acceptance rule);
  5. the downstream classifier (validate's utility trainer: the evaluator architecture,
     `validate.utility_steps` steps whatever the set size, best epoch on val) on
       real                      the n images, as they are
       real+aug                  the same with the augment policy on the fly: the baseline
       real+aug+synthetic        plus every sample
       real+aug+selected         plus the selected samples
     Every arm of a seed starts from the same initial weights and augmentation stream.
Prints per n each arm's mean test accuracy with a 95% Student-t interval over seeds, the
paired delta of each synthetic arm over real+aug with its interval and verdict, and the
selection ablation (selected minus all samples).

Datasets: `digits` is scikit-learn's 8x8 grey handwritten digits (10 classes, about 180
images each; 60 per class held out for test). `shapes` is the project's procedural shapes
(synthloop/procedural.py) at 16x16 RGB with random colours, positions and sizes over noise
(6 classes; 100 per class for test): harder for the generator (3 channels, 4x the pixels).
Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from synthloop.config import load_params  # noqa: E402
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter, content_id  # noqa: E402
from tasks.generate.stage import load_model  # noqa: E402
from tasks.shared.evaluator import Splits, train_net  # noqa: E402
from tasks.shared.images import ImageTensors, concat, encode_rows, to_float, to_uint8  # noqa: E402
from tasks.train.stage import run_train  # noqa: E402
from tasks.validate.utility_protocol import Interval, Recipe, accuracy_of, t_interval, verdict  # noqa: E402
from tasks.validate.utility_trainer import UtilityTrainer  # noqa: E402

ARMS = ("real", "real+aug", "real+aug+synthetic", "real+aug+selected")


# --- datasets: (images uint8 N,C,H,W; labels; class names), pool and a fixed test set -------


def digits() -> tuple[np.ndarray, np.ndarray, list[str], int]:
    from tasks.ingest.demo import digit_images

    images, labels = digit_images()
    return images[:, None], labels, [str(d) for d in range(10)], 60


def shapes(per_class: int = 220, size: int = 16) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    from synthloop.procedural import SHAPES, draw

    rng = np.random.default_rng(12345)
    images, labels = [], []
    for k, shape in enumerate(SHAPES):
        for _ in range(per_class):
            images.append(np.asarray(draw(shape, size, rng, channels=3)).transpose(2, 0, 1))
            labels.append(k)
    return np.stack(images), np.asarray(labels), list(SHAPES), 100


DATASETS = {"digits": digits, "shapes": shapes}


def tensors(images: np.ndarray, labels: np.ndarray, classes: list[str], tag: str) -> ImageTensors:
    return ImageTensors(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        ids=[f"{tag}:{i}" for i in range(len(labels))],
        classes=classes,
        sources=[tag] * len(labels),
    )


def split_test(labels: np.ndarray, test_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool rows, test rows): the test rows are drawn once per dataset, balanced."""
    rng = np.random.default_rng(0)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in np.unique(labels)]
    )
    return np.setdiff1d(np.arange(len(labels)), test), np.sort(test)


def draw_scarce(labels: np.ndarray, pool: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, ...]:
    """n train and n val rows per class from the pool."""
    rng = np.random.default_rng([seed, n])
    train, val = [], []
    for c in np.unique(labels):
        rows = rng.permutation(pool[labels[pool] == c])
        train.append(rows[:n])
        val.append(rows[n : 2 * n])
    return np.concatenate(train), np.concatenate(val)


# --- one replicate -------------------------------------------------------------------------


def write_fused(directory: Path, data: ImageTensors) -> Path:
    _, channels, size, _ = data.images.shape
    with ShardWriter(directory, IMAGE_SCHEMA, shard_rows=8192) as writer:
        for png, label in zip(encode_rows(data.images), data.labels.tolist(), strict=True):
            writer.append(
                {
                    "id": content_id(png),
                    "label": data.classes[label],
                    "split": "train",
                    "source": "real",
                    "image": png,
                    "height": size,
                    "width": size,
                    "channels": channels,
                }
            )
    return directory


def synthesize(params, train: ImageTensors, seed: int, steps: int, per_class: int, work: Path):
    """Train the generator on `train` alone; `per_class` samples per class (uint8, labels)."""
    cfg = params.train.model_copy(
        update={
            "steps": steps,
            "seed": seed,
            "device": "cpu",
            "resume": False,
            # No best-checkpoint selection: it would score against params.yaml's evaluator
            # and val split, trained on data this user does not have (a leak); the last
            # weights are the output.
            "eval_every": 0,
            "input": write_fused(work / "fused", train),
            "output": work / "generator",
            "checkpoints": work / "checkpoints",
            "reports": work / "reports",
        }
    )
    started = time.perf_counter()
    run_train(cfg)
    train_seconds = time.perf_counter() - started
    model = load_model(cfg.output, torch.device("cpu"))
    labels = torch.arange(len(train.classes)).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        images = torch.cat([to_uint8(model.family.sample(b, generator)) for b in labels.split(256)])
    return images.cpu(), labels, train_seconds


def replicate(params, data: ImageTensors, test: ImageTensors, rows, seed, args) -> dict:
    train_rows, val_rows = rows

    def pick(r: np.ndarray, tag: str) -> ImageTensors:
        return tensors(data.images[r].numpy(), data.labels[r].numpy(), data.classes, tag)

    splits = Splits(train=pick(train_rows, "train"), val=pick(val_rows, "val"), test=test)
    # The yardstick trains validate.utility_steps steps like every arm's classifier, not
    # train_evaluator.epochs over n images: 15 epochs of 50 images are 15 steps, too few
    # to be confident of anything.
    per_epoch = math.ceil(len(train_rows) / params.train_evaluator.batch_size)
    epochs = math.ceil(params.validation.utility_steps / per_epoch)
    evaluator_cfg = params.train_evaluator.model_copy(
        update={"seed": seed, "device": "cpu", "epochs": epochs}
    )
    yardstick, _ = train_net(evaluator_cfg, splits, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as work:
        images, labels, train_seconds = synthesize(
            params, splits.train, seed, args.steps, args.per_class, Path(work)
        )
    with torch.no_grad():
        probs = torch.softmax(yardstick.eval()(to_float(images)), 1)
    confident = probs[torch.arange(len(labels)), labels] >= params.validation.min_confidence
    synthetic = tensors(images.numpy(), labels.numpy(), data.classes, "synthetic")
    selected = replace(
        synthetic,
        images=synthetic.images[confident],
        labels=synthetic.labels[confident],
        ids=[i for i, keep in zip(synthetic.ids, confident.tolist(), strict=True) if keep],
        sources=["synthetic"] * int(confident.sum()),
    )
    trainer = UtilityTrainer.configured(
        params.validation, params.train_evaluator, params.augment.policy, splits,
        torch.device("cpu"),
    )  # fmt: skip
    sets = {
        "real": (splits.train, Recipe(False)),
        "real+aug": (splits.train, Recipe(True)),
        "real+aug+synthetic": (concat(splits.train, synthetic), Recipe(True)),
        "real+aug+selected": (concat(splits.train, selected), Recipe(True)),
    }
    accuracy = {
        arm: accuracy_of(trainer(train, seed, recipe)[1], test.labels)
        for arm, (train, recipe) in sets.items()
    }
    return {
        "accuracy": accuracy,
        "selected_share": float(confident.float().mean()),
        "train_seconds": train_seconds,
    }


# --- the table -----------------------------------------------------------------------------


def fmt(interval: Interval, scale: float = 100.0) -> str:
    if interval.low is None:
        return f"{interval.mean * scale:+.1f}"
    return f"{interval.mean * scale:.1f} [{interval.low * scale:.1f}, {interval.high * scale:.1f}]"


def fmt_delta(interval: Interval) -> str:
    if interval.low is None:
        return f"{interval.mean * 100:+.1f}"
    body = f"{interval.mean * 100:+.1f} [{interval.low * 100:+.1f}, {interval.high * 100:+.1f}]"
    return f"{body} {verdict(interval)}"


def report(dataset: str, n: int, results: list[dict]) -> None:
    acc = {arm: [r["accuracy"][arm] for r in results] for arm in ARMS}
    line = "  ".join(f"{arm} {fmt(t_interval(acc[arm]))}" for arm in ARMS)
    print(f"{dataset} n={n:<3} seeds={len(results)}  {line}")
    for arm in ("real+aug+synthetic", "real+aug+selected"):
        deltas = np.subtract(acc[arm], acc["real+aug"])
        print(f"    {arm} - real+aug: {fmt_delta(t_interval(deltas))}")
    ablation = np.subtract(acc["real+aug+selected"], acc["real+aug+synthetic"])
    print(f"    selection (selected - all): {fmt_delta(t_interval(ablation))}")
    print(
        f"    selected share {np.mean([r['selected_share'] for r in results]):.2f}, "
        f"generator train s median {np.median([r['train_seconds'] for r in results]):.0f}"
    )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", choices=sorted(DATASETS), default=["digits"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="default: train.steps")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    args.steps = args.steps or params.train.steps
    torch.set_num_threads(1)
    print(
        f"generator {params.train.family}, {args.steps} steps; {args.per_class} samples/class; "
        f"classifier {params.validation.utility_steps} steps; accuracy in % on the fixed test set"
    )
    for name in args.dataset:
        images, labels, classes, test_per_class = DATASETS[name]()
        data = tensors(images, labels, classes, name)
        pool, test_rows = split_test(labels, test_per_class)
        test = tensors(images[test_rows], labels[test_rows], classes, "test")
        for n in args.sizes:
            if 2 * n > min(int((labels[pool] == c).sum()) for c in range(len(classes))):
                print(f"{name} n={n}: skipped, the pool has too few images for n train + n val")
                continue
            results = [
                replicate(params, data, test, draw_scarce(labels, pool, n, seed), seed, args)
                for seed in range(args.seeds)
            ]
            report(name, n, results)


if __name__ == "__main__":
    main()
