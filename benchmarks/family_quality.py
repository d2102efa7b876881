"""Training time and sample quality of generator families on one dataset, in one process.

    python benchmarks/family_quality.py [--data data/fused] [--clean data/clean]
        [--evaluator models/evaluator] [--steps N] [--per-class 100] [--threads 1]
        [--variant NAME=JSON ...] [--sample NAME=JSON ...] [--json PATH]

Each variant is the default TrainConfig (params.yaml's train section) on the CPU with the
given overrides (JSON merged into the config, e.g. '{"family": "transformer",
"transformer": {"n_layer": 2}}'), trained by tasks.train.run_train (the one training loop)
into a temporary folder; the default variants are `cgan` and `transformer` with their
defaults. The first variant is the baseline of the ratios.

For each trained model, as generate and validate do: the model is rebuilt from its export
(tasks.generate.load_model), --per-class images per class are sampled from a seeded CPU
generator (timed: sample img/s), and the project's evaluator scores them: class consistency
(share classified as the intended class, and the mean probability of that class;
tasks.metrics.class_consistency) and FID against the clean train split in the evaluator's
feature space (tasks.metrics.fid_kid_features, as validate's `fid`), beside the real floor
(train against test). --sample NAME=JSON samples transformer variants again with other
train.transformer sampling settings (temperature, top_k) from the same weights.

Reported: train wall seconds and CPU seconds of this process (steadier on a shared
machine), each as a ratio to the first variant. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402

from synthloop.config import TrainConfig  # noqa: E402
from tasks.evaluator import load_evaluator  # noqa: E402
from tasks.generate import load_model  # noqa: E402
from tasks.images import load_image_tensors, to_uint8  # noqa: E402
from tasks.metrics import class_consistency, fid_kid_features  # noqa: E402
from tasks.train import run_train  # noqa: E402

DEFAULT_VARIANTS = ('cgan={"family": "cgan"}', 'transformer={"family": "transformer"}')


def named_json(text: str) -> tuple[str, dict]:
    name, _, body = text.partition("=")
    return name, json.loads(body)


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def score(family, evaluator, train_f, classes: int, per_class: int, batch: int) -> dict:
    labels = torch.arange(classes).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    images = torch.cat([to_uint8(family.sample(b, generator)).cpu() for b in labels.split(batch)])
    seconds = time.perf_counter() - start
    accuracy, confidence = class_consistency(evaluator.probabilities(images), labels)
    fid, _, _ = fid_kid_features(train_f, evaluator.features(images))
    return {
        "class_consistency": round(accuracy, 4),
        "intended_confidence": round(confidence, 4),
        "fid": round(fid, 3),
        "sample_images_per_second": round(len(labels) / seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=PROJECT / "data/fused")
    p.add_argument("--clean", type=Path, default=PROJECT / "data/clean")
    p.add_argument("--evaluator", type=Path, default=PROJECT / "models/evaluator")
    p.add_argument("--steps", type=int, default=None, help="default: train.steps")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="train.cpu_threads")
    p.add_argument("--variant", action="append", default=None, help="NAME=JSON overrides")
    p.add_argument("--sample", action="append", default=[], help="NAME=JSON transformer")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    evaluator = load_evaluator(args.evaluator, "cpu")
    train = load_image_tensors(args.clean / "train", classes=evaluator.classes)
    test = load_image_tensors(args.clean / "test", classes=evaluator.classes)
    train_f = evaluator.features(train.images)
    floor, _, _ = fid_kid_features(train_f, evaluator.features(test.images))
    print(f"real floor FID (train vs test): {floor:.3f}", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="family-quality-") as tmp:
        for i, (name, overrides) in enumerate(map(named_json, args.variant or DEFAULT_VARIANTS)):
            root = Path(tmp) / f"v{i}"
            values = {
                "device": "cpu",
                "cpu_threads": args.threads,
                "input": args.data,
                "output": root / "generator",
                "checkpoints": root / "checkpoints",
                "reports": root / "reports",
            }
            if args.steps:
                values["steps"] = args.steps
            cfg = TrainConfig.model_validate(merge(values, overrides))
            cpu = time.process_time()
            card = run_train(cfg)
            cpu = time.process_time() - cpu
            model = load_model(cfg.output, torch.device("cpu"))
            settings = [(name, {})]
            if cfg.family == "transformer":
                settings += [(f"{name} {s}", o) for s, o in map(named_json, args.sample)]
            for label, sampling in settings:
                t = cfg.transformer.model_copy(update=sampling)
                model.family.cfg = cfg.model_copy(update={"transformer": t})
                row = {
                    "variant": label,
                    "family": cfg.family,
                    "params": card["parameters"],
                    "train_seconds": card["train_seconds"],
                    "train_cpu_seconds": round(cpu, 1),
                    "final_losses": card["final_losses"],
                    **score(
                        model.family,
                        evaluator,
                        train_f,
                        len(evaluator.classes),
                        args.per_class,
                        args.sample_batch,
                    ),  # fmt: skip
                }
                results.append(row)
                print(json.dumps(row), flush=True)

    base = results[0]
    print(f"\nreal floor FID {floor:.3f}; ratios against {base['variant']}")
    head = "variant", "train s", "ratio", "CPU s", "ratio", "consist.", "conf.", "FID", "smp img/s"
    print(" | ".join(head))
    for r in results:
        cells = [
            r["variant"],
            f"{r['train_seconds']:.1f}",
            f"{r['train_seconds'] / base['train_seconds']:.2f}",
            f"{r['train_cpu_seconds']:.1f}",
            f"{r['train_cpu_seconds'] / base['train_cpu_seconds']:.2f}",
            f"{r['class_consistency']:.3f}",
            f"{r['intended_confidence']:.3f}",
            f"{r['fid']:.3f}",
            f"{r['sample_images_per_second']:.0f}",
        ]
        print(" | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps({"floor_fid": floor, "results": results}, indent=1))


if __name__ == "__main__":
    main()
