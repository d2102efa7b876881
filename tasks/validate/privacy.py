"""Privacy of synthetic data: does the generator give its training images away?

Contract. Pure functions on tensors, no IO. Every point set is an (N, D) tensor (images are
flattened; uint8 images should be scaled with `tasks.shared.metrics.pixel_space` first) with int64
class indices (N,). Three kinds of real data enter:
- train: the images the generator trained on (the members);
- hold-out: real images of the same classes it never saw (the clean val and test splits);
- synthetic: the generator's samples, labelled with their intended class.
Every random choice (subsampling, hold-out split, bootstrap) draws from a `torch.Generator`
the caller seeds, so a figure is reproducible. Nearest-neighbour searches run in blocks
(`tasks.shared.metrics.knn_sq_distances`), so memory stays bounded.

The figures:
- memorisation ratio: share of synthetic images whose nearest training image is much closer
  than the second nearest (d1/d2 < `threshold`, 1/3 by default, Meehan et al. 2020 style).
  Neighbours are searched among ALL training images, whatever the class: a copy is a copy
  whichever class it copies, and a class with 10 training images would otherwise have a far
  second neighbour and flag honest samples. The per-class figure is that same flag, shared
  out by the synthetic image's intended class (so the overall share is their weighted mean).
- DCR against a hold-out: share of synthetic images closer to a training image than to a
  hold-out image of their class. Per class, train and hold-out are subsampled to the same
  size (the smaller of the two): the nearest of more candidates is closer by chance, so
  unequal sizes would bias the share towards the larger set. About 0.5: no sign of
  overfitting; towards 1: the samples sit on the training images. Its interval resamples
  the real subsamples as well as the synthetic rows.
- membership-inference AUC: members (train) against non-members (hold-out), the same number
  of each per class. (i) distance attack: score = -distance to the nearest synthetic image;
  (ii) DOMIAS-style density ratio (van Breugel et al. 2023): score = log p_syn(x) / p_ref(x),
  Gaussian kernel densities per class in a low-dimensional projection of the features,
  with p_ref fitted on one half of the hold-out and the other half scored as non-members
  (a reference set that also supplied the non-members would make them look typical).
  0.5 is chance; every AUC comes with a seeded bootstrap 95% interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import rankdata
from torch import Tensor

from tasks.shared.metrics import knn_sq_distances, round_figure


@dataclass(frozen=True)
class PrivacySets:
    """The three point sets in one space (pixels or evaluator features), with class indices."""

    train: Tensor
    train_labels: Tensor
    holdout: Tensor
    holdout_labels: Tensor
    synthetic: Tensor
    synthetic_labels: Tensor


# --- memorisation ratio ----------------------------------------------------------------------


def nearest_two(queries: Tensor, reference: Tensor, block_size: int | None = None) -> Tensor:
    """(N, 2): distance from each query to its nearest and second-nearest reference row."""
    return knn_sq_distances(queries, reference, 2, block_size=block_size).sqrt()


def memorised(
    synthetic: Tensor, train: Tensor, threshold: float, block_size: int | None = None
) -> Tensor:
    """(N,) bool: the synthetic row's nearest training row is under `threshold` times as far
    as the second nearest. Two training rows equally close (d1 = d2) never count."""
    d = nearest_two(synthetic, train, block_size)
    return d[:, 0] < threshold * d[:, 1]


def share_per_class(flags: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Mean of `flags` per class index; None for a class without rows."""
    out: list[float | None] = []
    for c in range(num_classes):
        mine = flags[labels == c]
        out.append(float(mine.float().mean()) if len(mine) else None)
    return out


# --- DCR against a hold-out ------------------------------------------------------------------


def balanced_subsample(
    a_labels: Tensor, b_labels: Tensor, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Row indices into a and b: per class, a random min(count in a, count in b) of each."""
    a_idx, b_idx = [], []
    for c in range(num_classes):
        a_c = torch.nonzero(a_labels == c).flatten()
        b_c = torch.nonzero(b_labels == c).flatten()
        m = min(len(a_c), len(b_c))
        a_idx.append(a_c[torch.randperm(len(a_c), generator=generator)[:m]])
        b_idx.append(b_c[torch.randperm(len(b_c), generator=generator)[:m]])
    return torch.cat(a_idx), torch.cat(b_idx)


def dcr_share(
    sets: PrivacySets, num_classes: int, bootstrap: int, generator: torch.Generator
) -> dict:
    """Share of synthetic rows whose nearest class-mate in the balanced train subsample is
    closer than in the hold-out subsample (a tie counts half), with a bootstrap 95% interval
    that resamples the synthetic rows AND both subsamples: which real images happened to
    be drawn moves the share as much as the synthetic rows do (on 60 images per class,
    +-0.1 between draws of the same distribution). A class without train or hold-out rows is
    left out. Returns share, low, high, synthetic (rows counted), per_class (share, subsample).
    Holds one class's synthetic x subsample distances at a time (the bootstrap reuses them).
    """
    tr, ho = balanced_subsample(sets.train_labels, sets.holdout_labels, num_classes, generator)
    counts = torch.zeros(bootstrap, dtype=torch.float64)
    closer_sum, total = 0.0, 0
    per_class: list[tuple[float | None, int]] = []
    for c in range(num_classes):
        syn_c = sets.synthetic[sets.synthetic_labels == c]
        train_c = sets.train[tr[sets.train_labels[tr] == c]]
        hold_c = sets.holdout[ho[sets.holdout_labels[ho] == c]]
        if not len(syn_c) or not len(train_c):
            per_class.append((None, len(train_c)))
            continue
        d_train, d_hold = torch.cdist(syn_c, train_c), torch.cdist(syn_c, hold_c)
        closer = _closer(d_train.amin(1), d_hold.amin(1))
        per_class.append((float(closer.mean()), len(train_c)))
        closer_sum += float(closer.sum())
        total += len(syn_c)
        counts += _bootstrap_counts(d_train, d_hold, bootstrap, generator)
    if not total:
        return {"share": None, "low": None, "high": None, "synthetic": 0, "per_class": per_class}
    share = closer_sum / total
    replicates = counts / total
    q_low, q_high = torch.quantile(replicates, torch.tensor([0.025, 0.975], dtype=counts.dtype))
    # Re-centred on the estimate: a resampled train set misses about a third of its rows, so
    # a copy's source is often absent and the replicates sit below the estimate (for a
    # copying generator the plain percentiles would not even bracket it). The spread is the
    # bootstrap's; the shift is that artefact, not a bias of the estimate.
    shift = float(replicates.mean()) - share
    return {
        "share": share,
        "low": float(q_low) - shift,
        "high": float(q_high) - shift,
        "synthetic": total,
        "per_class": per_class,
    }


def _closer(d_train: Tensor, d_hold: Tensor) -> Tensor:
    return (d_train < d_hold).double() + 0.5 * (d_train == d_hold).double()


def _bootstrap_counts(
    d_train: Tensor, d_hold: Tensor, bootstrap: int, generator: torch.Generator
) -> Tensor:
    """(bootstrap,) sums of the closer-to-train flags, rows and both column sets resampled;
    in chunks of replicates that keep the gathered flags near 2**24 numbers."""
    rows = len(d_train)
    train, hold = _SortedRows(d_train), _SortedRows(d_hold)
    step = max(1, 2**24 // max(rows * _SortedRows.TOP, 1))
    out = []
    for lo in range(0, bootstrap, step):
        b = min(step, bootstrap - lo)
        # Columns first, for every row, then rows.
        near_train = train.resampled_min(b, generator)
        near_hold = hold.resampled_min(b, generator)
        r = torch.randint(rows, (b, rows), generator=generator)
        out.append(_closer(near_train.gather(1, r), near_hold.gather(1, r)).sum(1))
    return torch.cat(out)


class _SortedRows:
    """Each row's distances in ascending order, for minima over resampled columns.

    A with-replacement draw of m columns holds a given column with probability about 0.63,
    so a row's minimum over the draw is almost always among its TOP nearest columns (all
    TOP missing: 0.37**16, about 1e-7): looking there first makes a replicate O(rows * TOP)
    instead of O(rows * m). The rare row without a drawn column there is computed in full,
    so the result is exact.
    """

    TOP = 16

    def __init__(self, d: Tensor) -> None:
        self.d = d
        k = min(self.TOP, d.shape[1])
        self.values, self.order = d.topk(k, dim=1, largest=False)  # ascending

    def resampled_min(self, replicates: int, generator: torch.Generator) -> Tensor:
        """(replicates, rows): each row's minimum over a with-replacement draw of columns."""
        rows, m = self.d.shape
        cols = torch.randint(m, (replicates, m), generator=generator)
        if m <= 4 * self.TOP:  # few columns: one contiguous gather is faster
            return self.d.index_select(1, cols.flatten()).view(rows, replicates, m).amin(2).T
        drawn = torch.zeros(replicates, m, dtype=torch.bool).scatter_(1, cols, True)
        near = drawn[:, self.order]  # (replicates, rows, k): is the j-th nearest drawn?
        first = near.byte().argmax(2, keepdim=True)  # the first drawn one (argmax: first max)
        out = self.values.expand(replicates, -1, -1).gather(2, first)[..., 0]
        missed = torch.nonzero(~near.any(2))
        if len(missed):
            b, r = missed[:, 0], missed[:, 1]
            out[b, r] = self.d[r].masked_fill(~drawn[b], math.inf).amin(1)
        return out


# --- membership inference --------------------------------------------------------------------


def auc(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """P(member score > non-member score), ties counting half (Mann-Whitney U / n_m n_n)."""
    return float(_auc_rows(member_scores[None], nonmember_scores[None])[0])


def _auc_rows(members: Tensor, nonmembers: Tensor) -> Tensor:
    """AUC of each row pair: members (B, n_m), non-members (B, n_n) -> (B,)."""
    n_m, n_n = members.shape[1], nonmembers.shape[1]
    both = torch.cat([members, nonmembers], 1).double().numpy()
    ranks = torch.from_numpy(rankdata(both, axis=1))  # ties get their average rank
    u = ranks[:, :n_m].sum(1) - n_m * (n_m + 1) / 2
    return u / (n_m * n_n)


def auc_interval(
    member_scores: Tensor, nonmember_scores: Tensor, bootstrap: int, generator: torch.Generator
) -> dict:
    """AUC and its bootstrap 95% percentile interval, members and non-members resampled
    separately (their numbers are fixed by design)."""
    if not len(member_scores) or not len(nonmember_scores):
        return {"auc": None, "low": None, "high": None}
    n_m, n_n = len(member_scores), len(nonmember_scores)
    m = torch.randint(n_m, (bootstrap, n_m), generator=generator)
    n = torch.randint(n_n, (bootstrap, n_n), generator=generator)
    aucs = _auc_rows(member_scores[m], nonmember_scores[n])
    low, high = torch.quantile(aucs, torch.tensor([0.025, 0.975], dtype=aucs.dtype))
    return {
        "auc": round_figure(auc(member_scores, nonmember_scores)),
        "low": round_figure(float(low)),
        "high": round_figure(float(high)),
    }


def split_holdout(
    labels: Tensor, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Per class, a random half of the hold-out rows (the non-members to score) and the rest
    (the reference for the density attack); an odd row goes to the non-members."""
    scored, reference = [], []
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        half = (len(rows) + 1) // 2
        scored.append(rows[:half])
        reference.append(rows[half:])
    return torch.cat(scored), torch.cat(reference)


def distance_attack(candidates: Tensor, synthetic: Tensor) -> Tensor:
    """Score = -distance to the nearest synthetic row: members of a copying generator score high."""
    return -knn_sq_distances(candidates, synthetic, 1)[:, 0].sqrt()


def projection(basis_from: Tensor, dims: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, components (D, d), scales (d,)): principal axes of `basis_from`, scaled to unit
    variance. Kernel densities in 100+ dimensions from a few hundred points are noise."""
    x = basis_from.double()
    mean = x.mean(0)
    _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    d = max(1, min(dims, len(s)))
    scales = (s[:d] / math.sqrt(max(len(x) - 1, 1))).clamp_min(1e-12)
    return mean, v[:d].T, scales


def log_kde(points: Tensor, data: Tensor) -> Tensor:
    """Log density (up to a constant shared by every call in the same dimension) of a
    Gaussian kernel density on `data` with a diagonal bandwidth: Scott's rule
    n^(-1/(d+4)) times each dimension's spread in `data` (as scipy's gaussian_kde, without
    the off-diagonal terms a few dozen points per class cannot estimate)."""
    n, d = data.shape
    spread = data.std(0) if n > 1 else torch.ones(d, dtype=data.dtype)
    h = spread.clamp_min(1e-6) * n ** (-1.0 / (d + 4))
    d2 = torch.cdist(points / h, data / h).square()
    return torch.logsumexp(-d2 / 2, 1) - math.log(n) - h.log().sum()


def domias_attack(
    candidates: Tensor,
    candidate_labels: Tensor,
    sets: PrivacySets,
    reference: Tensor,
    reference_labels: Tensor,
    num_classes: int,
    dims: int,
) -> Tensor:
    """Score = log p_syn(x | class) - log p_ref(x | class): a generator that overfits puts
    more density on its members than the real distribution (the reference) does. NaN for a
    candidate whose class has no synthetic or reference rows."""
    mean, comps, scales = projection(sets.synthetic, dims)

    def proj(x: Tensor) -> Tensor:
        return ((x.double() - mean) @ comps) / scales

    out = torch.full((len(candidates),), math.nan, dtype=torch.float64)
    for c in range(num_classes):
        rows = torch.nonzero(candidate_labels == c).flatten()
        syn_c = proj(sets.synthetic[sets.synthetic_labels == c])
        ref_c = proj(reference[reference_labels == c])
        if not len(rows) or not len(syn_c) or not len(ref_c):
            continue
        x = proj(candidates[rows])
        out[rows] = log_kde(x, syn_c) - log_kde(x, ref_c)
    return out


@dataclass(frozen=True)
class Membership:
    """Who is scored: members (train rows) and non-members and the density reference (hold-out
    rows), the same number of members and non-members per class."""

    members: Tensor
    nonmembers: Tensor
    reference: Tensor


def membership_split(sets: PrivacySets, num_classes: int, generator: torch.Generator) -> Membership:
    scored, reference = split_holdout(sets.holdout_labels, num_classes, generator)
    m, n = balanced_subsample(
        sets.train_labels, sets.holdout_labels[scored], num_classes, generator
    )
    return Membership(members=m, nonmembers=scored[n], reference=reference)


def membership_aucs(
    pixels: PrivacySets,
    features: PrivacySets,
    num_classes: int,
    bootstrap: int,
    dims: int,
    generator: torch.Generator,
) -> dict:
    """Both attacks on the same members and non-members: the distance attack in pixel space
    (the literal copy), the density attack in evaluator feature space."""
    who = membership_split(pixels, num_classes, generator)
    dist = distance_attack(
        torch.cat([pixels.train[who.members], pixels.holdout[who.nonmembers]]), pixels.synthetic
    )
    labels = torch.cat(
        [features.train_labels[who.members], features.holdout_labels[who.nonmembers]]
    )
    density = domias_attack(
        torch.cat([features.train[who.members], features.holdout[who.nonmembers]]),
        labels,
        features,
        features.holdout[who.reference],
        features.holdout_labels[who.reference],
        num_classes,
        dims,
    )
    n_m = len(who.members)
    member = torch.zeros(len(labels), dtype=torch.bool)
    member[:n_m] = True
    scored = ~torch.isnan(density)  # a class without synthetic or reference rows is not scored
    attacks = {
        "distance": auc_interval(dist[:n_m], dist[n_m:], bootstrap, generator),
        "density": auc_interval(
            density[member & scored], density[~member & scored], bootstrap, generator
        ),
    }
    worst = max(attacks, key=lambda k: attacks[k]["high"] if attacks[k]["high"] is not None else -1)
    return {
        **attacks,
        "worst": worst,
        "members": n_m,
        "nonmembers": len(who.nonmembers),
        "reference": len(who.reference),
        "density_dims": min(dims, features.synthetic.shape[1]),
    }


# --- everything -----------------------------------------------------------------------------


def _memorisation_figures(
    sets: PrivacySets, classes: list[str], threshold: float
) -> tuple[Tensor, dict]:
    flags = memorised(sets.synthetic, sets.train, threshold)
    per_class = share_per_class(flags, sets.synthetic_labels, len(classes))
    return flags, {
        "ratio": round_figure(float(flags.float().mean())) if len(flags) else None,
        "per_class": {label: round_figure(v) for label, v in zip(classes, per_class, strict=True)},
    }


def _dcr_figures(
    sets: PrivacySets, classes: list[str], bootstrap: int, generator: torch.Generator
) -> dict:
    found = dcr_share(sets, len(classes), bootstrap, generator)
    return {
        "share": round_figure(found["share"]),
        "low": round_figure(found["low"]),
        "high": round_figure(found["high"]),
        "synthetic": found["synthetic"],
        "per_class": {
            label: {"share": round_figure(share), "subsample": n}
            for label, (share, n) in zip(classes, found["per_class"], strict=True)
        },
    }


def privacy_figures(
    pixels: PrivacySets,
    features: PrivacySets,
    classes: list[str],
    threshold: float,
    bootstrap: int,
    dims: int,
    seed: int,
) -> tuple[Tensor, dict]:
    """(memorised mask per synthetic row, figures). The mask is the pixel-space flag: the
    literal "this sample reproduces one training image", which is what rejection removes;
    feature space, where every typical member of a class lies close to others, is reported
    and gated but removes nothing on its own."""
    generator = torch.Generator().manual_seed(seed)
    mask, pixel_mem = _memorisation_figures(pixels, classes, threshold)
    _, feature_mem = _memorisation_figures(features, classes, threshold)
    figures = {
        "sizes": {
            "train": len(pixels.train),
            "holdout": len(pixels.holdout),
            "synthetic": len(pixels.synthetic),
        },
        "memorisation": {
            "threshold": threshold,
            "pixels": pixel_mem,
            "features": feature_mem,
            "ratio": _max_figure(pixel_mem["ratio"], feature_mem["ratio"]),
        },
        "dcr": {
            "pixels": _dcr_figures(pixels, classes, bootstrap, generator),
            "features": _dcr_figures(features, classes, bootstrap, generator),
        },
        "membership": membership_aucs(pixels, features, len(classes), bootstrap, dims, generator),
        "bootstrap": bootstrap,
        "seed": seed,
    }
    return mask, figures


def _max_figure(a: float | None, b: float | None) -> float | None:
    known = [v for v in (a, b) if v is not None]
    return max(known) if known else None


def membership_auc_high(figures: dict) -> float | None:
    """The gate's value: the upper 95% bound of the stronger attack's AUC (None: not
    measured)."""
    membership = figures.get("membership") or {}
    return (membership.get(membership.get("worst", "")) or {}).get("high")
