"""Candidate default datasets: on a long tail where only three classes are short, does a
generator trained on all of it add anything to the cheap alternative?

    python benchmarks/long_tail.py [--data digits|styled] [--family cgan] [--short-train 10]
        [--rich-train 120] [--gseeds 2] [--first-gseed 0] [--cseeds 3] [--steps 1500]
        [--multiple 1.0] [--share 0.5] [--pool gap|proportional]
        [--sampler prior|posterior|transfer] [--latent-adversary W] [--set key=value ...]

The question behind issue 25's default: which data would let the loop show a gain on any
machine? Here the rich classes can teach the short ones: the generator trains on every
class (`--rich-train` train images each) while classes 3, 5 and 8 have `--short-train`.
Per class, from a permutation seeded 0: the train rows, max(3, n // 6) val rows, and 60
test rows (a larger short-class test split than the loop's, to measure the effect, not to
gate it).
  yardstick  the evaluator CNN trained on the train split (validate's acceptance rule:
             confidence in the intended class >= validate.min_confidence);
  baseline   the downstream classifier (validate's utility trainer) with the augment policy
             on the fly, under each remedy: class-balanced draws, logit-adjusted loss;
  generator  `--family` (params.yaml's settings, `--set` on its section) trained on the
             train split alone, `--steps` steps, its last weights (no checkpoint choice);
             200 samples per class, the accepted ones kept up to the pool rule's target
             (min(multiple x R, R_max - R) for R train rows: the short classes get R each);
  arm        the same classifier, remedy and seed, plus the kept rows (at most `--share` of
             a class's draws).
  --pool     which classes get synthetic rows: `gap`, the pool rule above (the short classes
             only); `proportional`, every class up to `--multiple` x R, the rich ones too, so
             that whether a row is synthetic says nothing about its class.
  --sampler  `prior`, the family's own sampling; `posterior` (vae only), each sample a draw
             from the encoder's posterior of one of the class's own train images, decoded by
             the EMA decoder: variants of the user's images; `transfer` (vae only), the
             posterior of an image of another class decoded with the sample's own label:
             the other classes' styles carried over to it.
  --latent-adversary  (vae) W > 0 trains benchmarks/class_free_vae.py's CVAE instead: an
             adversary pushes the latent to carry no class, with weight W, so that
             `transfer` can carry only the style across.
Prints the baselines' short-class accuracy, per generator seed validate's privacy figures
of the kept rows (yardstick features) against the loop's two privacy gates, the acceptance
rate of the short classes and the paired gain per remedy, then the gain over every
(generator seed, classifier seed) pair with its 95% t-interval. The generator trains on
the real train rows only, not on the augmented rows the loop's fused set adds. Figures
only: nothing asserted.

Datasets: `digits`, scikit-learn's 8x8 digits as the demo embeds them; `styled`, the same
digits at 16x16 with a seeded style per image shared by every class (rotation within 35
degrees, shear, scale, a shift, thicker or thinner strokes), so a short class's few images
cannot show every style and a generator could learn the styles from the rich classes.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
for path in (PROJECT, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from utility import synthesize, tensors  # noqa: E402 (benchmarks/utility.py)

from synthloop.config import load_params  # noqa: E402
from tasks.shared.evaluator import Splits, train_net  # noqa: E402
from tasks.shared.images import concat, to_float  # noqa: E402
from tasks.shared.pool import pool_targets  # noqa: E402
from tasks.validate.figures import privacy  # noqa: E402
from tasks.validate.gates import passes, privacy_checks  # noqa: E402
from tasks.validate.utility_protocol import Recipe, accuracy_of, t_interval  # noqa: E402
from tasks.validate.utility_trainer import UtilityTrainer  # noqa: E402

SHORT = (3, 5, 8)
TEST_PER_CLASS = 60
SAMPLES_PER_CLASS = 200
RECIPES = (Recipe(True, "balanced"), Recipe(True, "logit-adjusted"))


def digits() -> tuple[np.ndarray, np.ndarray]:
    from tasks.ingest.demo import digit_images

    images, labels = digit_images()
    return images[:, None], labels


def styled(size: int = 16, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from scipy import ndimage

    from tasks.ingest.demo import digit_images

    images, labels = digit_images()
    rng = np.random.default_rng(seed)
    out = []
    centre = np.full(2, size / 2 - 0.5)
    for image in images:
        canvas = np.zeros((size, size), np.float32)
        big = Image.fromarray(image).resize((12, 12), Image.BILINEAR)
        canvas[2:14, 2:14] = np.asarray(big, np.float32)
        angle = np.deg2rad(rng.uniform(-35, 35))
        shear, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.15)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        matrix = rotation @ np.array([[1, shear], [0, 1]]) / scale
        offset = centre - matrix @ centre + rng.uniform(-1.5, 1.5, 2)
        styled_image = ndimage.affine_transform(canvas, matrix, offset=offset, order=1)
        stroke = rng.integers(0, 3)
        if stroke == 1:
            styled_image = ndimage.grey_dilation(styled_image, size=(2, 2))
        elif stroke == 2:
            styled_image = ndimage.grey_erosion(styled_image, size=(2, 1)) * 1.2
        out.append(np.clip(styled_image, 0, 255).astype(np.uint8))
    return np.stack(out)[:, None], labels


DATASETS = {"digits": digits, "styled": styled}


def split(labels: np.ndarray, short_train: int, rich_train: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    train, val, test = [], [], []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = short_train if c in SHORT else rich_train
        v = max(3, n // 6)
        train += list(rows[:n])
        val += list(rows[n : n + v])
        test += list(rows[n + v : n + v + TEST_PER_CLASS])
    return np.array(train), np.array(val), np.array(test)


def posterior_samples(
    work: Path, train, labels: torch.Tensor, seed: int, transfer: bool = False
) -> torch.Tensor:
    """Per label, a draw from the VAE's posterior q(z | x, y') of one train image x (label
    y'), decoded by the EMA decoder with the requested label (uint8). `transfer` False: x is
    one of the label's own images (variants of the user's images). `transfer` True: x is
    an image of any other class, so its style (the latent) comes from the whole train set,
    the rich classes mostly, and its class from the label. The encoder is not part of the
    export, so it is read from the last training checkpoint."""
    from tasks.generate.stage import load_model
    from tasks.shared.images import to_uint8

    family = load_model(work / "generator", torch.device("cpu")).family
    state = torch.load(work / "checkpoints" / "last.pt", weights_only=False)["family"]
    encoder = family.encoder
    encoder.load_state_dict(state["modules"]["encoder"])
    generator = torch.Generator().manual_seed(seed)
    x, y = to_float(train.images), train.labels
    picks = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        own = torch.nonzero((y != c) if transfer else (y == c)).flatten()
        where = torch.nonzero(labels == c).flatten()
        picks[where] = own[torch.randint(len(own), (len(where),), generator=generator)]
    out = []
    encoder.eval()
    with torch.no_grad():
        for batch, wanted in zip(picks.split(256), labels.split(256), strict=True):
            mu, logvar = encoder(x[batch], y[batch])
            z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()
            out.append(to_uint8(torch.sigmoid(family.decoder_ema(z, wanted)) * 2 - 1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=sorted(DATASETS), default="digits")
    p.add_argument("--family", default="cgan")
    p.add_argument("--short-train", type=int, default=10)
    p.add_argument("--rich-train", type=int, default=120)
    p.add_argument("--gseeds", type=int, default=2, help="generator seeds: this many")
    p.add_argument("--first-gseed", type=int, default=0, help="...from this one on")
    p.add_argument("--cseeds", type=int, default=3, help="classifier seeds 0..N-1")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--multiple", type=float, default=1.0, help="loop.synthetic_multiple")
    p.add_argument("--share", type=float, default=0.5, help="validate.utility_synthetic_share")
    p.add_argument("--pool", choices=("gap", "proportional"), default="gap")
    p.add_argument("--sampler", choices=("prior", "posterior", "transfer"), default="prior")
    p.add_argument("--latent-adversary", type=float, default=0.0, help="vae: its weight")
    p.add_argument("--set", action="append", default=[], help="key=value on the family's section")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.latent_adversary > 0:
        if a.family != "vae":
            p.error("--latent-adversary needs --family vae")
        import class_free_vae

        class_free_vae.use(a.latent_adversary)
    params = load_params(PROJECT / "params.yaml")
    images, labels = DATASETS[a.data]()
    classes = [str(c) for c in range(10)]
    train, val, test = split(labels, a.short_train, a.rich_train)
    splits = Splits(*(tensors(images[r], labels[r], classes, t) for r, t in
                      ((train, "train"), (val, "val"), (test, "test"))))  # fmt: skip
    cpu = torch.device("cpu")
    epochs = math.ceil(params.validation.utility_steps / math.ceil(len(train) / 128))
    yardstick_cfg = params.train_evaluator.model_copy(
        update={"device": "cpu", "epochs": max(15, epochs)}
    )
    yardstick, _ = train_net(yardstick_cfg, splits, cpu)
    validation = params.validation.model_copy(update={"utility_synthetic_share": a.share})
    trainer = UtilityTrainer.configured(
        validation, params.train_evaluator, params.augment.policy, splits, cpu
    )
    short = torch.isin(splits.test.labels, torch.tensor(SHORT))

    def features(data) -> torch.Tensor:
        with torch.no_grad():
            return yardstick.eval().features(to_float(data.images))

    # the real splits' features once: only the kept rows change from seed to seed
    real_features = {"train": features(splits.train), "val": features(splits.val),
                     "test": features(splits.test)}  # fmt: skip

    def privacy_line(synthetic) -> str:
        """validate's privacy figures of the kept rows (yardstick features) and its gates."""
        all_features = real_features | {"synthetic": features(synthetic)}
        figures = privacy(params.validation, splits, synthetic, all_features, classes)[1]
        checks = privacy_checks(params.validation.gates, figures)
        per_class = figures["memorisation"]["pixels"]["per_class"]
        short_memorised = ", ".join(
            "-" if per_class[str(c)] is None else f"{per_class[str(c)]:.2f}" for c in SHORT
        )
        (memorised, _, max_memorised), (auc, _, max_auc) = checks.values()
        return (
            f"memorised {memorised:.3f} (gate {max_memorised}; short classes, pixels: "
            f"{short_memorised}), membership AUC high {auc:.3f} (gate {max_auc}): "
            + ("pass" if all(passes(*check) for check in checks.values()) else "FAIL")
        )

    def short_accuracy(data, seed: int, recipe: Recipe) -> float:
        predictions = trainer(data, seed, recipe)[1]
        return accuracy_of(predictions[short], splits.test.labels[short])

    base = {(r, s): short_accuracy(splits.train, s, r) for r in RECIPES for s in range(a.cseeds)}
    for r in RECIPES:
        mean = np.mean([base[r, s] for s in range(a.cseeds)])
        print(
            f"[{a.data} {a.family} short_train={a.short_train} pool={a.pool} "
            f"sampler={a.sampler} adversary={a.latent_adversary}] {r.name}: short {mean:.3f}"
        )

    family = getattr(params.train, a.family)
    for assignment in a.set:
        key, value = assignment.split("=", 1)
        family = family.model_copy(update={key: type(getattr(family, key))(value)})
    train_cfg = params.train.model_copy(update={"family": a.family, a.family: family})
    params = params.model_copy(update={"train": train_cfg})
    gains: dict[str, list[float]] = {r.name: [] for r in RECIPES}
    # the loop's own rule: gap is loop.target_per_class auto
    rule = "auto" if a.pool == "gap" else "proportional"
    train_per_class = {str(c): int((splits.train.labels == c).sum()) for c in range(10)}
    targets = pool_targets(train_per_class, rule, a.multiple)
    per_class = SAMPLES_PER_CLASS if a.pool == "gap" else 2 * a.rich_train
    for g in range(a.first_gseed, a.first_gseed + a.gseeds):
        with tempfile.TemporaryDirectory() as work:
            samples, sample_labels, seconds = synthesize(
                params, splits.train, g, a.steps, per_class, Path(work)
            )
            if a.sampler != "prior":
                transfer = a.sampler == "transfer"
                samples = posterior_samples(Path(work), splits.train, sample_labels, g, transfer)
        with torch.no_grad():
            probs = torch.softmax(yardstick.eval()(to_float(samples)), 1)
        confident = probs[torch.arange(len(sample_labels)), sample_labels] >= (
            params.validation.min_confidence
        )
        kept = []
        for c in range(10):
            target = targets[str(c)]
            kept.append(torch.nonzero((sample_labels == c) & confident).flatten()[:target])
        kept = torch.cat(kept)
        synthetic = tensors(samples[kept].numpy(), sample_labels[kept].numpy(), classes, "syn")
        print(f"  generator seed {g}: privacy of the kept rows: {privacy_line(synthetic)}")
        for r in RECIPES:
            for s in range(a.cseeds):
                gains[r.name].append(
                    short_accuracy(concat(splits.train, synthetic), s, r) - base[r, s]
                )
        accepted = {c: round(float(confident[sample_labels == c].float().mean()), 2) for c in SHORT}
        print(
            f"  generator seed {g}: {seconds:.0f} s; short classes accepted {accepted}; "
            f"{len(kept)} rows kept; gain "
            + ", ".join(f"{k} {100 * np.mean(v[-a.cseeds :]):+.1f}" for k, v in gains.items()),
            flush=True,
        )
    for name, values in gains.items():
        if len(values) < 2:
            continue  # no interval from one pair
        i = t_interval(values)
        print(
            f"  {name}: short-class gain {100 * i.mean:+.1f} [{100 * i.low:+.1f}, "
            f"{100 * i.high:+.1f}] points over {len(values)} (generator, classifier) seeds"
        )


if __name__ == "__main__":
    main()
