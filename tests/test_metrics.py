"""Validation metrics on constructed cases, and the blocked versions against brute force."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from tasks.shared.metrics import (
    _moments,
    class_consistency,
    fid_kid,
    fid_kid_features,
    frechet_distance,
    knn_sq_distances,
    near_copy_rate,
    nearest_distances,
    per_class_fid,
    pixel_space,
    prdc,
)


class IdentityFeatures(torch.nn.Module):
    """A torchmetrics `feature=` module for inputs that already are (N, D) features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float()


pytestmark = [
    pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def gaussian(n: int, dim: int = 8, shift: float = 0.0, scale: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen) * scale + shift


# --- brute force references --------------------------------------------------------------


def brute_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al.'s reference implementation, on full distance matrices."""

    def dists(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_radii = np.sort(dists(real, real), axis=1)[:, k]
    fake_radii = np.sort(dists(fake, fake), axis=1)[:, k]
    rf = dists(real, fake)
    return {
        "precision": (rf < real_radii[:, None]).any(axis=0).mean(),
        "recall": (rf < fake_radii[None, :]).any(axis=1).mean(),
        "density": (1.0 / k) * (rf < real_radii[:, None]).sum(axis=0).mean(),
        "coverage": (rf.min(axis=1) < real_radii).mean(),
    }


# --- FID / KID ---------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero():
    real = gaussian(600)
    fid, kid_mean, _ = fid_kid_features(real, real)
    assert fid == pytest.approx(0.0, abs=1e-3)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)
    # KID's unbiased estimator needs independent sets: a fresh sample of the same law.
    assert abs(fid_kid_features(real, gaussian(600, seed=1))[1]) < 0.01
    assert kid_mean < 0.01


def test_shifted_distribution_gives_large_fid_and_kid():
    real, fake = gaussian(500), gaussian(500, shift=2.0, seed=1)
    fid, kid_mean, kid_std = fid_kid_features(real, fake)
    assert fid == pytest.approx(8 * 2.0**2, rel=0.1)  # |mu1 - mu2|^2 dominates
    assert kid_mean > 1.0 and kid_std >= 0
    same_law = fid_kid_features(real, gaussian(500, seed=2))
    assert same_law[0] < 0.2 * fid and same_law[1] < 0.05 * kid_mean


def test_kid_handles_few_samples_and_is_reproducible():
    real, fake = gaussian(7), gaussian(5, shift=1.0, seed=1)
    first = fid_kid_features(real, fake, kid_subset_size=1000)  # subset shrinks to 5
    assert all(math.isfinite(v) for v in first)
    assert fid_kid_features(real, fake, kid_subset_size=1000) == first
    assert all(math.isnan(v) for v in fid_kid_features(real, fake[:1]))


def test_fid_kid_on_images_runs_the_extractor():
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=gen)
    extractor = IdentityFeatures(16)
    assert fid_kid(real, real, extractor, batch_size=7)[0] == pytest.approx(0.0, abs=1e-2)
    fake = (real.int() // 2).to(torch.uint8)
    fid = fid_kid(real, fake, extractor, batch_size=7)[0]
    assert fid == pytest.approx(frechet_distance(real.flatten(1).float(), fake.flatten(1).float()))


@pytest.mark.parametrize(
    ("n_real", "n_fake", "batch_size", "seed"),
    [(300, 200, 8192, 0), (130, 70, 32, 3), (5, 7, 8192, 1)],
)
def test_fid_kid_features_equal_torchmetrics_bit_for_bit(n_real, n_fake, batch_size, seed):
    """The in-module FID and KID give exactly torchmetrics' figures for the same features,
    batches and seed, so dropping the import moved no recorded figure (and no early stop)."""
    real, fake = gaussian(n_real, dim=8), gaussian(n_fake, dim=8, shift=0.5, scale=1.5, seed=1)
    subset = min(50, n_real, n_fake)
    fid = FrechetInceptionDistance(feature=IdentityFeatures(8), sync_on_compute=False)
    kid = KernelInceptionDistance(
        feature=IdentityFeatures(8), subsets=20, subset_size=subset, sync_on_compute=False
    )
    for feats, is_real in ((real, True), (fake, False)):
        for lo in range(0, len(feats), batch_size):
            fid.update(feats[lo : lo + batch_size], real=is_real)
            kid.update(feats[lo : lo + batch_size], real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    expected = (float(fid.compute()), float(kid_mean), float(kid_std))
    mine = fid_kid_features(real, fake, 50, 20, seed=seed, batch_size=batch_size)
    assert mine == expected


@pytest.mark.parametrize(("n_real", "n_fake"), [(300, 200), (6, 9)])  # n > d and n < d routes
def test_frechet_distance_matches_torchmetrics(n_real, n_fake):
    real, fake = gaussian(n_real, dim=8), gaussian(n_fake, dim=8, shift=0.5, scale=1.5, seed=1)
    metric = FrechetInceptionDistance(feature=IdentityFeatures(8)).set_dtype(torch.float64)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_frechet_distance_is_stable_far_from_the_origin_and_chunked():
    real, fake = gaussian(300, dim=8), gaussian(200, dim=8, shift=0.5, seed=1)
    far = frechet_distance(real.double() + 1e4, fake.double() + 1e4)  # float32 would round
    assert far == pytest.approx(frechet_distance(real, fake), rel=1e-6)
    mean, cov = _moments(real.double() + 1e4, chunk=7)
    torch.testing.assert_close(mean, (real.double() + 1e4).mean(0))
    torch.testing.assert_close(cov, torch.cov(real.double().T))


def test_per_class_fid():
    real = torch.cat([gaussian(50), gaussian(50, shift=3.0, seed=1)])
    labels = torch.tensor([0] * 50 + [1] * 50)
    fake = torch.cat([gaussian(40, seed=2), gaussian(1, seed=3)])
    fake_labels = torch.tensor([0] * 40 + [1])
    out = per_class_fid(real, labels, fake, fake_labels, ["a", "b", "c"])
    assert out["a"] == pytest.approx(frechet_distance(real[:50], fake[:40]))
    assert out["b"] is None and out["c"] is None  # < 2 samples on a side


# --- precision / recall / density / coverage ---------------------------------------------


def test_prdc_of_a_set_with_itself_is_one():
    real = gaussian(300)
    assert prdc(real, real, k=5) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    )


def test_prdc_on_a_shifted_or_noisy_distribution():
    real = gaussian(400)
    shifted = prdc(real, gaussian(400, shift=4.0, seed=1))
    assert shifted["precision"] < 0.05 and shifted["coverage"] < 0.05
    noise = prdc(real, gaussian(400, scale=4.0, seed=1))  # far wider than the real data
    assert noise["precision"] < 0.2 and noise["density"] < 0.2
    same = prdc(real, gaussian(400, seed=2))
    assert min(same["precision"], same["recall"], same["coverage"]) > 0.7


def test_prdc_with_too_few_samples_is_nan():
    out = prdc(gaussian(50), gaussian(5, seed=1), k=5)
    assert set(out) == {"precision", "recall", "density", "coverage"}
    assert all(math.isnan(v) for v in out.values())


@pytest.mark.parametrize("block_size", [7, 64, None])
def test_prdc_blocked_equals_brute_force(block_size):
    real, fake = gaussian(90, dim=5), gaussian(70, dim=5, shift=0.3, scale=1.2, seed=1)
    got = prdc(real, fake, k=3, block_size=block_size)
    assert got == pytest.approx(brute_prdc(real.double().numpy(), fake.double().numpy(), 3))


# --- nearest distances -------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 5, 33, None])
def test_nearest_distances_blocked_equals_brute_force(block_size):
    queries, reference = gaussian(47, dim=6), gaussian(38, dim=6, seed=1)
    full = torch.cdist(queries.double(), reference.double())
    got = nearest_distances(queries, reference, block_size=block_size)
    torch.testing.assert_close(got.double(), full.min(1).values, atol=1e-4, rtol=1e-5)

    self_full = torch.cdist(queries.double(), queries.double()).fill_diagonal_(math.inf)
    got = nearest_distances(queries, queries, exclude_self=True, block_size=block_size)
    torch.testing.assert_close(got.double(), self_full.min(1).values, atol=1e-4, rtol=1e-5)

    k3 = knn_sq_distances(queries, reference, k=3, block_size=block_size)
    torch.testing.assert_close(k3.double().sqrt(), full.sort(1).values[:, :3], atol=1e-4, rtol=1e-5)


def test_exclude_self_is_by_index_and_images_flatten():
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    got = nearest_distances(points, points, exclude_self=True, block_size=2)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 5.0]), atol=1e-3, rtol=0)
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    images[1] = 255
    assert pixel_space(images).shape == (2, 4)
    assert nearest_distances(pixel_space(images[:1]), pixel_space(images[1:]))[0] == 2.0
    with pytest.raises(ValueError, match="k=2"):
        knn_sq_distances(points[:2], points[:2], k=2, exclude_self=True)


# --- near copies -------------------------------------------------------------------------


def random_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)


def test_near_copy_rate_flags_copies_of_the_training_set():
    train, test = random_images(500, 0), random_images(1000, 1)
    rate, threshold, distances = near_copy_rate(train.clone(), train, test, percentile=5.0)
    assert rate == 1.0 and threshold > 1.0
    assert distances.shape == (500,) and float(distances.max()) < 0.01


def test_near_copy_rate_of_an_independent_sample_is_about_the_percentile():
    train, test = random_images(500, 0), random_images(1000, 1)
    rate, _, _ = near_copy_rate(random_images(3000, 2), train, test, percentile=5.0)
    assert rate == pytest.approx(0.05, abs=0.03)
    rate, _, _ = near_copy_rate(random_images(3000, 2), train, test, percentile=20.0)
    assert rate == pytest.approx(0.20, abs=0.05)


# --- class consistency -------------------------------------------------------------------


def test_class_consistency():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    accuracy, confidence = class_consistency(probs, torch.tensor([0, 1, 1, 1]))
    assert accuracy == pytest.approx(0.75)
    assert confidence == pytest.approx((0.9 + 0.8 + 0.4 + 0.7) / 4)


def test_class_matched_fid_charges_the_images_not_the_class_mix():
    from tasks.shared.metrics import class_matched_fid, frechet_distance

    gen = torch.Generator().manual_seed(0)

    def sample(per_class: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
        centres = torch.tensor([[0.0] * 4, [6.0] * 4])  # two well-apart classes
        return centres[labels] + torch.randn(len(labels), 4, generator=gen), labels

    ref, ref_labels = sample([900, 100])  # long-tailed, like a train split
    balanced, balanced_labels = sample([500, 500])  # the same classes, another mix
    plain = frechet_distance(ref, balanced)
    matched = class_matched_fid(ref, ref_labels, balanced, balanced_labels)
    assert plain > 10 and matched < 0.2  # the mix was all of the plain figure
    # The same mix: weights all equal, the plain figure.
    same, same_labels = sample([900, 100])
    assert class_matched_fid(ref, ref_labels, same, same_labels) == pytest.approx(
        frechet_distance(ref, same), rel=1e-6
    )
    # Images that differ are still charged, whatever the mix.
    shifted = balanced + 3.0
    assert class_matched_fid(ref, ref_labels, shifted, balanced_labels) > 30
    # A class the other side lacks is left out of both; under 2 rows: NaN.
    only_first = balanced[balanced_labels == 0]
    zeros = torch.zeros(len(only_first), dtype=torch.long)
    assert class_matched_fid(ref, ref_labels, only_first, zeros) < 0.2
    assert math.isnan(class_matched_fid(ref, ref_labels, only_first[:1], zeros[:1]))
