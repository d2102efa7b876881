"""The evaluator stage on a tiny procedural dataset: it learns, it round-trips, it plugs into
torchmetrics; and standard FID's local-weights path."""

import json
from pathlib import Path

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from synthloop.config import parse_params
from synthloop.procedural import make_image_folder
from tasks.clean import run_clean
from tasks.evaluator.stage import run_train_evaluator
from tasks.ingest.stage import run_ingest
from tasks.shared.evaluator import (
    CONFIG,
    WEIGHTS,
    Evaluator,
    load_evaluator,
    load_splits,
    train_net,
)
from tasks.shared.metrics import fid_kid
from tasks.validate.inception import inception_fid

pytestmark = [
    pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 shape classes x 40 16x16 RGB images through the real ingest and clean stages, then
    the evaluator stage."""
    root = tmp_path_factory.mktemp("evaluator")
    make_image_folder(root / "raw", classes=3, per_class=40, size=16, seed=3)
    params = parse_params(
        {
            "ingest": {
                "sources": [{"kind": "image_folder", "path": "raw"}],
                "allowed_roots": ["raw"],
            },
            "clean": {"image_size": 16, "channels": 3, "min_class_count": 3},
            "train_evaluator": {
                "width": 16,
                "feature_dim": 32,
                "epochs": 12,
                "batch_size": 16,
                "lr": 3e-3,
            },
        },
        root=root,
    )
    run_ingest(params.ingest)
    run_clean(params.clean, validate=False)
    report = run_train_evaluator(params.train_evaluator)
    return params.train_evaluator, report


def test_trains_on_real_train_split_and_beats_chance(trained):
    cfg, report = trained
    assert report["accuracy"]["test"] >= 0.75  # chance is 1/3
    assert report["classes"] == ["ellipse", "rectangle", "triangle"]
    assert report["counts"]["train"] > report["counts"]["test"] > 0
    assert set(report["per_class_accuracy"]["test"]) == set(report["classes"])
    assert json.loads(cfg.report.read_text()) == json.loads(json.dumps(report))
    assert (cfg.output / WEIGHTS).is_file()
    meta = json.loads((cfg.output / CONFIG).read_text())
    assert (meta["classes"], meta["channels"], meta["size"]) == (report["classes"], 3, 16)
    assert meta["config"]["feature_dim"] == 32


def test_training_is_deterministic_and_round_trips(trained):
    cfg, _ = trained
    splits = load_splits(cfg.input)
    net, _ = train_net(cfg, splits, torch.device("cpu"))
    in_memory = Evaluator(net, splits.train.classes, 3, 16, batch_size=7)
    loaded = load_evaluator(cfg.output, batch_size=7)
    images = splits.test.images
    assert torch.equal(in_memory.features(images), loaded.features(images))
    assert torch.equal(in_memory.probabilities(images), loaded.probabilities(images))
    assert loaded.classes == splits.train.classes
    # Batching changes only float rounding (conv kernels pick algorithms per batch size).
    assert torch.allclose(
        load_evaluator(cfg.output, batch_size=5).features(images),
        loaded.features(images),
        atol=1e-5,
    )


def test_features_and_probabilities(trained):
    cfg, _ = trained
    ev = load_evaluator(cfg.output)
    images = load_splits(cfg.input).test.images
    feats, probs = ev.features(images), ev.probabilities(images)
    assert feats.shape == (len(images), 32) and feats.dtype == torch.float32
    assert probs.shape == (len(images), 3)
    assert torch.allclose(probs.sum(1), torch.ones(len(images)))
    with pytest.raises(ValueError, match="expected images"):
        ev.features(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def test_feature_extractor_plugs_into_torchmetrics(trained):
    cfg, _ = trained
    ev = load_evaluator(cfg.output)
    splits = load_splits(cfg.input)
    real, fake = splits.train.images, splits.test.images
    extractor = ev.feature_extractor()
    assert extractor.num_features == 32

    fid = FrechetInceptionDistance(feature=extractor)  # normalize=False: uint8 images in
    fid.train()  # the extractor must stay in eval mode (BatchNorm running statistics)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    kid = KernelInceptionDistance(feature=extractor, subset_size=len(fake))
    kid.update(real, real=True)
    kid.update(fake, real=False)

    ours = fid_kid(real, fake, extractor, kid_subset_size=len(fake))
    assert ours[0] == pytest.approx(float(fid.compute()), rel=1e-3, abs=1e-3)
    assert torch.isfinite(torch.stack(kid.compute())).all()
    # Floats in [0, 1] (torchmetrics' normalize=True convention) give the same features.
    assert torch.allclose(extractor(real.float() / 255), extractor(real), atol=1e-5)


def test_inception_fid_without_weights_is_none():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert inception_fid(images, images, None) is None


def test_inception_fid_loads_a_local_state_dict(tmp_path: Path):
    """Random weights, saved like torchvision's checkpoint: exercises loading, never a download."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    weights = tmp_path / "inception.pth"
    torch.save(model.state_dict(), weights)
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=gen)
    fid = inception_fid(real, real.flip(0), weights)  # the same set, in another order
    assert fid == pytest.approx(0.0, abs=1e-6)


def test_standard_fid_reports_the_synthetic_figure_beside_the_real_floor(tmp_path: Path):
    """What validate adds with `train_evaluator.inception_weights`: stand-in weights."""
    from torchvision.models import inception_v3

    from tasks.validate.inception import standard_fid

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=True)
    for layer in model.modules():  # BatchNorm statistics of real inputs: finite features
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 299, 299))
    weights = tmp_path / "inception.pth"
    torch.save(model.state_dict(), weights)
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=gen)
    other = torch.full((3, 1, 8, 8), 255, dtype=torch.uint8)  # far from the noise
    figures = standard_fid(train, other, train.flip(0), weights)
    assert figures["fid"] == pytest.approx(0.0, abs=1e-6)  # the same images
    assert figures["fid_real_floor"] > 1e-3 and figures["weights"] == str(weights)
