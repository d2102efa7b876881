"""The transformer family: KV-cache decoding, tokens, sampling controls, its random stream
and its size cap. (Shapes, conditioning, export and resume: test_generators, test_train.)"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from synthloop.config import ConfigError, TrainConfig
from tasks.shared.generators.transformer import KVCache, Transformer, dequantise, pick, quantise
from tasks.shared.images import to_float, to_uint8

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def tiny(**transformer: object) -> TrainConfig:
    settings = {"n_layer": 2, "n_head": 2, "n_embd": 16} | transformer
    return TrainConfig.model_validate(
        {"family": "transformer", "device": "cpu", "transformer": settings}
    )


def trained(cfg: TrainConfig, channels: int = 1, size: int = 4, steps: int = 3) -> Transformer:
    """A model a few steps away from its initial weights, so the EMA copy differs from it."""
    torch.manual_seed(0)
    model = Transformer(cfg, 3, channels, size, CPU)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(6, channels, size, size, generator=g) * 2 - 1
        model.train_step(x, torch.arange(6) % 3)
    return model


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 4)])
def test_kv_cache_steps_give_the_full_forward_logits(channels: int, size: int) -> None:
    model = trained(tiny(), channels, size)
    gpt = model.gpt_ema
    n, length = 5, channels * size * size
    y = torch.tensor([0, 1, 2, 0, 1])
    tokens = torch.randint(0, 16, (n, length), generator=torch.Generator().manual_seed(2))
    full = gpt(y, tokens[:, :-1])
    assert full.shape == (n, length, 16)

    cache = KVCache(len(gpt.blocks), length)
    for i in range(length):
        step = gpt.step(y, tokens[:, i - 1] if i else None, cache)
        torch.testing.assert_close(step, full[:, i], rtol=0, atol=1e-5, msg=f"position {i}")
    assert cache.length == length


def test_samples_follow_the_class_they_were_trained_on() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny(lr=3e-3), 3, 1, 4, CPU)
    # class 0 all black, class 1 all white, class 2 all mid-grey
    y = torch.arange(6) % 3
    x = torch.tensor([-1.0, 1.0, 0.0])[y].view(6, 1, 1, 1).expand(6, 1, 4, 4)
    for _ in range(120):
        model.train_step(x, y)
    labels = torch.arange(3).repeat_interleave(8)
    images = model.sample(labels, torch.Generator().manual_seed(0))
    means = [float(images[labels == c].mean()) for c in range(3)]
    assert means[0] < -0.5 and means[1] > 0.5 and -0.5 < means[2] < 0.5, means


def test_quantise_dequantise_round_trip() -> None:
    for levels in (2, 16, 256):
        tokens = torch.randint(
            0, levels, (4, 3 * 5 * 5), generator=torch.Generator().manual_seed(0)
        )
        images = dequantise(tokens, 3, 5, levels)
        assert images.shape == (4, 3, 5, 5) and images.min() >= -1 and images.max() <= 1
        assert torch.equal(quantise(images, levels), tokens)

    pixels = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    x = to_float(pixels)
    back = dequantise(quantise(x, 16), 1, 8, 16)
    assert (back - x).abs().max() <= 1 / 15 + 1e-6  # half a step of 2 / (levels - 1)
    assert back.view(-1)[0] == -1 and back.view(-1)[-1] == 1  # black and white exactly
    # 256 levels: lossless, back to the same uint8 pixels
    assert torch.equal(to_uint8(dequantise(quantise(x, 256), 1, 8, 256)), pixels)


def test_channels_are_interleaved_in_raster_order() -> None:
    x = -torch.ones(1, 3, 2, 2)
    x[0, 2, 0, 1] = 1.0  # the blue channel of row 0, column 1
    tokens = quantise(x, 4)
    assert tokens.shape == (1, 12)
    assert tokens[0].nonzero().flatten().tolist() == [(0 * 2 + 1) * 3 + 2]


def test_greedy_sampling_is_deterministic_and_follows_the_full_forward() -> None:
    model = trained(tiny(top_k=1))
    labels = torch.tensor([0, 1, 2, 2])
    tokens = model.sample_tokens(labels, torch.Generator().manual_seed(0))
    other_noise = model.sample_tokens(labels, torch.Generator().manual_seed(99))
    assert torch.equal(tokens, other_noise)  # top_k=1 ignores the noise
    # every greedy token is the argmax of the full forward pass over the tokens before it
    logits = model.gpt_ema(labels, tokens[:, :-1])
    assert torch.equal(logits.argmax(-1), tokens)


def test_temperature_sharpens_and_flattens_the_samples() -> None:
    cfg = tiny(temperature=1.0, top_k=0, lr=3e-3)
    torch.manual_seed(0)
    model = Transformer(cfg, 3, 1, 4, CPU)
    black = -torch.ones(8, 1, 4, 4)  # every token is level 0: the model learns the mode
    for _ in range(25):
        model.train_step(black, torch.arange(8) % 3)
    labels = torch.arange(30) % 3

    def off_mode(**sampling: object) -> float:
        model.cfg = cfg.model_copy(
            update={"transformer": cfg.transformer.model_copy(update=sampling)}
        )
        tokens = model.sample_tokens(labels, torch.Generator().manual_seed(0))
        return float((tokens != 0).float().mean())

    cold, warm, hot = off_mode(temperature=0.05), off_mode(), off_mode(temperature=50.0)
    assert cold == 0.0 == off_mode(top_k=1)  # near zero temperature is greedy
    # the EMA weights still lag here (about half the mass on the mode at temperature 1); a
    # flat distribution over 16 levels puts 15/16 off the mode
    assert 0.0 < warm < 0.6 and hot > 0.85


def test_pick_keeps_only_the_top_k_levels() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    uniform = torch.rand(200, generator=torch.Generator().manual_seed(0))
    assert set(pick(logits, uniform, 1.0, 2).tolist()) == {1, 3}
    assert set(pick(logits, uniform, 1.0, 0).tolist()) == {0, 1, 2, 3}
    assert set(pick(logits, uniform, 1.0, 1).tolist()) == {1}


def test_dropout_draws_from_the_family_stream_only() -> None:
    def run(p: float) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = Transformer(tiny(dropout=p), 3, 1, 4, CPU)
        global_state = torch.get_rng_state()
        g = torch.Generator().manual_seed(1)
        losses = [
            model.train_step(torch.rand(6, 1, 4, 4, generator=g) * 2 - 1, torch.arange(6) % 3)[
                "loss"
            ].item()
            for _ in range(3)
        ]
        assert torch.equal(torch.get_rng_state(), global_state)  # nothing from the global stream
        return losses, model.rng.get_state()

    with_dropout, rng_state = run(0.3)
    again, again_state = run(0.3)
    assert again == with_dropout and torch.equal(again_state, rng_state)  # seeded: repeatable
    without, untouched = run(0.0)
    assert with_dropout != without  # the masks change the losses
    assert not torch.equal(rng_state, untouched)  # and come from the family's rng


def test_sequences_over_the_cap_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"max_tokens.*3072 tokens.*max_tokens=1024"):
        Transformer(tiny(), 10, 3, 32, CPU)
    model = Transformer(tiny(max_tokens=3072), 10, 3, 32, CPU)  # the cap raised: it builds
    assert model.gpt.pos.num_embeddings == 3072
    with pytest.raises(ValidationError, match="multiple of n_head"):
        tiny(n_embd=18, n_head=4)


def test_flops_per_image_counts_the_step() -> None:
    small, wide = Transformer(tiny(), 3, 1, 4, CPU), Transformer(tiny(n_embd=32), 3, 1, 4, CPU)
    assert 0 < small.flops_per_image() < wide.flops_per_image()
