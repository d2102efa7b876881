"""Training time and sample quality of the generator families, side by side.

    python benchmarks/generator_quality.py [--data data/fused] [--real data/clean]
        [--evaluator models/evaluator] [--families cgan,vae] [--per-class 100]
        [--repeats 1] [--temperatures 1.0] [--set vae.beta=0.5 ...] [--json PATH]

Each family is trained by the train stage itself (tasks.train.run_train, the default
TrainConfig plus any --set overrides) on --data in one process, into a temporary folder;
the families take turns, repeat after repeat, so load from other jobs hits each alike. Per
run: train_seconds from the model card (the loop alone, as the card records it), then
--per-class samples of every class from the exported model (tasks.generate.load_model,
noise from a CPU generator seeded 0, as generate draws it), judged like validate does with
the evaluator trained on real data: class consistency (share the evaluator assigns to the
intended class; mean intended-class probability) and FID in the evaluator's feature space
against the real train split. A `real test` row gives the floor: the real test split
against the real train split. For families with a temperature (vae) every --temperatures
value is sampled from the same trained model.

Reported: per family the median train seconds and its ratio to the first family's median,
and per (family, temperature) the median consistency, confidence and FID. Figures only:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402
import yaml  # noqa: E402

from synthloop.config import TrainConfig  # noqa: E402
from tasks.evaluator import load_evaluator  # noqa: E402
from tasks.generate import load_model  # noqa: E402
from tasks.images import load_image_tensors, to_uint8  # noqa: E402
from tasks.metrics import class_consistency, fid_kid_features  # noqa: E402
from tasks.train import run_train  # noqa: E402


def set_value(values: dict, assignment: str) -> None:
    """'vae.beta=0.5' -> values["vae"]["beta"] = 0.5 (the value parsed as YAML)."""
    key, _, raw = assignment.partition("=")
    *parents, leaf = key.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    values[leaf] = yaml.safe_load(raw)


def judge(evaluator, images: torch.Tensor, labels: torch.Tensor, real_f: torch.Tensor) -> dict:
    consistency, confidence = class_consistency(evaluator.probabilities(images), labels)
    fid, _, _ = fid_kid_features(real_f, evaluator.features(images))
    return {"consistency": consistency, "confidence": confidence, "fid": fid}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=PROJECT / "data/fused")
    p.add_argument("--real", type=Path, default=PROJECT / "data/clean")
    p.add_argument("--evaluator", type=Path, default=PROJECT / "models/evaluator")
    p.add_argument("--families", default="cgan,vae")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--temperatures", default="1.0", help="vae: comma-separated")
    p.add_argument("--set", action="append", default=[], help="a TrainConfig override")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    evaluator = load_evaluator(args.evaluator)
    classes = evaluator.classes
    train = load_image_tensors(args.real / "train", classes=classes)
    test = load_image_tensors(args.real / "test", classes=classes)
    real_f = evaluator.features(train.images)
    floor = judge(evaluator, test.images, test.labels, real_f)
    labels = torch.arange(len(classes)).repeat_interleave(args.per_class)
    families = [f for f in args.families.split(",") if f]
    temperatures = [float(t) for t in args.temperatures.split(",")]

    seconds: dict[str, list[float]] = {f: [] for f in families}
    quality: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for family in families:
                values: dict = {"family": family, "device": "cpu", "input": str(args.data)}
                for assignment in args.set:
                    set_value(values, assignment)
                run = Path(tmp) / f"{family}-{repeat}"
                values |= {
                    "output": str(run / "model"),
                    "checkpoints": str(run / "checkpoints"),
                    "reports": str(run / "reports"),
                }
                card = run_train(TrainConfig.model_validate(values))
                seconds[family].append(card["train_seconds"])
                model = load_model(run / "model", torch.device("cpu"))
                for t in temperatures if family == "vae" else [None]:
                    if t is not None:
                        cfg = model.family.cfg
                        model.family.cfg = cfg.model_copy(
                            update={"vae": cfg.vae.model_copy(update={"temperature": t})}
                        )
                    generator = torch.Generator().manual_seed(0)
                    with torch.no_grad():
                        images = to_uint8(model.family.sample(labels, generator))
                    name = family if t is None else f"{family} T={t}"
                    figures = judge(evaluator, images, labels, real_f)
                    quality.setdefault(name, []).append(figures)
                    print(f"repeat {repeat} {name}: {card['train_seconds']:.1f}s {figures}")

    base = statistics.median(seconds[families[0]])
    print(f"\noverrides: {args.set or 'none'}; data {args.data}; {args.per_class} per class")
    print(f"{'family':<14}{'train s':>9}{'ratio':>7}")
    for family in families:
        med = statistics.median(seconds[family])
        print(f"{family:<14}{med:>9.1f}{med / base:>7.2f}")
    print(f"\n{'samples':<14}{'consistency':>12}{'confidence':>12}{'FID':>9}")
    rows = {"real test": [floor], **quality}
    summary = {}
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        summary[name] = med
        print(f"{name:<14}{med['consistency']:>12.3f}{med['confidence']:>12.3f}{med['fid']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "quality": summary}, indent=2))


if __name__ == "__main__":
    main()
