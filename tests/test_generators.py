"""The generator families: shapes for every supported size, conditioning, export round
trip, determinism, DiffAugment, FLOPs."""

from __future__ import annotations

import pytest
import torch

from synthloop.config import ConfigError, TrainConfig
from tasks.shared.generators import FAMILIES
from tasks.shared.generators.cgan import diff_augment, pyramid
from tasks.shared.generators.diffusion import Diffusion
from tasks.shared.generators.vae import kl_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def tiny(family: str, **overrides: object) -> TrainConfig:
    values: dict = {
        "family": family,
        "device": "cpu",
        "cgan": {"width": 8, "z_dim": 8},
        "diffusion": {"width": 8, "timesteps": 50, "sample_steps": 3},
        "vae": {"width": 8, "latent_dim": 4},
        "transformer": {"n_layer": 1, "n_head": 2, "n_embd": 16},
    }
    return TrainConfig.model_validate(values | overrides)


def batch(n: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1, torch.arange(n) % 3


def test_pyramid_reaches_every_supported_size() -> None:
    assert [pyramid(s) for s in (8, 16, 28, 32, 64)] == [(4, 1), (4, 2), (7, 2), (4, 3), (4, 4)]


@pytest.mark.parametrize("family", ["cgan", "diffusion", "vae", "transformer"])
@pytest.mark.parametrize(("size", "channels"), [(8, 1), (16, 3), (28, 1), (32, 3), (64, 1)])
def test_train_step_and_sample_shapes(family: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    cfg = tiny(family)
    if family == "transformer" and channels * size * size > cfg.transformer.max_tokens:
        with pytest.raises(ConfigError, match="train.transformer.max_tokens"):
            FAMILIES[family](cfg, 3, channels, size, CPU)
        return  # refused by name; tests/test_transformer.py builds one with the cap raised
    model = FAMILIES[family](cfg, 3, channels, size, CPU)
    losses = model.train_step(*batch(4, channels, size))
    assert losses and all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    images = model.sample(torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert images.shape == (3, channels, size, size)
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("cgan", {"cgan": {"width": 8, "z_dim": 8, "diffaug": True}}),
        ("cgan", {"cgan": {"width": 8, "z_dim": 8, "diffaug": False}}),
        ("diffusion", {}),
        ("diffusion", {"diffusion": {"width": 8, "schedule": "edm", "sample_steps": 3}}),
        ("diffusion", {"diffusion": {"width": 8, "timesteps": 50, "guidance": 1.0}}),
        ("vae", {}),
        ("vae", {"vae": {"width": 8, "latent_dim": 4, "likelihood": "gaussian"}}),
        # Here the images carry no class information, so after three steps the class moves
        # near-uniform logits only slightly; a top_k cut makes that visible. Conditioning
        # learnt from class-dependent images: tests/test_transformer.py.
        ("transformer", {"transformer": {"n_layer": 1, "n_head": 2, "n_embd": 16, "top_k": 4}}),
        (
            "transformer",
            {
                "transformer": {
                    "n_layer": 1,
                    "n_head": 2,
                    "n_embd": 16,
                    "top_k": 4,
                    "temperature": 0.7,
                }
            },
        ),
    ],
)
def test_labels_condition_the_samples(family: str, options: dict) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family](tiny(family, **options), 3, 1, 8, CPU)
    for seed in range(3):  # a few steps: the diffusion output layer starts at zero
        model.train_step(*batch(6, 1, 8, seed))

    def draw(label: int) -> torch.Tensor:
        return model.sample(torch.full((4,), label), torch.Generator().manual_seed(7))

    assert torch.equal(draw(0), draw(0))  # the generator's seed alone decides the noise
    assert not torch.allclose(draw(0), draw(1))  # same noise, other class: other images


def test_eps_prediction_trains_and_samples() -> None:
    torch.manual_seed(0)
    model = Diffusion(tiny("diffusion"), 3, 1, 8, CPU, prediction="eps")
    assert torch.isfinite(model.train_step(*batch(4, 1, 8))["loss"])
    images = model.sample(torch.tensor([0, 2]), torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and images.abs().max() <= 1


@pytest.mark.parametrize("family", ["cgan", "diffusion", "vae", "transformer"])
def test_export_round_trip_samples_the_same(family: str) -> None:
    cfg = tiny(family)
    torch.manual_seed(0)
    model = FAMILIES[family](cfg, 3, 1, 8, CPU)
    for seed in range(2):
        model.train_step(*batch(6, 1, 8, seed))
    torch.manual_seed(123)  # a different init: the loaded weights must replace it
    rebuilt = FAMILIES[family].from_export(cfg, 3, 1, 8, model.export_state(), CPU)
    labels = torch.tensor([0, 1, 2, 1])
    expected = model.sample(labels, torch.Generator().manual_seed(3))
    torch.testing.assert_close(rebuilt.sample(labels, torch.Generator().manual_seed(3)), expected)


@pytest.mark.parametrize("family", ["cgan", "diffusion", "vae", "transformer"])
def test_same_seed_same_steps(family: str) -> None:
    def losses() -> list[float]:
        torch.manual_seed(0)
        model = FAMILIES[family](tiny(family), 3, 1, 8, CPU)
        return [v.item() for s in range(3) for v in model.train_step(*batch(6, 1, 8, s)).values()]

    assert losses() == losses()


def test_flops_leave_the_model_alone() -> None:
    torch.manual_seed(0)
    model = FAMILIES["cgan"](tiny("cgan"), 3, 1, 8, CPU)
    before = {k: v.clone() for k, v in model.export_state().items()}
    rng, global_rng = model.rng.get_state(), torch.get_rng_state()
    assert model.flops_per_image() > 0
    assert torch.equal(model.rng.get_state(), rng)
    assert torch.equal(torch.get_rng_state(), global_rng)
    after = model.export_state()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_diff_augment_is_seeded_differentiable_and_shape_preserving() -> None:
    x = (torch.rand(5, 3, 16, 16) * 2 - 1).requires_grad_()
    out = diff_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert torch.equal(out, diff_augment(x, torch.Generator().manual_seed(0)))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- vae ---------------------------------------------------------------------------------


def test_kl_weight_warms_up_linearly_to_beta() -> None:
    assert [kl_weight(s, 2.0, 4) for s in (1, 2, 3, 4, 5, 100)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert kl_weight(1, 0.7, 0) == 0.7  # no warm-up: beta from the first step


def test_vae_step_weights_kl_by_the_schedule() -> None:
    torch.manual_seed(0)
    model = FAMILIES["vae"](
        tiny("vae", vae={"width": 8, "latent_dim": 4, "beta": 0.5, "kl_warmup": 3}), 3, 1, 8, CPU
    )
    for step in range(1, 6):
        losses = model.train_step(*batch(6, 1, 8, step))
        assert losses["kl"] > 0
        weight = (losses["loss"] - losses["recon"]) / losses["kl"]
        assert weight.item() == pytest.approx(0.5 * min(step / 3, 1.0), rel=1e-4)


def test_vae_temperature_zero_decodes_the_prior_mean() -> None:
    torch.manual_seed(0)
    cfg = tiny("vae", vae={"width": 8, "latent_dim": 4, "temperature": 0.0})
    model = FAMILIES["vae"](cfg, 3, 1, 8, CPU)
    for seed in range(3):
        model.train_step(*batch(6, 1, 8, seed))
    labels = torch.tensor([0, 1, 2, 2])
    cold = model.sample(labels, torch.Generator().manual_seed(1))
    assert torch.equal(cold, model.sample(labels, torch.Generator().manual_seed(2)))
    with torch.no_grad():
        mean = torch.sigmoid(model.decoder_ema(torch.zeros(4, 4), labels)) * 2 - 1
    torch.testing.assert_close(cold, mean)
    model.cfg = tiny("vae", vae={"width": 8, "latent_dim": 4, "temperature": 1.0})
    warm = [model.sample(labels, torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.allclose(*warm)  # at temperature 1 the seed matters


def test_vae_exports_only_the_ema_decoder() -> None:
    torch.manual_seed(0)
    model = FAMILIES["vae"](tiny("vae"), 3, 1, 8, CPU)
    model.train_step(*batch(6, 1, 8))
    exported = model.export_state()
    assert exported.keys() == model.decoder.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in model.decoder_ema.state_dict().items())


def bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images in [-1, 1]: class 0 a horizontal bar, class 1 a vertical bar, at a random
    position, on a dark noisy background."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2 - 1
    y = torch.arange(n) % 2
    k = torch.randint(1, 7, (n,), generator=g)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, k[i], :] = 1
        else:
            x[i, 0, :, k[i]] = 1
    return x, y


def test_vae_learns_what_each_label_looks_like() -> None:
    """After a short training on bars, a class-0 sample is brighter along a row than along
    any column, a class-1 sample the other way round."""
    torch.manual_seed(0)
    vae = {"width": 8, "latent_dim": 4, "kl_warmup": 50, "temperature": 0.8, "lr": 3e-3}
    cfg = tiny("vae", vae=vae)
    model = FAMILIES["vae"](cfg, 2, 1, 8, CPU)
    for step in range(200):
        model.train_step(*bars(32, step))
    images = model.sample(torch.tensor([0] * 8 + [1] * 8), torch.Generator().manual_seed(0))
    rows = images.mean(dim=3).amax(dim=(1, 2))  # the brightest row's mean, per image
    cols = images.mean(dim=2).amax(dim=(1, 2))
    assert (rows[:8] > cols[:8]).all() and (cols[8:] > rows[8:]).all()
