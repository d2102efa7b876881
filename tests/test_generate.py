"""The generate stage: per-class counts, row provenance, the grid, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from synthloop.config import GenerateConfig, TrainConfig
from synthloop.dataset import IMAGE_SCHEMA, ShardWriter, content_id
from tasks.generate.stage import PAD, cell_size, run_generate
from tasks.shared.images import decode_rows, encode_rows
from tasks.train.stage import run_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cgan trained for a few steps on 3 classes of random 8x8 grey images."""
    root = tmp_path_factory.mktemp("generate")
    images = torch.randint(0, 256, (24, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with ShardWriter(root / "fused", IMAGE_SCHEMA) as writer:
        for i, png in enumerate(encode_rows(images.to(torch.uint8))):
            writer.append(
                {
                    "id": content_id(png),
                    "label": CLASSES[i % 3],
                    "split": "train",
                    "source": "test",
                    "image": png,
                    "height": 8,
                    "width": 8,
                    "channels": 1,
                }
            )
    cfg = TrainConfig(
        steps=4,
        batch_size=8,
        device="cpu",
        cgan={"width": 8, "z_dim": 8},
        eval_every=0,  # generate reads the weights, however they were chosen
        input=root / "fused",
        output=root / "models/generator",
        checkpoints=root / "checkpoints",
        reports=root / "reports/train",
    )
    run_train(cfg)
    return cfg.output


def gen_cfg(model: Path, root: Path, **overrides: object) -> GenerateConfig:
    values: dict = {
        "per_class": 4,
        "batch_size": 5,  # batches cross class boundaries
        "device": "cpu",
        "model": model,
        "output": root / "data/synthetic",
        "grid": root / "reports/samples.png",
        "grid_per_class": 6,
    }
    return GenerateConfig.model_validate(values | overrides)


def test_rows_per_class_with_extra_and_provenance(model: Path, tmp_path: Path) -> None:
    cfg = gen_cfg(model, tmp_path, per_class_extra={"b": 3})
    summary = run_generate(cfg)

    table = pq.read_table(cfg.output)
    assert table.schema.equals(IMAGE_SCHEMA)
    rows = table.to_pylist()
    counts = {label: sum(r["label"] == label for r in rows) for label in CLASSES}
    assert counts == {"a": 4, "b": 7, "c": 4} == summary["per_class"]
    assert summary["total"] == len(rows) == 15
    card = json.loads((model / "model_card.json").read_text())
    assert summary["model_version"] == card["model_version"]
    for row in rows:
        assert row["id"] == content_id(row["image"])
        assert (row["split"], row["source"]) == ("train", "synthetic")
        assert row["parent_id"] == f"{card['model_version']}:seed=0"
        assert (row["height"], row["width"], row["channels"]) == (8, 8, 1)
    assert decode_rows([r["image"] for r in rows], 1).shape == (15, 1, 8, 8)
    assert json.loads((tmp_path / "reports/generate.json").read_text()) == summary


def test_grid_has_one_row_per_class(model: Path, tmp_path: Path) -> None:
    cfg = gen_cfg(model, tmp_path)
    run_generate(cfg)
    cell = cell_size(8)
    assert cell == 32
    with Image.open(cfg.grid) as grid:
        width, height = grid.size
    assert height == len(CLASSES) * (cell + PAD) + PAD
    assert width > cfg.grid_per_class * (cell + PAD)  # plus the label column


def test_same_seed_same_rows_other_seed_other_rows(model: Path, tmp_path: Path) -> None:
    def ids(root: Path, seed: int) -> list[str]:
        cfg = gen_cfg(model, root, seed=seed)
        run_generate(cfg)
        return pq.read_table(cfg.output, columns=["id"]).column("id").to_pylist()

    first = ids(tmp_path / "one", 0)
    assert first == ids(tmp_path / "two", 0)
    assert set(first).isdisjoint(ids(tmp_path / "three", 1))


def test_missing_model_says_run_train(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the train stage") as err:
        run_generate(gen_cfg(tmp_path / "nowhere", tmp_path))
    assert str(tmp_path / "nowhere") in str(err.value)


def test_unknown_extra_label_is_named(model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['zebra'\]"):
        run_generate(gen_cfg(model, tmp_path, per_class_extra={"zebra": 2}))


def test_corrupt_weights_are_refused(tmp_path):
    from tasks.generate.stage import ModelCorrupt, load_model

    model_dir = tmp_path / "gen"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "weights.safetensors").write_bytes(b"not the trained weights")
    (model_dir / "model_card.json").write_text('{"model_version": "0000"}')
    with pytest.raises(ModelCorrupt, match="differs from the model card"):
        load_model(model_dir, torch.device("cpu"))
