"""The evaluator: a small CNN classifier trained on the real clean train split only.

It is the validation yardstick that needs no download (no pretrained Inception): its
penultimate layer is the feature space for domain FID, KID and
precision/recall/density/coverage, and its predictions give class consistency. It never
sees synthetic data, so its judgement does not depend on the generator.

Architecture: three conv stages (width, 2 width, 4 width channels; each two 3x3
conv-BN-ReLU, then 2x2 max-pooling while the map is larger than 4x4), global average
pooling, a `feature_dim` linear-BN-ReLU feature layer and a linear head. It handles 8x8 up
to 64x64 images, grey or RGB. Trained with AdamW and a cosine schedule; the epoch with the
best validation accuracy is kept, and test accuracy is reported for that one only.

Shared: the train_evaluator stage (tasks/evaluator/stage.py) trains and writes it, train
(tasks/train/train_eval.py) and validate read it back with `load_evaluator`, and
validate's utility protocol trains its classifiers with the same `train_net`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from synthloop.config import EvaluatorConfig
from synthloop.threads import cpu_threads, intra_op_threads
from tasks.shared.images import (
    ImageTensors,
    load_image_tensors,
    resolve_device,
    to_float,
)

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
ARCHITECTURE = "synthloop-evaluator-cnn-v1"


# --- the network -------------------------------------------------------------------------


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class EvaluatorNet(nn.Module):
    """Conv stages -> global average pooling -> feature layer -> linear head."""

    def __init__(
        self, channels: int, size: int, num_classes: int, width: int, feature_dim: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = channels, size
        for stage in range(3):
            cout = width * 2**stage
            layers += _conv(cin, cout) + _conv(cout, cout)
            if side > 4:  # pool down to 4x4 at most: an 8x8 input keeps some spatial layout
                layers.append(nn.MaxPool2d(2))
                side //= 2
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature = nn.Sequential(
            nn.Linear(cin, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: float images in [-1, 1] -> (N, feature_dim)."""
        return self.feature(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _prepare(images: Tensor, channels: int, size: int, device: torch.device) -> Tensor:
    """uint8 [0, 255] or float [0, 1] (torchmetrics' normalize=True) -> float [-1, 1]."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"expected images (N, {channels}, {size}, {size}), got {tuple(images.shape)}"
        )
    images = images.to(device)
    if images.dtype == torch.uint8:
        return to_float(images)
    return images.float().mul(2.0).sub(1.0)


class FeatureExtractor(nn.Module):
    """The evaluator's feature layer as a torchmetrics `feature=` module.

    torchmetrics (1.9) passes a custom module the images exactly as given to `update`
    (uint8 with normalize=False, float [0, 1] with normalize=True) and reads `num_features`
    instead of probing with a dummy 299x299 image. It always runs in eval mode: BatchNorm
    must use its running statistics, whatever mode the metric is put in.
    """

    def __init__(self, net: EvaluatorNet, channels: int, size: int) -> None:
        super().__init__()
        self.net = net
        self.channels = channels
        self.size = size
        self.num_features = net.feature[0].out_features
        self.train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        return self.net.features(_prepare(images, self.channels, self.size, device)).float()


class Evaluator:
    """A trained evaluator: class names, features and probabilities of uint8 images."""

    def __init__(
        self, net: EvaluatorNet, classes: list[str], channels: int, size: int, batch_size: int
    ) -> None:
        self.net = net.eval()
        self.classes = classes
        self.channels = channels
        self.size = size
        self.batch_size = batch_size
        self.feature_dim = net.feature[0].out_features

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> Evaluator:
        self.net.to(device)
        return self

    @torch.no_grad()
    def _batched(self, images: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        # One intra-op thread for small images wherever this runs (a stage, a shard task, the
        # flow's drift probe): oneDNN caches conv primitives per shape, and one built for
        # another thread count gives other float bits for the same features.
        out = []
        with small_image_cpu_threads(self.device, self.size):
            for lo in range(0, len(images), self.batch_size):
                x = _prepare(
                    images[lo : lo + self.batch_size], self.channels, self.size, self.device
                )
                out.append(fn(x).float().to(images.device))
        if not out:
            raise ValueError("no images given")
        return torch.cat(out)

    def features(self, images: Tensor) -> Tensor:
        """(N, C, H, W) uint8 -> (N, feature_dim) float, on the images' device."""
        return self._batched(images, self.net.features)

    def probabilities(self, images: Tensor) -> Tensor:
        """(N, C, H, W) uint8 -> (N, num_classes) softmax probabilities."""
        return self._batched(images, lambda x: self.net(x).softmax(1))

    @torch.no_grad()
    def probabilities_of_features(self, features: Tensor) -> Tensor:
        """`probabilities` from `features`' output, without a second pass through the body."""
        return self.net.head(features.to(self.device)).softmax(1).float().to(features.device)

    def feature_extractor(self) -> FeatureExtractor:
        """A module for torchmetrics' `feature=` argument, sharing this evaluator's weights."""
        return FeatureExtractor(self.net, self.channels, self.size)


# --- training ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    train: ImageTensors
    val: ImageTensors
    test: ImageTensors


def load_splits(root: Path) -> Splits:
    """Decode train, val and test; the class order is train's labels, sorted."""
    train = load_image_tensors(root / "train")
    return Splits(
        train=train,
        val=load_image_tensors(root / "val", classes=train.classes),
        test=load_image_tensors(root / "test", classes=train.classes),
    )


def build_net(cfg: EvaluatorConfig, channels: int, size: int, num_classes: int) -> EvaluatorNet:
    return EvaluatorNet(channels, size, num_classes, cfg.width, cfg.feature_dim)


@torch.no_grad()
@torch.no_grad()
def predict(net: EvaluatorNet, data: ImageTensors, batch_size: int) -> Tensor:
    """The predicted label index of every row, on the CPU."""
    net.eval()
    device = next(net.parameters()).device
    return torch.cat(
        [
            net(to_float(data.images[lo : lo + batch_size].to(device))).argmax(1).cpu()
            for lo in range(0, len(data), batch_size)
        ]
    )


def accuracy(net: EvaluatorNet, data: ImageTensors, batch_size: int) -> tuple[float, list[float]]:
    """(overall accuracy, per-class accuracy by label index; NaN for an absent class)."""
    preds = predict(net, data, batch_size)
    correct = (preds == data.labels).float()
    per_class = [
        float(correct[data.labels == c].mean()) if (data.labels == c).any() else float("nan")
        for c in range(len(data.classes))
    ]
    return float(correct.mean()), per_class


def small_image_cpu_threads(
    device: torch.device, size: int, requested: int = 0
) -> AbstractContextManager:
    """torch's intra-op threads for work on `size`-pixel images (synthloop/threads.py: one
    for small images on CPU, unless `requested`), restored afterwards."""
    return cpu_threads(device.type, intra_op_threads(requested, size))


def epoch_order(
    labels: Tensor,
    balanced: bool,
    generator: torch.Generator,
    synthetic: Tensor | None = None,
    synthetic_share: float = 1.0,
) -> Tensor:
    """One epoch's row order: a permutation, or len(labels) rows drawn with replacement.

    `balanced` draws every class equally often (weights 1/class count). `synthetic` (a
    boolean mask) with `synthetic_share` < 1 caps the share of each class's draws that go
    to its synthetic rows; its real rows share the rest equally."""
    n = len(labels)
    capped = synthetic is not None and synthetic_share < 1.0
    if not balanced and not capped:
        return torch.randperm(n, generator=generator)
    counts = torch.bincount(labels).double()
    weights = 1.0 / counts[labels]  # within a class, every row alike
    if capped:
        syn = torch.bincount(labels[synthetic], minlength=len(counts)).double()
        real = counts - syn
        share = torch.where(real > 0, torch.clamp(syn / counts, max=synthetic_share), 1.0)
        per_real = (1 - share) / real.clamp(min=1)
        per_syn = share / syn.clamp(min=1)
        weights = torch.where(synthetic, per_syn[labels], per_real[labels])
    if not balanced:
        weights = weights * counts[labels]  # each class as often as its rows
    return torch.multinomial(weights, n, replacement=True, generator=generator)


# Logit adjustment's temperature (Menon et al., "Long-tail learning via logit adjustment",
# ICLR 2021): tau = 1 makes the adjusted loss's minimiser the balanced-error classifier.
LOGIT_TAU = 1.0


def log_prior(labels: Tensor, n_classes: int) -> Tensor:
    """(n_classes,) float32: log of each class's share of `labels` (a class without rows
    gets the log of half a row's share, not minus infinity)."""
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=0.5)
    return torch.log(counts / counts.sum())


def logit_adjusted_loss(logits: Tensor, labels: Tensor, prior: Tensor, tau: float) -> Tensor:
    """Cross-entropy of `logits + tau * prior` (`prior` a `log_prior`): the rare classes
    must win by a margin that grows as their prior shrinks. With equal priors the shift is
    the same for every class, so the loss is the plain one; predictions use the plain
    logits."""
    return F.cross_entropy(logits + tau * prior.to(logits.device), labels)


def train_net(
    cfg: EvaluatorConfig,
    splits: Splits,
    device: torch.device,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    balanced: bool = False,
    synthetic: Tensor | None = None,
    synthetic_share: float = 1.0,
    logit_adjusted: bool = False,
) -> tuple[EvaluatorNet, dict]:
    """Train on splits.train; keep the weights of the epoch with the best val accuracy.

    Seeded from cfg.seed through a forked RNG, so a run is reproducible on CPU and the
    caller's global RNG state is left as it was. `augment` (uint8 batch -> uint8 batch)
    transforms every training batch on the fly. `balanced` draws every class equally often
    (rows with replacement, weights 1/class count), the usual remedy for a long tail;
    `synthetic` and `synthetic_share` cap the synthetic rows' share (`epoch_order`).
    `logit_adjusted` trains on `logit_adjusted_loss` with the training labels' prior (the
    other remedy for a long tail; with `balanced` draws the prior is flat: no change).
    """
    with small_image_cpu_threads(device, splits.train.images.shape[-1], cfg.cpu_threads):
        _, channels, size, _ = splits.train.images.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = build_net(cfg, channels, size, len(splits.train.classes)).to(device)
        images = splits.train.images.to(device)
        labels = splits.train.labels.to(device)
        n = len(images)
        if n < 2:
            raise ValueError(
                f"a classifier needs at least 2 training images, got {n} (BatchNorm cannot "
                "train on one); add images or leave this arm out"
            )
        # Drop a trailing batch of one: BatchNorm cannot train on a single sample.
        steps_per_epoch = max(1, n // cfg.batch_size + (n % cfg.batch_size > 1))
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, cfg.epochs * steps_per_epoch
        )
        generator = torch.Generator().manual_seed(cfg.seed)
        n_classes = len(splits.train.classes)
        # Each class is drawn as often as its rows (balanced draws: equally): that is its prior.
        prior = (
            torch.zeros(n_classes) if balanced else log_prior(splits.train.labels, n_classes)
        ).to(device)
        best_acc, best_epoch, best_state, history = -1.0, 0, None, []
        for epoch in range(1, cfg.epochs + 1):
            net.train()
            order = epoch_order(
                splits.train.labels, balanced, generator, synthetic, synthetic_share
            ).to(device)
            total = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                batch = images[idx] if augment is None else augment(images[idx])
                logits = net(to_float(batch))
                if logit_adjusted:
                    loss = logit_adjusted_loss(logits, labels[idx], prior, LOGIT_TAU)
                else:
                    loss = F.cross_entropy(logits, labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(idx)
            val_acc, _ = accuracy(net, splits.val, cfg.batch_size)
            history.append({"epoch": epoch, "loss": total / n, "val_accuracy": val_acc})
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        assert best_state is not None
        net.load_state_dict(best_state)
        return net.eval(), {"best_epoch": best_epoch, "history": history}


def load_evaluator(
    directory: Path | str, device: str | torch.device = "cpu", batch_size: int = 1024
) -> Evaluator:
    """Read an evaluator written by `run_train_evaluator`."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG).read_text())
    if meta.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{directory}: unknown evaluator architecture {meta.get('architecture')}")
    cfg = meta["config"]
    net = EvaluatorNet(
        meta["channels"], meta["size"], len(meta["classes"]), cfg["width"], cfg["feature_dim"]
    )
    net.load_state_dict(load_file(str(directory / WEIGHTS)))
    device = resolve_device(device) if isinstance(device, str) else device
    return Evaluator(net.to(device), meta["classes"], meta["channels"], meta["size"], batch_size)
