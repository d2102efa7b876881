"""Training and sampling throughput of the generator families: fast path against a baseline.

    python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--families cgan,diffusion,vae]
        [--configs small,large] [--steps 20] [--warmup 5] [--repeats 3] [--batch-size N]
        [--sample-batch N] [--compile] [--quick] [--threads N] [--workers N] [--images N]
        [--peak-tflops T] [--ablate] [--json PATH]

For each family and config, in one process and on one device, with the same initial weights:

  fast      the family as tasks/train/stage.py builds it: TrainConfig's fast-path settings (bf16
            autocast, channels_last, fused Adam on CUDA; foreach Adam on CPU; torch.compile
            with --compile), TF32 and cuDNN autotune on CUDA, the dataset decoded once into a
            uint8 tensor (on the GPU), each batch one index op (tasks.train.stage.place_dataset /
            get_batch, with the loop's seeded index generator).
  baseline  the same networks trained the plain way: fp32, eager, NCHW (a TrainConfig with
            bf16=False, channels_last=False, compile=False; PyTorch's default TF32/cuDNN
            flags), fed by a torch.utils.data.DataLoader (shuffle, drop_last) over a Dataset
            that decodes each row's PNG bytes with PIL on every access, every epoch
            (--workers loader processes; default 0 on CPU, 4 on CUDA).

Windows of fast and baseline steps alternate (after --warmup steps each), so load from other
jobs hits both alike; a figure is the median over --repeats windows of --steps steps, the
device synchronised at both ends of a window. Neither loop fetches losses inside a window.
Reported: training images/s, the fast/baseline ratio, achieved TFLOP/s from the family's
measured flops_per_image() (a full training step: matmuls and convs, forward and backward)
and, on CUDA, MFU = flops_per_image * images/s / peak bf16 dense FLOP/s (the table below by
device name, or --peak-tflops). The baseline's MFU is against the same bf16 peak, so it is
what fp32 leaves on the table. Sampling images/s: sample() of the fast-path family on
--sample-batch labels from a seeded CPU generator (as tasks/generate/stage.py draws noise); for
diffusion that is every DDIM step, with classifier-free guidance (two passes per step).

--ablate adds two variants to locate a gap: "fast NCHW" (the fast path with
channels_last=False) and "base+tensor" (baseline networks fed from the decoded uint8 tensor
instead of the DataLoader).

Configs (the dataset is procedural: synthloop.procedural.make_image_folder written into
IMAGE_SCHEMA Parquet shards in a temporary directory, so this runs anywhere offline):

  GPU (default)   small: 16x16 RGB, width 32 (every family), batch 256
                  large: 32x32 RGB, width 128 (every family), batch 256
  --quick (CPU)   small: 16x16 RGB, width 16, batch 32
                  large: 32x32 RGB, width 32 (every family), batch 32

GPU figures (MFU, bf16, fused Adam, TF32, compile) need a CUDA device; on CPU bf16 is off by
design (Family.autocast) and MFU is not reported. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
PROJECT = HERE.parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from synthloop.config import TrainConfig  # noqa: E402
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter, content_id, iter_batches  # noqa: E402
from synthloop.procedural import make_image_folder  # noqa: E402
from tasks.shared.generators import FAMILIES, Family  # noqa: E402
from tasks.shared.generators.base import derive_seed  # noqa: E402
from tasks.shared.images import load_image_tensors, resolve_device, to_float  # noqa: E402

try:  # the training loop's own data path (tasks.train.stage also needs safetensors and tqdm)
    from tasks.train.stage import get_batch, place_dataset
except ImportError:  # pragma: no cover - the same two functions, for a bare torch box

    def place_dataset(images, labels, device, max_bytes):  # type: ignore[no-redef]
        if device.type == "cuda" and images.numel() * images.element_size() <= max_bytes:
            return images.to(device), labels.to(device)
        return images, labels

    def get_batch(images, labels, idx, device):  # type: ignore[no-redef]
        if images.device == device:
            return to_float(images[idx]), labels[idx]
        x = images[idx].pin_memory().to(device, non_blocking=True)
        return to_float(x), labels[idx].to(device, non_blocking=True)


# Peak dense bf16 tensor-core FLOP/s by device name (first match wins; SXM unless named).
PEAK_BF16 = (
    ("H200", 989e12),
    ("H200", 989e12),  # the H100 SXM's tensor cores, more and faster memory
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM; H100 NVL is ~835e12: use --peak-tflops
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)


@dataclass(frozen=True)
class Config:
    name: str
    size: int
    channels: int
    width: dict[str, int]  # per family
    batch: int
    classes: int = 6


GPU_CONFIGS = (
    Config("small", 16, 3, {"cgan": 32, "diffusion": 32, "vae": 32}, 256),
    Config("large", 32, 3, {"cgan": 128, "diffusion": 128, "vae": 128}, 256),
)
QUICK_CONFIGS = (
    Config("small", 16, 3, {"cgan": 16, "diffusion": 16, "vae": 16}, 32),
    Config("large", 32, 3, {"cgan": 32, "diffusion": 32, "vae": 32}, 32),
)


# --- dataset -----------------------------------------------------------------------------


def make_dataset(root: Path, cfg: Config, images: int, seed: int = 0) -> Path:
    """A procedural image folder encoded into IMAGE_SCHEMA Parquet shards; returns the
    dataset directory (the shape tasks.train.stage reads as train.input)."""
    per_class = -(-images // cfg.classes)
    folder = make_image_folder(
        root / "folder",
        classes=cfg.classes,
        per_class=per_class,
        size=cfg.size,
        seed=seed,
        channels=cfg.channels,
    )
    out = root / "dataset"
    with ShardWriter(out, IMAGE_SCHEMA, shard_rows=4096) as writer:
        for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in sorted(label_dir.glob("*.png")):
                data = path.read_bytes()  # already PNG at the right size and mode
                writer.append(
                    {
                        "id": content_id(data),
                        "label": label_dir.name,
                        "split": "train",
                        "source": "bench",
                        "parent_id": None,
                        "image": data,
                        "height": cfg.size,
                        "width": cfg.size,
                        "channels": cfg.channels,
                        "path": str(path.relative_to(folder)),
                    }
                )
    return out


class PngRows(Dataset):
    """The plain way: a row's PNG bytes decoded with PIL on every access."""

    def __init__(self, directory: Path, classes: list[str], channels: int) -> None:
        self.images: list[bytes] = []
        self.labels: list[int] = []
        index = {c: i for i, c in enumerate(classes)}
        for batch in iter_batches(directory, columns=["image", "label"]):
            rows = batch.to_pydict()
            self.images += rows["image"]
            self.labels += [index[label] for label in rows["label"]]
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        array = np.asarray(Image.open(io.BytesIO(self.images[i])).convert(self.mode))
        x = torch.from_numpy(array.copy()).float().div_(127.5).sub_(1.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()
        return x, self.labels[i]


def forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


# --- timing ------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_fast_flags(device: torch.device, fast: bool) -> None:
    """tasks.train.stage's TF32 + cuDNN autotune for the fast path; PyTorch defaults otherwise."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convs either way
    torch.backends.cudnn.benchmark = fast


@dataclass
class Runner:
    """One way of training: a family plus a batch source; `window(steps)` -> images/s."""

    label: str
    family: Family
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    fast_flags: bool
    device: torch.device
    batch: int
    rates: list[float] = field(default_factory=list)
    cpu_rates: list[float] = field(default_factory=list)  # images per CPU-second
    last: dict[str, torch.Tensor] = field(default_factory=dict)

    def run(self, steps: int) -> tuple[float, float]:
        """Images per wall second and per CPU second of this process over `steps` steps."""
        set_fast_flags(self.device, self.fast_flags)
        sync(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            x, y = self.next_batch()
            self.last = self.family.train_step(x, y)
        sync(self.device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return steps * self.batch / wall, steps * self.batch / max(cpu, 1e-9)

    def window(self, steps: int) -> None:
        rate, cpu_rate = self.run(steps)
        self.rates.append(rate)
        self.cpu_rates.append(cpu_rate)

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_rates) if self.cpu_rates else float("nan")


def train_config(args: argparse.Namespace, family: str, cfg: Config, fast: bool, **kw) -> dict:
    settings: dict = {"family": family, "batch_size": cfg.batch, "device": args.device}
    if family in cfg.width:  # other families keep their configured size
        settings[family] = {"width": cfg.width[family]}
    if not fast:  # the plain way; the fast path keeps TrainConfig's defaults
        settings.update(bf16=False, channels_last=False, compile=False)
    else:
        settings.update(compile=args.compile)
    settings.update(kw)
    return settings


def build(settings: dict, classes: int, cfg: Config, device: torch.device) -> Family:
    tc = TrainConfig.model_validate(settings)
    torch.manual_seed(tc.seed)  # the same initial weights for every variant
    return FAMILIES[tc.family](tc, classes, cfg.channels, cfg.size, device)


def bench_config(
    args: argparse.Namespace, family_name: str, cfg: Config, data_dir: Path, device: torch.device
) -> dict:
    data = load_image_tensors(data_dir)
    classes = data.classes
    images, labels = place_dataset(data.images, data.labels, device, 2 * 1024**3)
    n = len(labels)
    gen = torch.Generator(images.device).manual_seed(derive_seed(0, "batches"))

    def tensor_batches() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(n, (cfg.batch,), generator=gen, device=images.device)
        return get_batch(images, labels, idx, device)

    pin = device.type == "cuda"
    loader = DataLoader(
        PngRows(data_dir, classes, cfg.channels),
        batch_size=cfg.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=pin,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    stream = forever(loader)

    def loader_batches() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(stream)
        return x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)

    k = len(classes)
    fast_family = build(train_config(args, family_name, cfg, True), k, cfg, device)
    base_family = build(train_config(args, family_name, cfg, False), k, cfg, device)
    runners = [
        Runner("fast", fast_family, tensor_batches, True, device, cfg.batch),
        Runner("baseline", base_family, loader_batches, False, device, cfg.batch),
    ]
    if args.ablate:
        nchw = build(
            train_config(args, family_name, cfg, True, channels_last=False), k, cfg, device
        )
        plain = build(train_config(args, family_name, cfg, False), k, cfg, device)
        runners += [
            Runner("fast NCHW", nchw, tensor_batches, True, device, cfg.batch),
            Runner("base+tensor", plain, tensor_batches, False, device, cfg.batch),
        ]

    for r in runners:  # warm-up: compile, cuDNN autotune, allocator, loader workers
        r.run(args.warmup)
    for _ in range(args.repeats):  # alternate windows so background load hits all alike
        for r in runners:
            r.window(args.steps)

    # sampling, from the fast family's EMA weights, as generate calls it
    sample_rates = []
    sample_labels = torch.arange(args.sample_batch) % k
    for i in range(args.sample_repeats + 1):
        noise = torch.Generator().manual_seed(i)
        sync(device)
        start = time.perf_counter()
        fast_family.sample(sample_labels, noise)
        sync(device)
        if i:  # the first call is warm-up
            sample_rates.append(args.sample_batch / (time.perf_counter() - start))

    flops = fast_family.flops_per_image()
    params = sum(v for key, v in fast_family.parameter_counts().items() if "ema" not in key)
    losses = {key: round(float(v), 4) for key, v in runners[0].last.items()}
    if args.workers > 0:
        del stream, loader  # shut the persistent workers down
    return {
        "family": family_name,
        "config": cfg.name,
        "image": f"{cfg.size}x{cfg.size}x{cfg.channels}",
        "width": cfg.width.get(family_name),
        "batch": cfg.batch,
        "params": params,
        "flops_per_image": flops,
        "images_per_second": {r.label: r.median for r in runners},
        "images_per_cpu_second": {r.label: r.cpu_median for r in runners},
        "windows": {r.label: [round(v, 1) for v in r.rates] for r in runners},
        "sample_images_per_second": statistics.median(sample_rates),
        "fast_losses": losses,
    }


# --- report ------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key.lower() in name.lower()), None)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(results: list[dict], device: torch.device, peak: float | None, argv: str) -> str:
    labels = list(results[0]["images_per_second"])
    head = ["family", "config", "image", "width", "batch", "params", "GFLOP/img"]
    head += [f"{label} img/s" for label in labels] + ["fast/base", "fast TFLOP/s"]
    cpu = device.type != "cuda"
    if peak:
        head += ["fast MFU", "base MFU"]
    if cpu:  # wall time on a shared CPU counts other jobs' load; CPU time much less so
        head += ["fast img/CPU-s", "base img/CPU-s", "fast/base (CPU-s)"]
    head += ["sample img/s"]
    rows = [head]
    for r in results:
        ips = r["images_per_second"]
        f = r["flops_per_image"]
        row = [r["family"], r["config"], r["image"], str(r["width"]), str(r["batch"])]
        row += [f"{r['params'] / 1e6:.2f}M", f"{f / 1e9:.3f}"]
        row += [f"{ips[label]:.0f}" for label in labels]
        row += [f"{ips['fast'] / ips['baseline']:.2f}x", f"{f * ips['fast'] / 1e12:.3f}"]
        if peak:
            row += [f"{f * ips['fast'] / peak:.1%}", f"{f * ips['baseline'] / peak:.1%}"]
        if cpu:
            cps = r["images_per_cpu_second"]
            row += [f"{cps['fast']:.0f}", f"{cps['baseline']:.0f}"]
            row += [f"{cps['fast'] / cps['baseline']:.2f}x"]
        row += [f"{r['sample_images_per_second']:.0f}"]
        rows.append(row)
    lines = [
        "",
        f"command: {argv}",
        f"device:  {device_name(device)}; torch {torch.__version__}; {os.cpu_count()} CPU cores",
        "peak:    " + (f"{peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "n/a (MFU needs CUDA)"),
        "",
        table(rows),
        "",
        "training images/s: median of the timed windows; fast/base = fast / baseline.",
        "GFLOP/img: one training image through a full step (forward + backward, every net).",
    ]
    if cpu:
        lines.append(
            "img/CPU-s: images per CPU-second of this process (DataLoader worker processes "
            "not counted: use --workers 0 to compare), steadier than img/s on a loaded machine."
        )
    if device.type != "cuda":
        lines.append(
            "CPU run: bf16 autocast and fused Adam are CUDA-only, so the fast path here is "
            "channels_last + foreach Adam + the decoded-tensor data path. GPU figures (MFU, "
            "bf16, TF32, --compile) need a CUDA device: rerun without --quick on one."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--families", default="cgan,diffusion")
    p.add_argument("--configs", default="small,large")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="override every config's")
    p.add_argument("--sample-batch", type=int, default=None)
    p.add_argument("--sample-repeats", type=int, default=2)
    p.add_argument("--images", type=int, default=None, help="dataset size per config")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    p.add_argument("--quick", action="store_true", help="small CPU-sized configs")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=None, help="baseline DataLoader workers")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s")
    p.add_argument("--ablate", action="store_true", help="add fast-NCHW and base+tensor")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.device = device.type
    cuda = device.type == "cuda"
    args.steps = args.steps or (20 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    args.sample_batch = args.sample_batch or (32 if args.quick else 256)
    args.workers = args.workers if args.workers is not None else (4 if cuda else 0)
    configs = QUICK_CONFIGS if args.quick else GPU_CONFIGS
    wanted = args.configs.split(",")
    configs = [c for c in configs if c.name in wanted]
    if args.batch_size:
        configs = [Config(c.name, c.size, c.channels, c.width, args.batch_size) for c in configs]
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    if not cuda:
        print("note: no CUDA device in use; MFU, bf16 and fused Adam figures need one")
    peak = peak_flops(device, args.peak_tflops)

    results = []
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        for cfg in configs:
            n = args.images or max(8 * cfg.batch, 1024)
            start = time.perf_counter()
            data_dir = make_dataset(Path(tmp) / cfg.name, cfg, n)
            print(f"[{cfg.name}] dataset: {n} images in {time.perf_counter() - start:.1f}s")
            for family in families:
                start = time.perf_counter()
                result = bench_config(args, family, cfg, data_dir, device)
                results.append(result)
                ips = result["images_per_second"]
                print(
                    f"[{cfg.name}] {family}: "
                    + ", ".join(f"{k} {v:.0f} img/s {result['windows'][k]}" for k, v in ips.items())
                    + f", sample {result['sample_images_per_second']:.0f} img/s"
                    f" ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    print(report(results, device, peak, command))
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(device), "results": results}))


if __name__ == "__main__":
    main()
