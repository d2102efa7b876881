"""What the training loop's evaluations cost, and where the best step lands.

    python benchmarks/train_eval_cost.py [--family cgan] [--steps 1500] [--repeats 2]
        [--eval-every 250] [--patience 3] [--threads 1]
        [--data data/fused] [--evaluator models/evaluator] [--val data/clean/val]

In one process, on the CPU with --threads torch threads, the train stage (tasks.train.stage
.run_train, the family's defaults from TrainConfig) runs alternately without evaluation
(train.eval_every 0: the last weights are the output) and with it (--eval-every,
patience 0, so both arms run every step and compare like with like), --repeats times each.
Outputs go to a temporary directory. Reported:

- the median loop seconds of each arm and their ratio (with / without); the with-arm's own
  eval_seconds over its training seconds, a figure less exposed to load from other jobs;
- the evaluation curve (step, KID) of the last with-run and its best step;
- what --patience would have done on that curve (tasks.train.early_stopping replayed: the
  evaluations draw from no training stream, so the run with patience follows the same
  curve up to its stop), and a run with it, to confirm.

Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402

from synthloop.config import TrainConfig  # noqa: E402
from tasks.train.early_stopping import EarlyStopping  # noqa: E402
from tasks.train.stage import run_train  # noqa: E402


def config(args: argparse.Namespace, out: Path, **update: object) -> TrainConfig:
    values = {
        "family": args.family,
        "steps": args.steps,
        "device": "cpu",
        "cpu_threads": args.threads,
        "input": args.data,
        "evaluator": args.evaluator,
        "val_data": args.val,
        "output": out / "model",
        "checkpoints": out / "checkpoints",
        "reports": out / "reports",
    }
    return TrainConfig.model_validate(values | update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="cgan")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=TrainConfig().eval_every)
    parser.add_argument("--patience", type=int, default=TrainConfig().patience)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=PROJECT / "data/fused")
    parser.add_argument("--evaluator", type=Path, default=PROJECT / "models/evaluator")
    parser.add_argument("--val", type=Path, default=PROJECT / "data/clean/val")
    parser.add_argument("--skip-patience-run", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    seconds: dict[str, list[float]] = {"without": [], "with": []}
    eval_share: list[float] = []
    card: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for arm, every in (("without", 0), ("with", args.eval_every)):
                out = Path(tmp) / f"{arm}{repeat}"
                run = run_train(config(args, out, eval_every=every, patience=0))
                seconds[arm].append(run["train_seconds"])
                print(
                    f"  {arm:<8} repeat {repeat}: {run['train_seconds']:.1f}s "
                    f"({run['eval_seconds']:.1f}s evaluating)",
                    flush=True,
                )
                if arm == "with":
                    card = run
                    training = run["train_seconds"] - run["eval_seconds"]
                    eval_share.append(run["eval_seconds"] / training)
        without, with_ = (statistics.median(seconds[a]) for a in ("without", "with"))
        print(f"\n{args.family}, {args.steps} steps, {args.threads} thread(s), CPU")
        print(f"loop seconds, median of {args.repeats}: without {without:.1f}, with {with_:.1f}")
        print(f"ratio with / without: {with_ / without:.3f}")
        print(f"eval seconds / training seconds (with-arm): {statistics.median(eval_share):.3f}")
        print(f"\ncurve (step, score, kid, rejected), every {args.eval_every} steps:")
        for point in card["eval_curve"]:
            print(f"  {point['step']:>6}  {point['score']}  {point['kid']}  {point['rejected']}")
        print(f"best step {card['best_step']}, score {card['best_score']}")

        replay = EarlyStopping(args.patience)
        for point in card["eval_curve"]:
            score = point["score"] if point["score"] is not None else float("nan")
            if replay.update(point["step"], score).stop:
                break
        stop = replay.curve[-1][0] if replay.stopped else None
        print(f"patience {args.patience} on this curve: stop at {stop}, best {replay.best_step}")
        if not args.skip_patience_run:
            run = run_train(config(args, Path(tmp) / "patience", patience=args.patience))
            print(
                f"run with patience {args.patience}: steps {run['steps']}, best step "
                f"{run['best_step']}, stopped early {run['stopped_early']}, "
                f"{run['train_seconds']:.1f}s"
            )


if __name__ == "__main__":
    main()
