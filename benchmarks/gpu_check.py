"""The GPU path in one short run: speed against the plain way, bf16, resume and sampling.

    python benchmarks/gpu_check.py [--device auto|cpu|cuda] [--families cgan,diffusion,...]
                                   [--steps 50] [--resume-steps 200] [--quick]

For every family in the registry (tasks/shared/generators), at 32x32 RGB (train_throughput's
"large" config; --quick: its small CPU-sized one), in one process:

  1. speed     benchmarks/train_throughput.py's fast path against the plain way (fp32,
               eager, NCHW, a PIL-decoding DataLoader): training img/s, the ratio, MFU
               against the device's bf16 peak, sampling img/s, and the peak GPU memory.
  2. bf16      the fast path with bf16 autocast off: img/s, and the fast path's gain.
  3. resume    tasks/train/stage.py's own loop on procedural data: --resume-steps straight, against
               half of them then `train.resume` to the end; the largest absolute difference
               of the exported weights (0 on CPU, where resume is bit-exact; on CUDA
               non-deterministic kernels may leave rounding-level differences).
  4. sampling  the same seed twice from the trained model: identical or not.

Each figure is printed beside its goal (cgan at least 3x the plain way, diffusion at least
35% MFU). Needs only PyTorch and the project; about five minutes on one GPU. On CPU it runs
as a smoke test of the same code (no MFU, no bf16).
Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
for path in (PROJECT, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import train_throughput as tt  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from synthloop.config import TrainConfig  # noqa: E402
from tasks.generate.stage import load_model  # noqa: E402
from tasks.shared.generators import FAMILIES  # noqa: E402
from tasks.shared.images import resolve_device  # noqa: E402
from tasks.shared.model_dir import WEIGHTS  # noqa: E402
from tasks.train.stage import run_train  # noqa: E402

GOALS = {"cgan": ("fast/plain", 3.0), "diffusion": ("MFU", 0.35)}


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bf16_off_rate(args, family: str, cfg: tt.Config, data_dir: Path, device) -> float:
    """Training img/s of the fast path with bf16 autocast off (median of the windows)."""
    data = tt.load_image_tensors(data_dir)
    images, labels = tt.place_dataset(data.images, data.labels, device, 2 * 1024**3)
    gen = torch.Generator(images.device).manual_seed(0)

    def batches() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(labels), (cfg.batch,), generator=gen, device=images.device)
        return tt.get_batch(images, labels, idx, device)

    settings = tt.train_config(args, family, cfg, True, bf16=False)
    runner = tt.Runner("fast fp32", tt.build(settings, len(data.classes), cfg, device), batches,
                       True, device, cfg.batch)  # fmt: skip
    runner.run(args.warmup)
    for _ in range(args.repeats):
        runner.window(args.steps)
    return runner.median


def resume_check(family: str, cfg: tt.Config, data_dir: Path, device, steps: int, work: Path):
    """(max |weights straight - weights resumed|, sampling identical for a seed)."""

    def train(name: str, run_steps: int, resume: bool) -> Path:
        tc = TrainConfig.model_validate(
            {
                "family": family,
                "steps": run_steps,
                "batch_size": cfg.batch,
                "device": device.type,
                "checkpoint_every": max(1, steps // 2),
                "log_every": max(1, steps // 4),
                "resume": resume,
                "eval_every": 0,  # no evaluator for 32x32 RGB here: the last weights
                family: tt.train_config(argparse.Namespace(device=device.type, compile=False),
                                        family, cfg, True).get(family, {}),
                "input": data_dir,
                "output": work / name / "model",
                "checkpoints": work / name / "checkpoints",
                "reports": work / name / "reports",
            }
        )  # fmt: skip
        run_train(tc)
        return tc.output

    straight = train("straight", steps, False)
    train("resumed", steps // 2, False)
    resumed = train("resumed", steps, True)
    a, b = load_file(straight / WEIGHTS), load_file(resumed / WEIGHTS)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    model = load_model(straight, device)
    labels = torch.arange(2 * len(model.classes)) % len(model.classes)
    with torch.no_grad():
        first = model.family.sample(labels, torch.Generator().manual_seed(7))
        second = model.family.sample(labels, torch.Generator().manual_seed(7))
    return diff, bool(torch.equal(first, second))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--steps", type=int, default=None, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resume-steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="CPU-sized config and step counts")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device = device.type
    args.steps = args.steps or (5 if args.quick else 50)
    args.warmup = 2 if args.quick else 10
    args.sample_batch, args.sample_repeats = (32 if args.quick else 256), 2
    args.workers = 4 if cuda else 0
    args.ablate = False
    resume_steps = args.resume_steps or (8 if args.quick else 200)
    cfg = next(c for c in (tt.QUICK_CONFIGS if args.quick else tt.GPU_CONFIGS) if c.name == "large")
    if args.quick:
        cfg = tt.Config(cfg.name, 16, cfg.channels, cfg.width, 8)
    peak = tt.peak_flops(device, args.peak_tflops)
    families = [f for f in args.families.split(",") if f]
    image = f"{cfg.size}x{cfg.size}x{cfg.channels}"
    print(f"device {tt.device_name(device)}; {image}, batch {cfg.batch}")
    if not cuda:
        print("no CUDA device: a smoke run of the same code (no MFU, no bf16)")

    rows = [["family", "fast img/s", "plain img/s", "fast/plain", "MFU", "fp32-fast img/s",
             "bf16 gain", "sample img/s", "peak MiB", "resume max|dw|", "same seed",
             "goal"]]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        data_dir = tt.make_dataset(Path(tmp) / "data", cfg, max(8 * cfg.batch, 512))
        for family in families:
            started = time.perf_counter()
            reset_peak(device)
            speed = tt.bench_config(args, family, cfg, data_dir, device)
            memory = peak_memory_mib(device)
            fp32 = bf16_off_rate(args, family, cfg, data_dir, device)
            work = Path(tmp) / family
            diff, same = resume_check(family, cfg, data_dir, device, resume_steps, work)
            ips = speed["images_per_second"]
            ratio = ips["fast"] / ips["baseline"]
            mfu = speed["flops_per_image"] * ips["fast"] / peak if peak else None
            goal = GOALS.get(family)
            verdict = "-"
            if goal and cuda and (goal[0] == "fast/plain" or mfu is not None):
                value = ratio if goal[0] == "fast/plain" else mfu
                verdict = f"{goal[0]} >= {goal[1]:g}: {'met' if value >= goal[1] else 'NOT met'}"
            rows.append([
                family, f"{ips['fast']:.0f}", f"{ips['baseline']:.0f}", f"{ratio:.2f}x",
                f"{mfu:.1%}" if mfu is not None else "n/a", f"{fp32:.0f}",
                f"{ips['fast'] / fp32:.2f}x" if cuda else "n/a (CPU)",
                f"{speed['sample_images_per_second']:.0f}",
                f"{memory:.0f}" if memory is not None else "n/a", f"{diff:.2e}", str(same), verdict,
            ])  # fmt: skip
            print(f"{family}: done in {time.perf_counter() - started:.0f}s", flush=True)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(tt.table(rows))


if __name__ == "__main__":
    main()
