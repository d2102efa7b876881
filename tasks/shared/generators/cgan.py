"""cgan: a conditional DCGAN-style generator against a projection discriminator.

G: z and a class embedding go through a linear layer to a small feature map (4x4; 7x7 for
28-pixel images), then nearest-upsample + 3x3 conv blocks double it up to the image size.
Class-conditional BatchNorm (a gain and bias per class) after every layer carries the
label all the way up. tanh output in [-1, 1].

D: 3x3 and strided 4x4 convs, all spectrally normalised, down to the same small map;
features h are sum-pooled and the score is linear(h) + <embed(class), h>, the projection
discriminator of Miyato & Koyama (2018). Hinge loss.

DiffAugment (Zhao et al. 2020, train.cgan.diffaug): colour, translation and cutout with
fresh random parameters per image, differentiable, applied to real and fake alike before
D, so D cannot simply memorise a small dataset and G still gets gradients through it.

G's weights are averaged (EMA, train.ema_decay); the average is what samples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from synthloop.config import TrainConfig
from tasks.shared.generators.base import Family

BETAS = (0.0, 0.9)  # the SN-GAN/BigGAN Adam setting; G and D differ only in lr (TTUR)


def pyramid(size: int) -> tuple[int, int]:
    """The smallest feature map (4 to 7 pixels) and how many doublings reach `size`:
    8 -> (4, 1), 16 -> (4, 2), 28 -> (7, 2), 32 -> (4, 3), 64 -> (4, 4)."""
    base, doublings = size, 0
    while base % 2 == 0 and base // 2 >= 4:
        base, doublings = base // 2, doublings + 1
    return base, doublings


def level_channels(width: int, levels: int) -> list[int]:
    """Channels from the smallest map up: width * 2^k, capped at 8 * width."""
    return [width * 2 ** min(levels - i, 3) for i in range(levels + 1)]


class ClassNorm(nn.Module):
    """A norm without its own affine, then a gain and bias looked up per class instead."""

    def __init__(self, norm: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = norm
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


def cond_batch_norm(channels: int, num_classes: int) -> ClassNorm:
    """cgan generator's norm: BatchNorm, with its gain and bias looked up per class."""
    return ClassNorm(nn.BatchNorm2d(channels, affine=False), channels, num_classes)


class UpsamplingDecoder(nn.Module):
    """(z, y) -> (N, channels, size, size), before any squashing of the output. [z, embed(y)]
    maps to the smallest map of `pyramid(size)`; then every level doubles the map (nearest),
    convolves, and applies a class-conditioned norm, `norm(channels, num_classes)`, and `act`.
    cgan's generator (BatchNorm, ReLU, tanh) and vae's decoder (FiLM, SiLU, logits) are it."""

    def __init__(
        self,
        z_dim: int,
        num_classes: int,
        channels: int,
        size: int,
        width: int,
        norm: Callable[[int, int], nn.Module],
        act: Callable[[torch.Tensor], torch.Tensor],
    ):
        super().__init__()
        self.base, levels = pyramid(size)
        chans = level_channels(width, levels)
        self.act = act
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, chans[0] * self.base**2)
        self.norms = nn.ModuleList(norm(c, num_classes) for c in chans)
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in pairwise(chans)
        )
        self.out = nn.Conv2d(chans[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1))
        h = self.act(self.norms[0](h.view(len(z), -1, self.base, self.base), y))
        for conv, norm in zip(self.convs, self.norms[1:], strict=True):
            h = self.act(norm(conv(F.interpolate(h, scale_factor=2.0, mode="nearest")), y))
        return self.out(h)


class Generator(UpsamplingDecoder):
    def __init__(self, z_dim: int, num_classes: int, channels: int, size: int, width: int):
        super().__init__(z_dim, num_classes, channels, size, width, cond_batch_norm, F.relu)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(z, y))


class Discriminator(nn.Module):
    def __init__(self, num_classes: int, channels: int, size: int, width: int):
        super().__init__()
        _, levels = pyramid(size)
        chans = level_channels(width, levels)[::-1]  # from the image size down
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(channels, chans[0], 3, padding=1))]
        for cin, cout in pairwise(chans):
            layers += [
                nn.LeakyReLU(0.2),
                spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)),
                nn.LeakyReLU(0.2),
                spectral_norm(nn.Conv2d(cout, cout, 3, padding=1)),
            ]
        self.features = nn.Sequential(*layers, nn.LeakyReLU(0.2))
        self.linear = spectral_norm(nn.Linear(chans[-1], 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, chans[-1]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


def diff_augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """DiffAugment's 'color,translation,cutout' policy with per-image random parameters.

    Translation shifts by up to 1/8 of the size (edge pixels repeat, so a digit's black
    background stays black); cutout zeroes a square half the size. Every op is
    differentiable in x.
    """
    n, c, h, w = x.shape
    dev = x.device

    def uniform() -> torch.Tensor:
        return torch.rand(n, 1, 1, 1, generator=rng, device=dev, dtype=x.dtype)

    # colour: brightness, saturation (RGB only), contrast
    x = x + (uniform() - 0.5)
    if c > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (uniform() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (uniform() + 0.5) + mean

    # translation: gather every pixel from a per-image shifted, clamped position
    shift = max(1, round(h / 8))
    dy, dx = torch.randint(-shift, shift + 1, (2, n, 1, 1), generator=rng, device=dev)
    rows = (torch.arange(h, device=dev).view(1, h, 1) + dy).clamp(0, h - 1)
    cols = (torch.arange(w, device=dev).view(1, 1, w) + dx).clamp(0, w - 1)
    index = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)
    x = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)

    # cutout: a (h/2 x w/2) square, centred anywhere in the image, set to 0
    ch, cw = (h + 1) // 2, (w + 1) // 2
    top = torch.randint(-(ch // 2), h - ch // 2 + 1, (n, 1, 1), generator=rng, device=dev)
    left = torch.randint(-(cw // 2), w - cw // 2 + 1, (n, 1, 1), generator=rng, device=dev)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


class CGAN(Family):
    name = "cgan"
    export_module = "G_ema"

    def __init__(
        self, cfg: TrainConfig, num_classes: int, channels: int, size: int, device: torch.device
    ) -> None:
        super().__init__(cfg, num_classes, channels, size, device)
        c = cfg.cgan
        self.G = self.place(Generator(c.z_dim, num_classes, channels, size, c.width))
        self.D = self.place(Discriminator(num_classes, channels, size, c.width))
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.modules = {"G": self.G, "D": self.D, "G_ema": self.G_ema}
        self.optimizers = {
            "G": self.adam(self.G.parameters(), cfg.lr, BETAS),
            "D": self.adam(self.D.parameters(), c.lr_d, BETAS),
        }
        self.g, self.d, self.g_ema = map(self.compiled, (self.G, self.D, self.G_ema))

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.g, self.d = self.compiled(wrap(self.G)), self.compiled(wrap(self.D))

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.rng) if self.cfg.cgan.diffaug else x

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(x)
        x = self.layout(x)
        z = torch.randn(n, self.cfg.cgan.z_dim, generator=self.rng, device=self.device)
        opt_g, opt_d = self.optimizers["G"], self.optimizers["D"]

        # D step. Real and fake go through D as one batch: D has no batch statistics, so
        # this is exact and halves the kernel launches.
        with self.autocast():
            fake = self.g(z, y)
            both = torch.cat([x, fake.detach().to(x.dtype)])
            d_real, d_fake = self.d(self.augment(both), torch.cat([y, y])).float().split(n)
            loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # G step, through the updated D; D frozen so no gradient is spent on its weights.
        self.D.requires_grad_(False)
        with self.autocast():
            loss_g = -self.d(self.augment(fake), y).float().mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        self.D.requires_grad_(True)

        self.steps += 1
        self.ema_update(self.G_ema, self.G)
        return {
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "d_real": d_real.detach().mean(),
            "d_fake": d_fake.detach().mean(),
            # ADA's overfitting heuristic r_t: near 1 when D is sure of every real training
            # image; the loop's retrain policy reads it to switch on DiffAugment.
            "d_real_sign": torch.sign(d_real.detach()).mean(),
        }

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z_dim = self.cfg.cgan.z_dim
        z = torch.randn(len(labels), z_dim, generator=generator, device=generator.device)
        with self.autocast():  # G_ema is in eval mode: BatchNorm uses running statistics
            images = self.g_ema(z.to(self.device), labels.to(self.device))
        return images.float().clamp(-1, 1)
