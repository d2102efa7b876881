"""Validation metrics over tensors: FID/KID, per-class FID, precision/recall/density/coverage,
near-copy (memorisation) rate and class consistency.

Pure functions, no IO. Everything that compares samples pairwise works block by block
(`block_size` x `block_size` squared distances at a time, merged with running top-k), so
memory stays bounded past 100k samples and no n x n matrix is ever built. Work runs on the
device of the first tensor argument: put the tensors on the GPU to compute there.

Distances are Euclidean, computed as |a|^2 + |b|^2 - 2ab in float32 (one matmul per block);
identical points therefore come out at ~1e-3 rather than exactly 0, far below any threshold
these metrics use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


def round_figure(value: float | None, digits: int = 5) -> float | None:
    """A figure for a JSON report: rounded; None for a missing, NaN or infinite one."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def default_block_size(device: torch.device) -> int:
    """Rows per distance block: 2048^2 floats (16 MiB) on CPU, as fast as larger blocks there
    (cache-friendly) with a quarter of the memory; 16384^2 (1 GiB) on a GPU, to fill it."""
    return 16384 if device.type == "cuda" else 2048


# --- features ----------------------------------------------------------------------------


@torch.no_grad()
def extract_features(images: Tensor, extractor: nn.Module, batch_size: int = 1024) -> Tensor:
    """Run `extractor` over `images` in batches; (N, D) float features on images' device."""
    chunks = []
    for lo in range(0, len(images), batch_size):
        feats = extractor(images[lo : lo + batch_size])
        chunks.append(feats.flatten(1).float().to(images.device))
    if not chunks:
        raise ValueError("no images to extract features from")
    return torch.cat(chunks)


def fid_kid_features(
    real_feats: Tensor,
    fake_feats: Tensor,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 8192,
) -> tuple[float, float, float]:
    """(FID, KID mean, KID std) of two (N, D) feature matrices.

    The same arithmetic as torchmetrics' FrechetInceptionDistance and
    KernelInceptionDistance fed these features through an identity module (bit for bit:
    tests/test_metrics.py compares them), without importing torchmetrics, which costs a
    stage process seconds (it pulls in torchvision and scipy.signal). FID: float64 sums
    accumulated `batch_size` rows at a time, then |mu1 - mu2|^2 + tr(S1 + S2 -
    2 sqrt(S1 S2)) through the eigenvalues of S1 S2. KID: the unbiased MMD of the cubic
    polynomial kernel over `kid_subsets` random subsets.

    KID's subset size shrinks to the smaller sample count (it must not exceed either; when
    a subset is then a whole set, every subset sees the same samples and the std is ~0).
    With fewer than 2 samples on a side every figure is NaN. KID's subsets are drawn from
    the global CPU RNG seeded with `seed` inside a fork, so the figure is reproducible and
    the caller's RNG is left alone.
    """
    if min(len(real_feats), len(fake_feats)) < 2:
        return math.nan, math.nan, math.nan
    device = real_feats.device
    real, fake = (f.flatten(1).float().to(device) for f in (real_feats, fake_feats))
    fid = _torchmetrics_fid(real, fake, batch_size)
    subset = min(kid_subset_size, len(real), len(fake))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scores = []
        for _ in range(kid_subsets):
            f_real = real[torch.randperm(len(real))[:subset]]
            f_fake = fake[torch.randperm(len(fake))[:subset]]
            scores.append(_polynomial_mmd(f_real, f_fake))
    kid = torch.stack(scores)
    return fid, float(kid.mean()), float(kid.std(unbiased=False))


def _torchmetrics_fid(real: Tensor, fake: Tensor, batch_size: int) -> float:
    """FID as torchmetrics computes it: float64 sums over batches, eigenvalues of S1 S2."""
    moments = []
    for feats in (real, fake):
        total = torch.zeros(feats.shape[1], dtype=torch.double, device=feats.device)
        products = torch.zeros(
            feats.shape[1], feats.shape[1], dtype=torch.double, device=feats.device
        )
        for lo in range(0, len(feats), batch_size):
            batch = feats[lo : lo + batch_size].double()
            total += batch.sum(dim=0)
            products += batch.t().mm(batch)
        n = len(feats)
        mean = (total / n).unsqueeze(0)
        moments.append((mean.squeeze(0), (products - n * mean.t().mm(mean)) / (n - 1)))
    (mu1, s1), (mu2, s2) = moments
    root = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum(dim=-1)
    value = (mu1 - mu2).square().sum(dim=-1) + (s1.trace() + s2.trace()) - 2 * root
    return float(value.to(torch.float32))


def _polynomial_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased squared MMD of the kernel (x.y / D + 1)^3 (KID's; Binkowski et al. 2018)."""
    gamma = 1.0 / x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T * gamma + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m = k_xx.shape[0]
    within = (k_xx.sum(dim=-1) - torch.diag(k_xx)).sum() + (
        k_yy.sum(dim=-1) - torch.diag(k_yy)
    ).sum()
    value = within / (m * (m - 1))
    return value - 2 * k_xy.sum(dim=0).sum() / (m**2)


def fid_kid(
    real_images: Tensor,
    fake_images: Tensor,
    extractor: nn.Module,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 1024,
) -> tuple[float, float, float]:
    """(FID, KID mean, KID std) of two image sets in `extractor`'s feature space.

    Features are extracted once per image, rather than each metric running the extractor
    again. `extractor` takes uint8 images (as torchmetrics would pass them) and returns
    (N, D).
    """
    real = extract_features(real_images, extractor, batch_size)
    fake = extract_features(fake_images, extractor, batch_size)
    return fid_kid_features(real, fake, kid_subset_size, kid_subsets, seed)


def frechet_distance(real_feats: Tensor, fake_feats: Tensor) -> float:
    """FID between Gaussians fitted to two (N, D) feature sets, in float64.

    With more samples than dimensions on both sides, means and covariances are accumulated
    over row chunks and Tr sqrt(S1 S2) comes from symmetric eigendecompositions (stabler
    than torchmetrics' eigvals of the non-symmetric S1 S2). Otherwise it is the nuclear norm
    of the small (n1, n2) cross product of the centred samples (exact: the non-zero
    eigenvalues of S1 S2 are its squared singular values), so a class with 100 samples of
    2048-d features costs little. NaN with fewer than 2 samples on a side.
    """
    n1, n2 = len(real_feats), len(fake_feats)
    if min(n1, n2) < 2:
        return math.nan
    fake_feats = fake_feats.to(real_feats.device)
    if min(n1, n2) <= real_feats.shape[1]:
        return _frechet_few_samples(real_feats.double(), fake_feats.double())
    return _frechet(*_moments(real_feats), *_moments(fake_feats))


def _frechet(mean_1: Tensor, cov_1: Tensor, mean_2: Tensor, cov_2: Tensor) -> float:
    """The Fréchet distance of two Gaussians; Tr sqrt(S1 S2) from symmetric eigensolvers."""
    vals, vecs = torch.linalg.eigh(cov_1)
    root = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root @ cov_2 @ root).clamp_min(0).sqrt().sum()
    distance = (mean_1 - mean_2).square().sum() + cov_1.trace() + cov_2.trace() - 2 * cross
    return float(distance)


def class_matched_fid(
    ref_feats: Tensor, ref_labels: Tensor, feats: Tensor, labels: Tensor
) -> float:
    """FID of `feats` against `ref_feats` with each class weighted to its share of the
    reference (over the classes both sides hold), so two sets that differ only in their
    class mix score as alike. A class-conditional generator is asked for a mix of its own
    (more of the short classes), and the real test split has another: plain FID against
    the long-tailed train split charges them the mix, not the images. Weighted mean and
    reliability-weighted covariance in float64; NaN with fewer than 2 rows on a side."""
    ref_labels, labels = ref_labels.to(ref_feats.device), labels.to(ref_feats.device)
    present = torch.unique(ref_labels)
    shared = present[torch.isin(present, labels)]
    ref_rows, rows = torch.isin(ref_labels, shared), torch.isin(labels, shared)
    if min(int(ref_rows.sum()), int(rows.sum())) < 2:
        return math.nan
    ref_feats, ref_labels = ref_feats[ref_rows].double(), ref_labels[ref_rows]
    feats, labels = feats[rows].to(ref_feats.device).double(), labels[rows]
    n = int(max(ref_labels.max(), labels.max())) + 1
    ref_share = torch.bincount(ref_labels, minlength=n).double()
    share = torch.bincount(labels, minlength=n).double()
    weights = (ref_share / ref_share.sum() / (share / share.sum()).clamp_min(1e-300))[labels]
    return _frechet(*_moments(ref_feats), *_weighted_moments(feats, weights))


def _weighted_moments(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    w = weights / weights.sum()
    mean = (w[:, None] * x).sum(0)
    centred = x - mean
    return mean, (w[:, None] * centred).T @ centred / (1 - w.square().sum())


def _moments(x: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance in float64, accumulated over row chunks.

    Rows are shifted by the first chunk's mean first, so the sums do not cancel badly when
    the features sit far from the origin.
    """
    n = len(x)
    shift = x[:chunk].double().mean(0)
    total = torch.zeros_like(shift)
    outer = torch.zeros(len(shift), len(shift), dtype=torch.float64, device=x.device)
    for lo in range(0, n, chunk):
        c = x[lo : lo + chunk].double() - shift
        total += c.sum(0)
        outer += c.T @ c
    centre = total / n
    return centre + shift, (outer - n * torch.outer(centre, centre)) / (n - 1)


def _frechet_few_samples(a: Tensor, b: Tensor) -> float:
    n1, n2 = len(a), len(b)
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    a, b = a - a.mean(0), b - b.mean(0)
    cross = torch.linalg.matrix_norm(a @ b.T, ord="nuc") / math.sqrt((n1 - 1) * (n2 - 1))
    trace_1, trace_2 = a.square().sum() / (n1 - 1), b.square().sum() / (n2 - 1)
    return float(mean_term + trace_1 + trace_2 - 2 * cross)


def per_class_fid(
    real_feats: Tensor,
    real_labels: Tensor,
    fake_feats: Tensor,
    fake_labels: Tensor,
    classes: list[str],
) -> dict[str, float | None]:
    """FID per class (label index i -> classes[i]); None where a side has < 2 samples."""
    out: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        real = real_feats[real_labels.to(real_feats.device) == index]
        fake = fake_feats[fake_labels.to(fake_feats.device) == index]
        value = frechet_distance(real, fake)
        out[name] = None if math.isnan(value) else value
    return out


# --- blocked distances -------------------------------------------------------------------


def _as_float(x: Tensor) -> Tensor:
    x = x.flatten(1)
    return x if x.is_floating_point() else x.float()


class _Blocks:
    """Squared Euclidean distances between row blocks, written into one reused buffer.

    Reuse matters on CPU: a fresh block-sized allocation per block (16 MiB) fragments
    glibc's heap, and peak RSS then grows with the number of blocks (+340 MiB for
    50k x 10k in a test) instead of staying at one block.
    """

    def __init__(self, rows: int, cols: int, like: Tensor, masks: bool = False) -> None:
        self.buffer = like.new_empty(rows * cols)
        self.masks = like.new_empty(rows * cols if masks else 0, dtype=torch.bool)

    def below(self, d2: Tensor, bound: Tensor) -> Tensor:
        """d2 < bound (broadcast) into the reused mask buffer; valid until the next call."""
        return torch.lt(d2, bound, out=self.masks[: d2.numel()].view(d2.shape))

    def sq_dists(self, a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
        """|a|^2 + |b|^2 - 2ab, one matmul, clamped at 0; valid until the next call."""
        d2 = self.buffer[: len(a) * len(b)].view(len(a), len(b))
        torch.add(a_sq[:, None], b_sq[None, :], out=d2)
        return d2.addmm_(a, b.T, alpha=-2).clamp_min_(0)


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _smallest(d2: Tensor, k: int) -> Tensor:
    """The min(k, columns) smallest values of each row, ascending (amin for k=1: 10x faster)."""
    if k == 1:
        return d2.amin(1, keepdim=True)
    return d2.topk(min(k, d2.shape[1]), dim=1, largest=False).values


def knn_sq_distances(
    queries: Tensor,
    reference: Tensor,
    k: int,
    exclude_self: bool = False,
    block_size: int | None = None,
) -> Tensor:
    """Squared distances from each query to its k nearest reference rows, ascending: (Nq, k).

    `exclude_self`: queries and reference are the same set and row i skips itself (by
    index, so a duplicate elsewhere in the set still counts as a neighbour).
    """
    q = _as_float(queries)
    r = _as_float(reference).to(q.device, q.dtype)
    if exclude_self and len(q) != len(r):
        raise ValueError("exclude_self needs the queries to be the reference set itself")
    available = len(r) - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} needs between 1 and {available} reference rows")
    if not len(q):
        return q.new_empty(0, k)
    block = block_size or default_block_size(q.device)
    q_sq, r_sq = q.square().sum(1), r.square().sum(1)
    blocks = _Blocks(min(block, len(q)), min(block, len(r)), q)
    out = []
    for qlo, qhi in _blocks(len(q), block):
        best: Tensor | None = None
        for rlo, rhi in _blocks(len(r), block):
            d2 = blocks.sq_dists(q[qlo:qhi], r[rlo:rhi], q_sq[qlo:qhi], r_sq[rlo:rhi])
            if exclude_self and rlo < qhi and qlo < rhi:
                same = torch.arange(max(qlo, rlo), min(qhi, rhi), device=q.device)
                d2[same - qlo, same - rlo] = math.inf
            top = _smallest(d2, k)
            best = top if best is None else _smallest(torch.cat([best, top], 1), k)
        out.append(best)
    return torch.cat(out)


def nearest_distances(
    queries: Tensor,
    reference: Tensor,
    exclude_self: bool = False,
    block_size: int | None = None,
) -> Tensor:
    """Euclidean distance from each query row to its nearest reference row: (Nq,).

    Rows are flattened, so images (N, C, H, W) work as well as (N, D) features.
    """
    return knn_sq_distances(queries, reference, 1, exclude_self, block_size)[:, 0].sqrt()


# --- precision / recall / density / coverage ---------------------------------------------


def prdc(
    real_feats: Tensor, fake_feats: Tensor, k: int = 5, block_size: int | None = None
) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020, arXiv:2002.09797).

    A real sample's radius is the distance to its k-th nearest other real sample; a fake
    one's likewise among fakes. Precision: share of fakes inside some real ball. Recall:
    share of reals inside some fake ball. Density: mean number of real balls holding a fake,
    over k. Coverage: share of real balls holding at least one fake. Comparisons are strict
    (<), as in the reference implementation. The cost is dominated by the fake-fake kNN that
    recall needs: O(M^2 D), done in blocks. All four are NaN when a side has no more than k
    samples (no k-th neighbour), as a per-class call on a rare class may.
    """
    real = _as_float(real_feats)
    fake = _as_float(fake_feats).to(real.device, real.dtype)
    if min(len(real), len(fake)) <= k:
        return dict.fromkeys(("precision", "recall", "density", "coverage"), math.nan)
    block = block_size or default_block_size(real.device)
    real_r2 = knn_sq_distances(real, real, k, exclude_self=True, block_size=block)[:, -1]
    fake_r2 = knn_sq_distances(fake, fake, k, exclude_self=True, block_size=block)[:, -1]
    real_sq, fake_sq = real.square().sum(1), fake.square().sum(1)
    blocks = _Blocks(min(block, len(fake)), min(block, len(real)), real, masks=True)

    in_real_ball = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    real_balls = torch.zeros(len(fake), dtype=torch.int64, device=real.device)
    in_fake_ball = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    nearest_fake = torch.full((len(real),), math.inf, device=real.device, dtype=real.dtype)
    for flo, fhi in _blocks(len(fake), block):
        for rlo, rhi in _blocks(len(real), block):
            d2 = blocks.sq_dists(fake[flo:fhi], real[rlo:rhi], fake_sq[flo:fhi], real_sq[rlo:rhi])
            inside = blocks.below(d2, real_r2[None, rlo:rhi])
            in_real_ball[flo:fhi] |= inside.any(1)
            real_balls[flo:fhi] += torch.count_nonzero(inside, dim=1)  # sum(1) would cast to int64
            in_fake_ball[rlo:rhi] |= blocks.below(d2, fake_r2[flo:fhi, None]).any(0)
            nearest_fake[rlo:rhi] = torch.minimum(nearest_fake[rlo:rhi], d2.amin(0))
    return {
        "precision": float(in_real_ball.float().mean()),
        "recall": float(in_fake_ball.float().mean()),
        "density": float(real_balls.double().mean() / k),
        "coverage": float((nearest_fake < real_r2).float().mean()),
    }


# --- memorisation ------------------------------------------------------------------------


def pixel_space(images: Tensor) -> Tensor:
    """Images -> (N, C*H*W) float in [0, 1]: uint8 is divided by 255, floats kept as given."""
    flat = images.flatten(1)
    return flat.float().div_(255.0) if flat.dtype == torch.uint8 else flat.float()


def near_copy_rate(
    synthetic: Tensor,
    train: Tensor,
    test: Tensor,
    percentile: float = 5.0,
    block_size: int | None = None,
) -> tuple[float, float, Tensor]:
    """Share of synthetic images closer to a training image than real unseen images usually are.

    The threshold is the `percentile`-th percentile of the distances from each real test
    image to its nearest training image: how close a genuinely new image gets by chance.
    A synthetic image whose nearest training image is closer than that is flagged a near
    copy. An independent sample from the real distribution scores about percentile/100;
    a generator replaying its training set scores about 1.

    Distances are in pixel space (uint8 images scaled to [0, 1], flattened): the literal
    question "did it reproduce a training image", which feature space, where every
    typical member of a class lies close to the others, would blur.
    Returns (rate, threshold, per-synthetic nearest-train distances).
    """
    syn_px = pixel_space(synthetic)
    train_px = pixel_space(train).to(syn_px.device)
    test_d = nearest_distances(pixel_space(test).to(syn_px.device), train_px, block_size=block_size)
    threshold = float(np.percentile(test_d.cpu().numpy(), percentile))
    syn_d = nearest_distances(syn_px, train_px, block_size=block_size)
    rate = float((syn_d < threshold).float().mean()) if len(syn_d) else math.nan
    return rate, threshold, syn_d


# --- class consistency -------------------------------------------------------------------


def class_consistency(probabilities: Tensor, intended_labels: Tensor) -> tuple[float, float]:
    """(accuracy, mean confidence) of the evaluator on the labels the generator was asked for.

    Accuracy: share whose most probable class is the intended one. Confidence: mean
    probability given to the intended class (a softer figure, sensitive to ambiguity).
    """
    intended = intended_labels.to(probabilities.device).long()
    if not len(intended):
        return math.nan, math.nan
    accuracy = (probabilities.argmax(1) == intended).float().mean()
    confidence = probabilities.gather(1, intended[:, None]).mean()
    return float(accuracy), float(confidence)
