"""Fashion-MNIST-LT, judged from outside: does the loop's promoted pool make a downstream
classifier better than the best cheap alternative, on a balanced test set it never saw?

    python benchmarks/fashion_lt.py [--root /usr/share/datasets/fashion-mnist]
        [--loop-seeds 0,1,2] [--scale 1.0] [--set stage.key=value ...]
        [--workdir DIR] [--json PATH]

Data: Fashion-MNIST's original IDX files (Debian's `dataset-fashion-mnist`); the training
set is the DeepSMOTE protocol's long-tailed draw (per-class sizes 4000 down to 40, 100:1,
`benchmarks/fashion_mnist.py`), `--scale` times each size for a smaller run, written as a
folder of PNGs with one sub-folder per class, as a user would hand it over.
Per loop seed (`train.seed`), in a fresh clone of this project (the clone's own code, as
benchmarks/default_robustness.py makes it): the folder is versioned with `dvc add`,
params.yaml points `ingest.sources` at it with `clean.image_size: 28` and any `--set`
(defaults sized for two cores: one round, one attempt, `train.steps` 400), and
`synthloop run` runs the real loop, the project's clean split and gates included. The
clones share one DVC cache, so a later loop seed's stages that do not read `train.seed`
come back from DVC's run cache (ingest, augment, train_evaluator, fuse; clean runs again,
as DVC's run cache skips a stage with an uncached out such as its near-duplicates PNG).
Then the outside judge: the official balanced 10,000-image test set, which the pipeline
never sees, scores the project's own utility protocol
(tasks/validate/utility_protocol.py `compare_arms`: the cheap menu {real, real+aug} x
{balanced draws, logit-adjusted loss} chosen on the clean val split, 5 paired classifier
seeds) trained on the clean real train split alone and plus the live pool; the arms on
the real split alone are the same for every loop seed and train once. When nothing
was promoted it judges the rows the gate refused instead (the accepted rows promotion would
have added), so it says whether refusing them was right. Reported per loop seed and over
loop seeds (95% t-interval of the per-seed means): the average per-class accuracy (the
overall accuracy of a balanced test set) and the accuracy of the 3 shortest classes; every
cheap arm on seed 0; the project's end state beside the judge's verdict, and whether they
disagree (a promoted pool the judge finds harmful, or refused rows it finds helpful).
DeepSMOTE's Table III figures (another classifier: a reference, not a like-for-like
comparison) are printed beside. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from default_robustness import (  # noqa: E402 (benchmarks/default_robustness.py)
    BIN,
    check_workspace,
    environment,
    make_workspace,
    write_params,
)
from fashion_mnist import CLASSES, LONG_TAIL, ROOT, load, long_tailed  # noqa: E402

# DeepSMOTE (IEEE TNNLS 2022), Table III: Fashion-MNIST at 100:1, average per-class accuracy.
REFERENCES = {"BAGAN": 81.48, "GAMO": 83.03}
RAW = "data/raw/fashion_lt"
DEFAULTS = [
    f"ingest.sources=[{{kind: image_folder, path: {RAW}}}]",
    "clean.image_size=28",
    "clean.labels=null",
    "clean.label_map={}",
    "loop.max_rounds=1",
    "loop.max_retrains=0",
    "train.steps=400",
]


def write_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One PNG per image under folder/<class name>/."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / CLASSES[int(label)] / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)


def run_loop(ws: Path, log: Path) -> tuple[float, dict]:
    """`synthloop run` in the workspace: its seconds and reports/loop.json. A run that
    promotes nothing exits non-zero by design; only a missing report is an error."""
    started = time.perf_counter()
    with log.open("w") as out:
        subprocess.run([str(BIN / "synthloop"), "run"], cwd=ws, env=environment(ws),
                       stdout=out, stderr=out)  # fmt: skip
    seconds = time.perf_counter() - started
    report = ws / "reports/loop.json"
    if not report.is_file():
        sys.exit(f"synthloop run left no {report}; see {log}")
    return seconds, json.loads(report.read_text())


def judge(ws: Path, root: Path, promoted: bool, memos: dict) -> dict:
    """The project's utility protocol with the official test set as its test split, on the
    live pool; when nothing was promoted, on the rows the gate refused (the accepted rows
    promotion would have added), so the judge can say whether refusing was right.
    The cheap menu and the baseline arms train on the clean real split alone, which is the
    same for every loop seed (clean does not read `train.seed`): `memos` keeps them, per
    val and test split, so that later loop seeds reuse them (9 of the 14 trainings)."""
    import torch
    from families import SharedBaseline, rows_digest  # benchmarks/families.py

    from synthloop.config import load_params
    from synthloop.dataset import read_columns
    from tasks.shared.evaluator import Splits
    from tasks.shared.feedback import read_requests
    from tasks.shared.images import ImageTensors, concat, load_image_tensors, resolve_device
    from tasks.validate.promotion import plan_promotion, subset
    from tasks.validate.utility_protocol import compare_arms, per_class_counts, trainings
    from tasks.validate.utility_trainer import TrainerPool, UtilityTrainer, utility_workers

    params = load_params(ws / "params.yaml")
    train = load_image_tensors(ws / "data/clean/train")
    classes = list(train.classes)
    val = load_image_tensors(ws / "data/clean/val", classes=classes)
    pool_dir = ws / "data/pool"
    if any(pool_dir.glob("part-*.parquet")):
        pool = load_image_tensors(pool_dir, classes=classes)
    else:
        pool = ImageTensors(train.images[:0], train.labels[:0], [], classes, [])
    accepted_dir = ws / "data/accepted"
    if not promoted and accepted_dir.is_dir() and read_columns(accepted_dir, ["id"]).num_rows:
        # what the gate refused
        accepted = load_image_tensors(accepted_dir, classes=classes)
        requests = read_requests(ws / "data/feedback")[0]
        plan = plan_promotion(accepted, per_class_counts(train), params.loop, requests)
        pool = concat(pool, subset(accepted, torch.tensor(plan.selection.chosen, dtype=torch.long)))
    images, labels = load("test", root)
    index = torch.tensor([classes.index(CLASSES[int(c)]) for c in labels])
    test = ImageTensors(
        torch.from_numpy(images.copy())[:, None], index, [f"t{i}" for i in range(len(index))],
        classes, ["test"] * len(index),
    )  # fmt: skip
    counts = per_class_counts(train)
    ordered = sorted(counts.values())
    three = ordered[3] / max(ordered)  # strictly below the 4th shortest: the 3 shortest
    cfg = params.validation
    trainer = UtilityTrainer.configured(
        cfg, params.train_evaluator, params.augment.policy, Splits(train, val, test),
        resolve_device(cfg.device),
    )  # fmt: skip
    seeds = [cfg.seed + s for s in range(cfg.utility_seeds)]
    with TrainerPool(
        trainer, utility_workers(cfg.utility_workers, trainer, trainings(len(seeds)))
    ) as workers:
        memo = memos.setdefault((rows_digest(val), rows_digest(test)), {})
        shared = SharedBaseline(workers, train, memo)
        result = compare_arms(train, pool, val.labels, test.labels, shared, seeds, three)
    result["pool_per_class"] = per_class_counts(pool)
    return result


def agreement(loop: dict, judged: dict) -> str:
    promoted = loop.get("result") == "promoted"
    low = judged["delta"]["low"]
    if promoted and low is not None and judged["delta"]["high"] < 0:
        return "DISAGREE: promoted a pool the judge finds harmful"
    if promoted:
        return f"agree: promoted; the judge says {judged['verdict']}"
    if low is not None and low > 0:
        return "refused a gain: nothing promoted; the judge says helped for the refused rows"
    return f"agree: nothing promoted; the judge says {judged['verdict']} for the refused rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--loop-seeds", default="0,1,2")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fashion_lt"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tasks.validate.utility_protocol import t_interval, verdict

    images, labels = load("train", args.root)
    sizes = tuple(max(1, round(n * args.scale)) for n in LONG_TAIL)
    picked = long_tailed(labels, sizes, seed=0)
    print(f"Fashion-MNIST-LT: {len(picked)} training images, per class {sizes}", flush=True)
    cache = args.workdir / "dvc-cache"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    memos: dict = {}  # the baseline arms' trainings, shared by the loop seeds (`judge`)
    for seed in [int(s) for s in args.loop_seeds.split(",")]:
        ws = args.workdir / f"ws-seed{seed}"
        raw = make_workspace(ws, [*DEFAULTS, *args.overrides])
        # one DVC cache for every loop seed: the stages that do not read train.seed come
        # back from DVC's run cache (all but clean: see the module docstring)
        subprocess.run([str(BIN / "dvc"), "cache", "dir", "--local", str(cache)], cwd=ws,
                       env=environment(ws), check=True)  # fmt: skip
        write_params(ws, raw, seed)
        write_folder(ws / RAW, images[picked], labels[picked])
        subprocess.run([str(BIN / "dvc"), "add", "-q", RAW], cwd=ws, env=environment(ws),
                       check=True)  # fmt: skip
        check_workspace(ws)
        seconds, loop = run_loop(ws, args.workdir / f"run-seed{seed}.log")
        promoted = loop.get("result") == "promoted"
        judged = judge(ws, args.root, promoted, memos)
        short = judged["short"]
        rows.append({"seed": seed, "seconds": seconds, "result": loop.get("result"),
                     "message": loop.get("message"), "judge": judged,
                     "agreement": agreement(loop, judged)})  # fmt: skip
        d, s = judged["overall"]["delta"], short["delta"]
        print(
            f"loop seed {seed}: {seconds:.0f} s; project: {loop.get('result')} "
            f"({loop.get('message')}); judged "
            f"{'pool' if promoted else 'refused rows'} "
            f"{sum(judged['pool_per_class'].values())}\n"
            f"  baseline {judged['baseline']}: per-class avg "
            f"{100 * judged['overall']['baseline']:.2f}, +synthetic "
            f"{100 * judged['overall']['baseline+synthetic']:.2f}, "
            f"delta {_cell(d)}; 3 shortest {', '.join(judged['short_classes'])}: "
            f"{100 * short['baseline']:.2f} -> {100 * short['baseline+synthetic']:.2f}, "
            f"delta {_cell(s)}\n"
            f"  cheap arms on seed 0 (avg, 3 shortest): "
            + "; ".join(
                f"{name} {100 * f['overall']:.2f}, {100 * f['short']:.2f}"
                for name, f in judged["reference"].items()
            )
            + f"\n  {rows[-1]['agreement']}",
            flush=True,
        )
    for key, name in (("overall", "average per-class accuracy"), ("short", "3 shortest")):
        means = [r["judge"][key]["delta"]["mean"] for r in rows]
        interval = t_interval(means)
        print(
            f"over {len(rows)} loop seeds, {name}: delta {_cell(interval.as_dict())} "
            f"{verdict(interval)} (points; 95% t-interval of the per-seed means; the judged "
            "rows: the pool where promoted, else the refused rows)"
        )
    print(f"promoted on {sum(r['result'] == 'promoted' for r in rows)} of {len(rows)} loop seeds")
    best = max(100 * r["judge"]["overall"]["baseline+synthetic"] for r in rows)
    print(
        "reference (DeepSMOTE Table III, another classifier): "
        + ", ".join(f"{k} {v:.2f}" for k, v in REFERENCES.items())
        + f"; ours, best loop seed with its pool: {best:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _cell(delta: dict) -> str:
    if delta["low"] is None:
        return f"{100 * delta['mean']:+.2f}"
    return f"{100 * delta['mean']:+.2f} [{100 * delta['low']:+.2f}, {100 * delta['high']:+.2f}]"


if __name__ == "__main__":
    main()
