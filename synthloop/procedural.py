"""Small procedural image datasets for tests and benchmarks: one shape per class, drawn
at a random position, size and colour over a noisy background, so that images differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring", "bar")


def draw(shape: str, size: int, rng: np.random.Generator, channels: int = 3) -> Image.Image:
    background = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    pen = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
    cx, cy = rng.uniform(0.3, 0.7, size=2) * size
    r = rng.uniform(0.15, 0.3) * size
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(1, size // 10)
    if shape == "ellipse":
        pen.ellipse(box, fill=colour)
    elif shape == "rectangle":
        pen.rectangle(box, fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        pen.line((cx - r, cy - r, cx + r, cy + r), fill=colour, width=width)
        pen.line((cx - r, cy + r, cx + r, cy - r), fill=colour, width=width)
    elif shape == "ring":
        pen.ellipse(box, outline=colour, width=width)
    else:
        pen.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
    return image.convert("L") if channels == 1 else image


def make_image_folder(
    root: Path,
    classes: int = 3,
    per_class: int = 20,
    size: int = 16,
    seed: int = 0,
    channels: int = 3,
) -> Path:
    """Write `classes` x `per_class` PNGs as root/<shape>/<n>.png; returns root."""
    if not 2 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be between 2 and {len(SHAPES)}")
    rng = np.random.default_rng(seed)
    for shape in SHAPES[:classes]:
        folder = Path(root) / shape
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            draw(shape, size, rng, channels).save(folder / f"{n:06d}.png")
    return Path(root)
