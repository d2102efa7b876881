"""Validation metric timings: each metric for N synthetic against R real samples.

    python benchmarks/validate.py [--sizes 10000 100000] [--real 10000] [--repeats 3]
                                  [--device auto|cpu|cuda] [--threads N]

Each synthetic size runs in its own fresh child process, so its peak RSS (VmHWM) is its
own. Inputs are random and seeded (no dataset, no trained model needed):

  features      the evaluator CNN (untrained: same cost as trained) on N 8x8 grey images
                -> 128-d features; the step every feature metric below needs first
  fid_kid       tasks.shared.metrics.fid_kid_features: torchmetrics FID + KID (100 subsets of
                1000) through an identity extractor, on random 128-d Gaussian features
  frechet       tasks.shared.metrics.frechet_distance on the same features (per-class FID's core)
  prdc          tasks.shared.metrics.prdc, k=5, on the same features
  near_copy     tasks.shared.metrics.near_copy_rate: N synthetic vs R train 8x8 grey images
                (64-d pixel space), threshold from R/5 test images
  consistency   tasks.shared.metrics.class_consistency on N x 10 probabilities
  privacy       tasks.validate.privacy.privacy_figures: memorisation, DCR and both
                membership attacks, N synthetic vs R train and R/5 hold-out images and features, 10
                classes, 1000 bootstrap resamples

Prints the median seconds over --repeats per metric and size, and per size the peak RSS
(VmHWM) after the imports and after each metric in turn.
Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from memory import peak_rss_mib  # noqa: E402 (benchmarks/memory.py, beside this script)

FEATURE_DIM = 128
IMAGE = (1, 8, 8)  # 64 pixels: the demo digits' shape
CLASSES = 10
METRICS = ("features", "fid_kid", "frechet", "prdc", "near_copy", "consistency", "privacy")
RESULT_PREFIX = "BENCH-RESULT "


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall seconds of `repeats` calls. No untimed warm-up: at 100k one prdc call
    takes minutes on CPU, and the median already discards a slow first call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_size(synthetic: int, real: int, repeats: int, device_name: str) -> dict:
    """Time every metric for one size in this (fresh) process."""
    import torch

    from tasks.shared.evaluator import EvaluatorNet, FeatureExtractor
    from tasks.shared.images import resolve_device
    from tasks.shared.metrics import (
        class_consistency,
        extract_features,
        fid_kid_features,
        frechet_distance,
        near_copy_rate,
        pixel_space,
        prdc,
    )
    from tasks.validate.privacy import PrivacySets, privacy_figures

    device = resolve_device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    gen = torch.Generator().manual_seed(0)
    baseline = peak_rss_mib()

    real_feats = torch.randn(real, FEATURE_DIM, generator=gen).to(device)
    fake_feats = (torch.randn(synthetic, FEATURE_DIM, generator=gen) * 1.1 + 0.1).to(device)
    train_px = torch.randint(0, 256, (real, *IMAGE), dtype=torch.uint8, generator=gen)
    test_px = torch.randint(0, 256, (real // 5, *IMAGE), dtype=torch.uint8, generator=gen)
    fake_px = torch.randint(0, 256, (synthetic, *IMAGE), dtype=torch.uint8, generator=gen)
    train_px, test_px, fake_px = train_px.to(device), test_px.to(device), fake_px.to(device)
    probs = torch.rand(synthetic, CLASSES, generator=gen).softmax(1).to(device)
    intended = torch.randint(0, CLASSES, (synthetic,), generator=gen).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = EvaluatorNet(IMAGE[0], IMAGE[1], CLASSES, 32, FEATURE_DIM).to(device).eval()
    extractor = FeatureExtractor(net, IMAGE[0], IMAGE[1])
    test_feats = torch.randn(real // 5, FEATURE_DIM, generator=gen).to(device)
    train_labels = torch.randint(0, CLASSES, (real,), generator=gen).to(device)
    test_labels = torch.randint(0, CLASSES, (real // 5,), generator=gen).to(device)
    pixels = PrivacySets(
        pixel_space(train_px),
        train_labels,
        pixel_space(test_px),
        test_labels,
        pixel_space(fake_px),
        intended,
    )
    features = PrivacySets(real_feats, train_labels, test_feats, test_labels, fake_feats, intended)
    classes = [str(c) for c in range(CLASSES)]

    calls: dict[str, Callable[[], object]] = {
        "features": lambda: extract_features(fake_px, extractor, batch_size=1024),
        "fid_kid": lambda: fid_kid_features(real_feats, fake_feats),
        "frechet": lambda: frechet_distance(real_feats, fake_feats),
        "prdc": lambda: prdc(real_feats, fake_feats, k=5),
        "near_copy": lambda: near_copy_rate(fake_px, train_px, test_px),
        "consistency": lambda: class_consistency(probs, intended),
        "privacy": lambda: privacy_figures(pixels, features, classes, 1 / 3, 1000, 8, seed=0),
    }
    seconds, peak_after = {}, {}
    for name, fn in calls.items():
        seconds[name] = timed(fn, repeats, sync)
        peak_after[name] = peak_rss_mib()  # VmHWM only grows: a jump names the metric
    return {
        "synthetic": synthetic,
        "real": real,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": baseline,
        "peak_rss_after_mib": peak_after,
        "peak_gpu_mib": (
            torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        ),
    }


def child(args: argparse.Namespace, synthetic: int) -> dict:
    command = [
        sys.executable,
        str(HERE),
        "--child",
        str(synthetic),
        "--real",
        str(args.real),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"size {synthetic} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX))
    return json.loads(line.removeprefix(RESULT_PREFIX))


def print_table(results: list[dict]) -> None:
    first = results[0]
    print(
        f"real={first['real']}  device={first['device']}  threads={first['threads']}  "
        f"feature_dim={FEATURE_DIM} (random Gaussian)  pixels={IMAGE} (random uint8)"
    )
    header = f"{'metric':<12}" + "".join(f"{r['synthetic']:>14,}" for r in results)
    print(header + "   (median seconds)")
    for name in METRICS:
        print(f"{name:<12}" + "".join(f"{r['seconds'][name]:>14.3f}" for r in results))
    print("peak RSS (MiB): after imports, then after each metric (VmHWM, cumulative)")
    print(f"{'imports':<12}" + "".join(f"{r['baseline_rss_mib']:>14.0f}" for r in results))
    for name in METRICS:
        row = "".join(f"{r['peak_rss_after_mib'][name]:>14.0f}" for r in results)
        print(f"{'+' + name:<12}" + row)
    if first["peak_gpu_mib"] is not None:
        print(f"{'peak GPU MiB':<12}" + "".join(f"{r['peak_gpu_mib']:>14.0f}" for r in results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--real", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: its default")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = run_size(args.child, args.real, args.repeats, args.device)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    results = []
    for size in args.sizes:
        results.append(child(args, size))
        print(f"size {size:,} done", file=sys.stderr, flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
