"""Near-duplicate precision and recall against ground truth, on procedural and real images,
the rule before the local bound against the rule now, and the ingest + clean time of each.

    python benchmarks/near_duplicates.py [--n 20000] [--workdir DIR] [--workers 0]
                                         [--kinds sparse,dense,fashion,digits] [--repeats 1]
                                         [--difference KIND=VALUE]

Four image kinds, made here with a seed (and cached under the work dir):

  sparse   procedural grey "handwritten characters": dark strokes on white, 105x105,
           cleaned at 28x28 grey. Originals come in families of FAMILY drawings of one
           character, each with its own jitter and pen width: distinct images that look
           alike (hard negatives). N/2 images.
  dense    procedural RGB "photos": a smooth colour field, fine texture and a few shapes,
           96x96, cleaned at 32x32 RGB. Families: one scene, the scene with its top shape
           moved and the scene with one shape more, twice (hard negatives). N/2 images.
  fashion  real photos: Fashion-MNIST's long-tailed draw (benchmarks/fashion_mnist.py, the
           DeepSMOTE sizes 4000 ... 40, seed 0: 9,000 distinct product photos, 28x28 grey,
           centred on black), cleaned at 28x28. Skipped where the IDX files are not installed.
  digits   real handwriting: scikit-learn's 1,797 digits (8x8, 17 grey levels), cleaned at 8.

A share COPY_SHARE of the originals gets one copy, the transforms taken in turn: JPEG
(q 70-95), WebP (q 75-95, where Pillow has it), resized (0.6-1.5x), cropped (1 to 3% of the
side a side, at least 1 px: 1-3 px at 105, 1 px at 28), brightness-shifted (8-20 of 255,
clipped), contrast-scaled (0.8-1.25x about the mean), given an alpha channel. Ground truth:
an original and its copy are one group; every original is a group of its own.

Each kind is ingested once (timed), then cleaned (validate=False: the expectations do not
depend on the rule) under each rule, in this process, old and new taking turns (--repeats
times each; the median counts):

  old  the configured rule without clean.near_duplicate_local (the rule of issue 14)
  new  the configured rule (params.yaml's clean section; --difference fashion=0.03 tries
       another near_duplicate_difference for one kind)

Both use the same dHash candidates (near_duplicate_distance). A removal (exact_duplicate or
near_duplicate) is right when the removed row and the kept row it names are one group.
Printed per kind and rule: precision (right removals / removals), recall (groups with a
copy that lost one member to the other / groups with a copy), recall per transform, the
share of distinct originals removed (an original removed for another group's image), the
wrong removals, and the times with the ratio new/old. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ["DO_NOT_TRACK"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "false"

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, features  # noqa: E402

FASHION_FILES = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FAMILY = 4  # originals per family (hard negatives of each other)
COPY_SHARE = 0.25  # originals that get one copy
TRANSFORMS = ("jpeg", "webp", "resize", "crop", "brightness", "contrast", "alpha")
KINDS = {  # kind -> (source side, clean.image_size, clean.channels)
    "sparse": (105, 28, 1),
    "dense": (96, 32, 3),
    "fashion": (28, 28, 1),
    "digits": (8, 8, 1),
}


# --- images -------------------------------------------------------------------------------


def character(rng: np.random.Generator, side: int) -> list[np.ndarray]:
    """A character: 2-4 strokes, each 3-5 points (the template its drawings jitter)."""
    return [
        rng.uniform(0.15, 0.85, size=(int(rng.integers(3, 6)), 2)) * side
        for _ in range(int(rng.integers(2, 5)))
    ]


def drawing(strokes: list[np.ndarray], rng: np.random.Generator, side: int) -> Image.Image:
    """One person's drawing of a character: points jittered, offset, own pen width."""
    image = Image.new("L", (side, side), 255)
    pen = ImageDraw.Draw(image)
    offset = rng.normal(0, 0.03 * side, size=2)
    width = int(rng.integers(2, 5))
    ink = int(rng.integers(0, 40))
    for stroke in strokes:
        points = stroke + offset + rng.normal(0, 0.035 * side, size=stroke.shape)
        pen.line([tuple(p) for p in points.tolist()], fill=ink, width=width, joint="curve")
    return image


def scene(rng: np.random.Generator, side: int) -> dict:
    """A photo's ingredients: colour field, texture, shapes (moved in variants)."""
    field = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    shapes = [
        {
            "kind": str(rng.choice(["ellipse", "rectangle"])),
            "centre": rng.uniform(0.2, 0.8, size=2) * side,
            "radius": float(rng.uniform(0.1, 0.22) * side),
            "colour": tuple(int(c) for c in rng.integers(0, 256, size=3)),
        }
        for _ in range(int(rng.integers(2, 4)))
    ]
    return {"field": field, "texture_seed": int(rng.integers(2**31)), "shapes": shapes}


def photo(parts: dict, side: int) -> Image.Image:
    base = Image.fromarray(parts["field"]).resize((side, side), Image.Resampling.BICUBIC)
    texture = np.random.default_rng(parts["texture_seed"]).normal(0, 12, size=(side, side, 3))
    pixels = np.clip(np.asarray(base, np.float32) + texture, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    for s in parts["shapes"]:
        (x, y), r = s["centre"], s["radius"]
        draw = pen.ellipse if s["kind"] == "ellipse" else pen.rectangle
        draw((x - r, y - r, x + r, y + r), fill=s["colour"])
    return image


def variant(parts: dict, rng: np.random.Generator, side: int, move: bool) -> dict:
    """The same scene with its top shape (so the change shows) moved by 15-25% of the
    side, staying inside the image, or with one more shape, black or white, whichever
    stands out. (Not recoloured: grey thumbnails, which both rules compare, cannot see a
    change of hue at equal brightness.)"""
    shapes = [dict(s) for s in parts["shapes"]]
    if move:
        top = shapes[-1]
        r = top["radius"]
        for _ in range(20):  # a direction that keeps the whole move inside the image
            angle = rng.uniform(0, 2 * np.pi)
            step = rng.uniform(0.15, 0.25) * side
            centre = top["centre"] + step * np.array([np.cos(angle), np.sin(angle)])
            if (centre >= r).all() and (centre <= side - r).all():
                break
        top["centre"] = np.clip(centre, r, side - r)
    else:
        extra = scene(rng, side)["shapes"][0]
        x, y = (int(v) for v in np.clip(extra["centre"], 0, side - 1))
        under = np.asarray(photo(parts, side).convert("L"))[y, x]
        extra["colour"] = (0, 0, 0) if under > 127 else (255, 255, 255)
        shapes.append(extra)
    return parts | {"shapes": shapes}


def copy_of(image: Image.Image, transform: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """(file bytes, extension) of a copy of `image` made by `transform`."""
    if transform == "jpeg":
        return encode(image, "JPEG", quality=int(rng.integers(70, 96))), "jpg"
    if transform == "webp":
        return encode(image, "WEBP", quality=int(rng.integers(75, 96))), "webp"
    if transform == "resize":
        side = max(8, round(image.width * rng.uniform(0.6, 1.5)))
        return encode(image.resize((side, side), Image.Resampling.BICUBIC), "PNG"), "png"
    if transform == "crop":
        most = max(1, round(0.03 * image.width))
        left, top, right, bottom = (int(v) for v in rng.integers(1, most + 1, size=4))
        box = (left, top, image.width - right, image.height - bottom)
        return encode(image.crop(box), "PNG"), "png"
    if transform == "brightness":
        shift = int(rng.integers(8, 21)) * (1 if rng.random() < 0.5 else -1)
        pixels = np.clip(np.asarray(image, np.int16) + shift, 0, 255).astype(np.uint8)
        return encode(Image.fromarray(pixels), "PNG"), "png"
    if transform == "contrast":
        pixels = np.asarray(image, np.float32)
        mean = pixels.mean(axis=(0, 1))
        scaled = (pixels - mean) * rng.uniform(0.8, 1.25) + mean
        return encode(Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8)), "PNG"), "png"
    if transform == "alpha":
        return encode(image.convert("LA" if image.mode == "L" else "RGBA"), "PNG"), "png"
    raise ValueError(f"unknown transform {transform!r}")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def transforms() -> tuple[str, ...]:
    return TRANSFORMS if features.check("webp") else tuple(t for t in TRANSFORMS if t != "webp")


def real_images(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a real kind: Fashion-MNIST's long-tailed draw, or the digits
    (0-16 grey levels scaled to 0-255)."""
    if kind == "fashion":
        import fashion_mnist

        images, labels = fashion_mnist.load("train")
        rows = fashion_mnist.long_tailed(labels)
        return images[rows], labels[rows]
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target


def make_real(folder: Path, kind: str, seed: int) -> None:
    """Every real image of `kind` as folder/<class>/<group>_<group>_original.png, and a
    copy of COPY_SHARE of them (each its own family: no two originals are one group)."""
    images, labels = real_images(kind)
    rng = np.random.default_rng(seed)
    copied = set(rng.choice(len(images), size=round(COPY_SHARE * len(images)), replace=False))
    turns = itertools.cycle(transforms())
    for group, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        transform = next(turns) if group in copied else None
        write_group(folder / f"c{label}", group, group, Image.fromarray(pixels), transform, rng)


def write_group(
    cls: Path,
    group: int,
    family: int,
    image: Image.Image,
    transform: str | None,
    rng: np.random.Generator,
) -> None:
    """An original as cls/<group>_<family>_original.png and, with a `transform`, its copy."""
    cls.mkdir(parents=True, exist_ok=True)
    (cls / f"{group:07d}_{family:07d}_original.png").write_bytes(encode(image, "PNG"))
    if transform is not None:
        data, ext = copy_of(image, transform, rng)
        (cls / f"{group:07d}_{family:07d}_{transform}.{ext}").write_bytes(data)


def make_kind(folder: Path, kind: str, n: int, seed: int) -> None:
    """n images of `kind` as folder/<class>/<group>_<family>_<transform>.<ext>."""
    if kind in ("fashion", "digits"):
        return make_real(folder, kind, seed)
    side = KINDS[kind][0]
    rng = np.random.default_rng(seed)
    originals = round(n / (1 + COPY_SHARE))
    copies = n - originals
    copied = set(rng.choice(originals, size=copies, replace=False).tolist())
    turns = itertools.cycle(transforms())
    for family in range(-(-originals // FAMILY)):
        template = character(rng, side) if kind == "sparse" else scene(rng, side)
        for member in range(FAMILY):
            group = family * FAMILY + member
            if group >= originals:
                break
            if kind == "sparse":
                image = drawing(template, rng, side)
            else:
                # One moved, the others with a shape added: two moves could nearly agree.
                parts = template if member == 0 else variant(template, rng, side, member == 1)
                image = photo(parts, side)
            transform = next(turns) if group in copied else None
            write_group(folder / f"c{family % 10}", group, family, image, transform, rng)


def ensure_images(workdir: Path, kind: str, n: int) -> tuple[Path, float]:
    base = workdir / "images" / f"{kind}-n{n}"
    folder, marker = base / "images", base / "complete.json"
    if marker.is_file():
        return folder, 0.0
    if base.exists():
        import shutil

        shutil.rmtree(base)
    start = time.perf_counter()
    make_kind(folder, kind, n, seed=0 if kind == "sparse" else 1)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"images": n}) + "\n")
    return folder, seconds


# --- running the stages --------------------------------------------------------------------


def stage_params(workdir: Path, folder: Path, kind: str, run: str, workers: int):
    """params.yaml's clean section (the new rule's settings) for this kind's run."""
    import yaml

    from synthloop.config import parse_params

    clean = yaml.safe_load((PROJECT / "params.yaml").read_text())["clean"]
    _, size, channels = KINDS[kind]
    out = workdir / "runs" / kind
    clean |= {
        "image_size": size,
        "channels": channels,
        "labels": None,
        "label_map": {},
        "min_class_count": 1,
        "workers": workers,
        "input": str(out / "ingested"),
        "output": str(out / run / "clean"),
        "quarantine": str(out / run / "quarantine.parquet"),
        "report": str(out / run / "clean.json"),
        "near_duplicate_sheet": str(out / run / "near_duplicates.png"),
        "data_docs": str(out / run / "gx"),
    }
    raw = {
        "ingest": {
            "sources": [{"kind": "image_folder", "path": str(folder), "name": kind}],
            "allowed_roots": [str(workdir / "images")],  # where ensure_images writes them
            "output": str(out / "ingested"),
            "quarantine": str(out / "ingest_quarantine.parquet"),
            "report": str(out / "ingest.json"),
        },
        "clean": clean,
    }
    return parse_params(raw, root=workdir, origin="benchmarks/near_duplicates.py")


def run_clean_timed(cfg) -> float:
    from tasks.clean import run_clean

    start = time.perf_counter()
    run_clean(cfg, validate=False)
    return time.perf_counter() - start


# --- scoring -------------------------------------------------------------------------------


def parse_name(path: str) -> tuple[int, int, str]:
    """(group, family, transform) from a file name this benchmark wrote."""
    group, family, rest = Path(path).name.split("_", 2)
    return int(group), int(family), rest.split(".")[0]


def score(params, rule: str) -> dict:
    """Precision, recall and recall per transform of one clean run's removals."""
    import pyarrow.parquet as pq

    from synthloop.dataset import read_columns

    out = Path(params.clean.output)
    kept = [read_columns(out / s, ["id", "path"]).to_pydict() for s in ("train", "val", "test")]
    path_of = {i: p for part in kept for i, p in zip(part["id"], part["path"], strict=True)}
    quarantine = pq.read_table(params.clean.quarantine).to_pylist()
    path_of |= {row["id"]: row["path"] for row in quarantine}  # a keeper may go later
    copies: dict[int, str] = {}  # group -> transform of its copy
    for path in list(path_of.values()) + [row["path"] for row in quarantine]:
        group, _, transform = parse_name(path)
        if transform != "original":
            copies[group] = transform
    removals = right = distinct_removed = 0
    originals = sum(parse_name(p)[2] == "original" for p in set(path_of.values()))
    caught: set[int] = set()
    wrong: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for row in quarantine:
        if row["reason"] not in ("exact_duplicate", "near_duplicate"):
            continue
        keeper = path_of[row["detail"].rsplit(" ", 1)[-1]]
        group, family, transform = parse_name(row["path"])
        keeper_group, keeper_family, _ = parse_name(keeper)
        removals += 1
        reasons[row["reason"]] += 1
        if group == keeper_group:
            right += 1
            caught.add(group)
        else:
            same = "same family" if family == keeper_family else "other family"
            wrong[f"{transform} ({same})"] += 1
            distinct_removed += transform == "original"
    per_transform = {}
    for transform in transforms():
        groups = [g for g, t in copies.items() if t == transform]
        per_transform[transform] = (sum(g in caught for g in groups), len(groups))
    return {
        "removals": removals,
        "reasons": dict(reasons),
        "precision": right / removals if removals else 1.0,
        "recall": len(caught) / len(copies) if copies else 1.0,
        "copies": len(copies),
        "distinct_removed": distinct_removed / originals if originals else 0.0,
        "per_transform": per_transform,
        "wrong": dict(wrong),
    }


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="images in all, half per kind")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/synthloop-bench-neardup"))
    parser.add_argument("--workers", type=int, default=0, help="clean.workers (0: per core)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated kinds to run (default: all)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="clean runs per rule, taking turns (median)"
    )
    parser.add_argument(
        "--difference",
        action="append",
        default=[],
        metavar="KIND=VALUE",
        help="the new rule's near_duplicate_difference for one kind (default: params.yaml)",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(parser, args.difference)
    if args.n < 2 * FAMILY:
        parser.error(f"--n must be at least {2 * FAMILY}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds: each must be one of {sorted(KINDS)}, got {args.kinds!r}")

    from tasks.ingest.stage import run_ingest

    totals = {"old": 0.0, "new": 0.0, "ingest": 0.0}
    for kind in kinds:
        if kind == "fashion" and not FASHION_FILES.is_file():
            print(
                f"\n== fashion: skipped ({FASHION_FILES} not found: apt-get install "
                "dataset-fashion-mnist)"
            )
            continue
        folder, made = ensure_images(args.workdir, kind, args.n // 2)
        params = stage_params(args.workdir, folder, kind, "new", args.workers)
        start = time.perf_counter()
        ingested = run_ingest(params.ingest)["ingested"]
        ingest_s = time.perf_counter() - start
        totals["ingest"] += ingest_s
        print(f"\n== {kind}: {ingested} images ingested in {ingest_s:.1f} s", end="")
        print(f" (made in {made:.1f} s)" if made else " (cached images)")
        results = {}
        configs = {}
        for rule in ("old", "new"):
            run_params = stage_params(args.workdir, folder, kind, rule, args.workers)
            cfg = run_params.clean
            if rule == "old":
                cfg = cfg.model_copy(update={"near_duplicate_local": float("inf")})
            if rule == "new" and kind in overrides:
                cfg = cfg.model_copy(update={"near_duplicate_difference": overrides[kind]})
            configs[rule] = (run_params, cfg)
        new_cfg = configs["new"][1]
        print(
            f"new rule: near_duplicate_size {new_cfg.near_duplicate_size}, "
            f"near_duplicate_difference {new_cfg.near_duplicate_difference}, "
            f"near_duplicate_contrast {new_cfg.near_duplicate_contrast}, "
            f"near_duplicate_local {new_cfg.near_duplicate_local}"
        )
        # Old and new take turns, `repeats` times each: a busy machine slows both alike.
        seconds: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeats):
            for rule, (_, cfg) in configs.items():
                seconds[rule].append(run_clean_timed(cfg))
        results = {}
        for rule, (run_params, _) in configs.items():
            median = statistics.median(seconds[rule])
            totals[rule] += median
            results[rule] = score(run_params, rule) | {"seconds": median}
        print_kind(results)
    ratio = (totals["ingest"] + totals["new"]) / (totals["ingest"] + totals["old"])
    print(
        f"\ningest + clean, {' + '.join(kinds)}: old {totals['ingest'] + totals['old']:.1f} s, "
        f"new {totals['ingest'] + totals['new']:.1f} s, ratio new/old {ratio:.3f} "
        f"(clean alone: {totals['new'] / totals['old']:.3f}); goal <= 1.10"
    )


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    overrides = {}
    for item in items:
        kind, _, value = item.partition("=")
        if kind not in KINDS:
            parser.error(f"--difference: kind must be one of {sorted(KINDS)}, got {kind!r}")
        try:
            overrides[kind] = float(value)
        except ValueError:
            parser.error(f"--difference: {value!r} is not a number (in {item!r})")
    return overrides


def print_kind(results: dict) -> None:
    names = list(results["new"]["per_transform"])
    head = f"{'rule':4} {'precision':>9} {'recall':>7} {'removed':>7} {'distinct':>8} "
    print(head + f"{'clean s':>7}  ", end="")
    print("  ".join(f"{t:>10}" for t in names))
    for rule, r in results.items():
        print(
            f"{rule:4} {r['precision']:9.4f} {r['recall']:7.4f} {r['removals']:7d} "
            f"{r['distinct_removed']:8.2%} {r['seconds']:7.2f}  ",
            end="",
        )
        print("  ".join(f"{_ratio(*r['per_transform'][t]):>10}" for t in names))
    for rule, r in results.items():
        if r["wrong"]:
            print(f"  {rule}: wrong removals by removed row's kind: {r['wrong']}")
    print("  (recall per transform: copies caught / copies; distinct: share of the originals")
    print("   removed for another image; goals: distinct <= 0.5%, recall >= 0.95)")


def _ratio(hit: int, total: int) -> str:
    return f"{hit / total:.3f}" if total else "-"


if __name__ == "__main__":
    main()
