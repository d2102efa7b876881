"""Image datasets as tensors: decode Parquet PNG rows into one uint8 (N, C, H, W) tensor and
encode tensors back into rows. Shared by augment, train and generate.

Imports only PyTorch, torchvision and the data libraries, so the GPU stages run on a machine
that has nothing of Prefect, DVC or Great Expectations.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthloop.dataset import iter_batches, shard_paths


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA device is available")
    return torch.device(name)


@dataclass
class ImageTensors:
    """A whole dataset decoded once: images (N, C, H, W) uint8, label indices (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    classes: list[str]  # label index -> label name
    sources: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def concat(a: ImageTensors, b: ImageTensors) -> ImageTensors:
    """The rows of `a` then those of `b`, which must share `a`'s classes."""
    if b.classes != a.classes:
        raise ValueError(f"classes {b.classes} differ from {a.classes}")
    return ImageTensors(
        images=torch.cat([a.images, b.images]),
        labels=torch.cat([a.labels, b.labels]),
        ids=a.ids + b.ids,
        classes=a.classes,
        sources=a.sources + b.sources,
    )


# PIL rather than torchvision.io: torchvision 0.29 deprecates its image codecs.
def decode_rows(images: list[bytes], channels: int) -> torch.Tensor:
    """PNG bytes -> (N, C, H, W) uint8."""
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(Image.open(io.BytesIO(data)).convert(mode)) for data in images]
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if channels == 1 else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def load_image_tensors(
    directory: Path, classes: list[str] | None = None, batch_rows: int = 4096
) -> ImageTensors:
    """Decode every row of a dataset once. `classes` fixes the label order (else sorted)."""
    chunks: list[torch.Tensor] = []
    labels: list[str] = []
    ids: list[str] = []
    sources: list[str] = []
    channels: int | None = None
    columns = ["id", "label", "source", "image", "channels"]
    for batch in iter_batches(directory, columns=columns, batch_rows=batch_rows):
        rows = batch.to_pydict()
        if not rows["id"]:
            continue
        channels = channels or int(rows["channels"][0])
        chunks.append(decode_rows(rows["image"], channels))
        labels += rows["label"]
        ids += rows["id"]
        sources += rows["source"]
    if not ids:
        raise ValueError(f"{directory}: the dataset is empty")
    classes = list(classes) if classes is not None else sorted(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"{directory}: labels {unknown} are not among the classes {classes}")
    return ImageTensors(
        images=torch.cat(chunks),
        labels=torch.tensor([index[label] for label in labels], dtype=torch.int64),
        ids=ids,
        classes=classes,
        sources=sources,
    )


def encode_rows(images: torch.Tensor) -> list[bytes]:
    """(N, C, H, W) uint8 on any device -> PNG bytes per image."""
    array = images.detach().to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image in array:
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def dataset_version(directory: Path) -> str:
    """A short content hash of a dataset's shards: the data version a model card records."""
    digest = hashlib.blake2b(digest_size=8)
    for path in shard_paths(directory):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the generators work in."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def model_classes(model_config: Path) -> list[str]:
    """The classes a trained model (generator or evaluator) knows, from its config.json."""
    if not model_config.is_file():
        raise FileNotFoundError(f"{model_config}: missing; run the stage that trains this model")
    return list(json.loads(model_config.read_text())["classes"])
