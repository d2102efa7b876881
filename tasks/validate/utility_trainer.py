"""The downstream classifier of every utility arm, and the processes that train them.

`UtilityTrainer` is one arm's training, a picklable callable (training set, seed, recipe)
-> its predictions (val, test):
- the evaluator's architecture (`tasks/shared/evaluator.py`), trained for about `steps`
  optimizer steps whatever the size of its training set, so a larger set (real + synthetic) does not
  win merely by training longer; the epoch with the best val accuracy is kept;
- seed s gives every arm the same initial weights and augmentation stream;
- the recipe (`tasks.validate.utility_protocol.Recipe`) says whether the augment policy
  applies and which remedy for a long tail: every class drawn equally often, or rows drawn as they
  come with the logit-adjusted loss;
- `synthetic_share` caps the share of a class's draws that go to synthetic rows (rows the
  real train split does not hold): with 10 real images and 100 synthetic ones the real ten
  would otherwise be drawn a tenth as often as without them. 1.0 draws every row of a class
  equally often.

`TrainerPool` runs a trainer in worker processes, one arm each, so that the dozen trainings
of the protocol use every core the stage may use. Each training is seeded and, on small
images, runs on one intra-op thread in a worker as in this process, so the figures do not
depend on where it ran (tests/test_utility_trainer.py). `utility_workers` says how many.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch

from synthloop.config import AugmentPolicy, EvaluatorConfig, ValidateConfig
from synthloop.threads import SMALL_IMAGE, usable_cpus
from tasks.shared.evaluator import Splits, predict, small_image_cpu_threads, train_net
from tasks.shared.images import ImageTensors
from tasks.validate.online_augment import batch_augmenter
from tasks.validate.utility_protocol import Predictions, Recipe, run_now

# A worker is a fresh interpreter importing torch and this package (about 3-5 s of CPU on
# a shared core). Below this many training images per classifier (steps x batch size; the
# default 200 x 128 took ~11 s of one core on 8x8 images) starting one costs more than it
# saves; tests' short trainings stay in this process.
POOL_MIN_IMAGES = 12_800


@dataclass(frozen=True)
class UtilityTrainer:
    """One utility arm's training: `trainer(data, seed, recipe) -> (val, test)` predictions."""

    splits: Splits
    steps: int
    evaluator: EvaluatorConfig
    policy: AugmentPolicy
    device: str = "cpu"
    synthetic_share: float = 1.0

    @classmethod
    def configured(
        cls,
        cfg: ValidateConfig,
        evaluator: EvaluatorConfig,
        policy: AugmentPolicy,
        splits: Splits,
        device: torch.device,
    ) -> UtilityTrainer:
        """The trainer validate's params describe (the stage's and the benchmarks')."""
        return cls(
            splits,
            cfg.utility_steps,
            evaluator,
            policy,
            str(device),
            cfg.utility_synthetic_share,
        )

    def __call__(self, train: ImageTensors, seed: int, recipe: Recipe) -> Predictions:
        batch_size = self.evaluator.batch_size
        steps_per_epoch = max(1, -(-len(train) // batch_size))
        epochs = max(1, -(-self.steps // steps_per_epoch))
        cfg = self.evaluator.model_copy(update={"epochs": epochs, "seed": seed})
        stream = torch.Generator().manual_seed(seed)
        online = batch_augmenter(self.policy, stream) if recipe.augment else None
        real = set(self.splits.train.ids)
        synthetic = torch.tensor([i not in real for i in train.ids], dtype=torch.bool)
        device = torch.device(self.device)
        size = train.images.shape[-1]
        # predict as well as train on the thread count of the rule: the same bits anywhere
        with small_image_cpu_threads(device, size, cfg.cpu_threads):
            net, _ = train_net(
                cfg,
                replace(self.splits, train=train),
                device,
                online,
                recipe.remedy == "balanced",
                synthetic if synthetic.any() else None,
                self.synthetic_share,
                logit_adjusted=recipe.remedy == "logit-adjusted",
            )
            return predict(net, self.splits.val, batch_size), predict(
                net, self.splits.test, batch_size
            )


def utility_workers(requested: int, trainer: UtilityTrainer, trainings: int) -> int:
    """Processes for `trainings` utility classifiers: `requested` when set (> 0), else one
    per usable CPU on the CPU (at most one per training), one on a GPU or for trainings too
    short to pay a worker's start. 1 means this process."""
    if requested > 0:
        return min(requested, trainings)
    if trainer.device != "cpu" or multiprocessing.current_process().daemon:
        return 1  # one GPU is shared by all; a daemonic process may not have children
    if trainer.steps * trainer.evaluator.batch_size < POOL_MIN_IMAGES:
        return 1
    return max(1, min(usable_cpus(), trainings))


class TrainerPool:
    """`trainer` in `workers` spawned processes (1: in this process, as it is called).

    `submit(data, seed, recipe)` returns a Future of the predictions; leaving the `with`
    block waits for the workers, and on an error cancels what is queued. With workers on
    large images, each worker gets its share of the usable CPUs as intra-op threads, so
    workers and torch do not oversubscribe the machine."""

    def __init__(self, trainer: UtilityTrainer, workers: int) -> None:
        self.workers = workers
        self._inline = run_now(trainer)
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            size = trainer.splits.train.images.shape[-1]
            if trainer.evaluator.cpu_threads == 0 and size > SMALL_IMAGE:
                share = max(1, usable_cpus() // workers)
                trainer = replace(
                    trainer, evaluator=trainer.evaluator.model_copy(update={"cpu_threads": share})
                )
            # spawn, not fork: this process has torch's threads, which fork would copy mid-op
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(trainer,),
            )

    def submit(self, data: ImageTensors, seed: int, recipe: Recipe) -> Future[Predictions]:
        if self._pool is not None:
            return self._pool.submit(_train_in_worker, data, seed, recipe)
        return self._inline(data, seed, recipe)

    def __enter__(self) -> TrainerPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=kind is not None)


_worker_trainer: UtilityTrainer | None = None  # set once in each worker process


def _start_worker(trainer: UtilityTrainer) -> None:
    global _worker_trainer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker_trainer = trainer


def _train_in_worker(data: ImageTensors, seed: int, recipe: Recipe) -> Predictions:
    assert _worker_trainer is not None, "the pool's initializer sets the trainer"
    return _worker_trainer(data, seed, recipe)
