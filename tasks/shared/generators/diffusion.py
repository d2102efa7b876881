"""diffusion: a small class-conditional UNet trained to denoise, sampled with DDIM.

Two noise parametrisations (train.diffusion.schedule):
  cosine  discrete timesteps t < T (train.diffusion.timesteps) on the cosine alpha-bar
          schedule (Nichol & Dhariwal 2021). The net predicts v = sqrt(ab) eps -
          sqrt(1 - ab) x0 (or eps), MSE loss. Sampling: DDIM (eta = 0) on sample_steps
          evenly spaced timesteps, x0 clipped to [-1, 1].
  edm     continuous noise levels sigma, log-normal while training, with the EDM
          preconditioning and loss weight (Karras et al. 2022). Sampling: Euler steps of
          the probability-flow ODE on the Karras sigma grid, which is DDIM in sigma terms.

Classifier-free guidance (Ho & Salimans 2022): the class embedding has one extra row, the
null class; training drops a label to it with probability p_uncond; sampling mixes the two
predictions as  uncond + guidance * (cond - uncond)  (1: plain conditional, 0: unconditional).

UNet: 3x3 conv stem; per resolution one residual block (GroupNorm, SiLU, conv; the time +
class embedding enters as a per-channel scale and shift) and a strided-conv downsample;
a middle block with self-attention; the mirror path up with skip connections. The weights
are averaged (EMA) and the average is what samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from synthloop.config import TrainConfig
from tasks.shared.generators.base import Family

BETAS = (0.9, 0.999)
COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal's alpha-bar; keeps the first betas non-zero
EDM_SIGMA_DATA = 0.5  # the std of images in [-1, 1], roughly
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # log-normal training noise levels
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0  # the sampling grid


def groups(channels: int) -> int:
    return math.gcd(channels, 8)  # GroupNorm needs a group count that divides the channels


def unet_levels(size: int) -> int:
    """How many times to halve: down to a 4-7 pixel map, at most three times."""
    levels = 0
    while size % 2 == 0 and size // 2 >= 4 and levels < 3:
        size, levels = size // 2, levels + 1
    return levels


def sinusoidal(level: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of a noise label (a timestep on a 0-1000 scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=level.device) / half)
    angles = level.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Attention(nn.Module):
    """Single-head self-attention over the pixels of the smallest feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, 1, c, h * w).transpose(-1, -2)
        out = F.scaled_dot_product_attention(*qkv.unbind(1))  # (n, 1, h*w, c)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, size: int, width: int) -> None:
        super().__init__()
        self.levels = unet_levels(size)
        chans = [width * m for m in (1, 2, 2, 2)[: self.levels + 1]]
        emb_dim = 4 * width
        self.freq_dim = 2 * max(8, width // 2)
        self.time = nn.Sequential(
            nn.Linear(self.freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.classes = nn.Embedding(num_classes + 1, emb_dim)  # the last row: the null class
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cin = width
        for i, c in enumerate(chans):
            self.down.append(ResBlock(cin, c, emb_dim))
            if i < self.levels:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            cin = c
        self.mid1 = ResBlock(cin, cin, emb_dim)
        self.attn = Attention(cin)
        self.mid2 = ResBlock(cin, cin, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chans))):
            self.up.append(ResBlock(cin + chans[i], chans[i], emb_dim))
            cin = chans[i]
            if i > 0:
                self.upsample.append(nn.Conv2d(cin, cin, 3, padding=1))
        self.out_norm = nn.GroupNorm(groups(cin), cin)
        self.out = nn.Conv2d(cin, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, level: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time(sinusoidal(level, self.freq_dim)) + self.classes(y)
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < self.levels:
                h = self.downsample[i](h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < self.levels:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


def cosine_alphas_cumprod(timesteps: int) -> torch.Tensor:
    """alpha-bar_t for t = 1..T (index t - 1), betas capped at 0.999 (improved DDPM)."""

    def f(t: float) -> float:
        return math.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / timesteps) / f(i / timesteps), 0.999) for i in range(timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0).float()


def karras_sigmas(steps: int) -> list[float]:
    """EDM's sampling grid: sigma_max down to sigma_min, denser at low noise; then 0."""
    lo, hi = EDM_SIGMA_MIN ** (1 / EDM_RHO), EDM_SIGMA_MAX ** (1 / EDM_RHO)
    ramp = [i / max(steps - 1, 1) for i in range(steps)]
    return [(hi + r * (lo - hi)) ** EDM_RHO for r in ramp] + [0.0]


class Diffusion(Family):
    name = "diffusion"
    export_module = "unet_ema"

    def __init__(
        self,
        cfg: TrainConfig,
        num_classes: int,
        channels: int,
        size: int,
        device: torch.device,
        prediction: Literal["v", "eps"] = "v",
    ) -> None:
        super().__init__(cfg, num_classes, channels, size, device)
        self.prediction = prediction  # v: well-conditioned at every noise level with cosine
        self.null = num_classes
        d = cfg.diffusion
        self.unet = self.place(UNet(channels, num_classes, size, d.width))
        self.unet_ema = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.modules = {"unet": self.unet, "unet_ema": self.unet_ema}
        self.optimizers = {"unet": self.adam(self.unet.parameters(), cfg.lr, BETAS)}
        self.net, self.net_ema = self.compiled(self.unet), self.compiled(self.unet_ema)
        self.alphas_cumprod = cosine_alphas_cumprod(d.timesteps).to(self.device)

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.net = self.compiled(wrap(self.unet))

    # --- the two parametrisations: the network's input scaling and its noise label -------

    def edm_denoise(
        self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise): unit-variance input and target
        for the network at every noise level."""
        s = sigma.view(-1, 1, 1, 1)
        var = s**2 + EDM_SIGMA_DATA**2
        c_skip, c_out = EDM_SIGMA_DATA**2 / var, s * EDM_SIGMA_DATA / var.sqrt()
        # c_noise = ln(sigma) / 4, times 1000 to span the embedding's frequencies like t does
        out = net(x / var.sqrt(), 250 * sigma.log(), y).float()
        return c_skip * x + c_out * out

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        n, d = len(x), self.cfg.diffusion
        x = self.layout(x)
        dev, rng = self.device, self.rng
        # classifier-free guidance: some labels become the null class
        drop = torch.rand(n, generator=rng, device=dev) < d.p_uncond
        y = torch.where(drop, torch.full_like(y, self.null), y)
        noise = torch.randn(x.shape, generator=rng, device=dev)

        if d.schedule == "edm":
            sigma = (torch.randn(n, generator=rng, device=dev) * EDM_P_STD + EDM_P_MEAN).exp()
            with self.autocast():
                denoised = self.edm_denoise(self.net, x + sigma.view(-1, 1, 1, 1) * noise, sigma, y)
            weight = (sigma**2 + EDM_SIGMA_DATA**2) / (sigma * EDM_SIGMA_DATA) ** 2
            loss = (weight.view(-1, 1, 1, 1) * (denoised - x) ** 2).mean()
        else:
            t = torch.randint(0, d.timesteps, (n,), generator=rng, device=dev)
            ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = ab.sqrt() * x + (1 - ab).sqrt() * noise
            target = noise if self.prediction == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x
            with self.autocast():
                out = self.net(x_t, t * (1000 / d.timesteps), y)
            loss = F.mse_loss(out.float(), target)

        opt = self.optimizers["unet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.steps += 1
        self.ema_update(self.unet_ema, self.unet)
        return {"loss": loss.detach()}

    # --- sampling ---------------------------------------------------------------------------

    def guided(
        self, x: torch.Tensor, level: torch.Tensor, y: torch.Tensor, edm: bool
    ) -> torch.Tensor:
        """The EMA net's prediction with classifier-free guidance: conditional and null-class
        passes in one batch. The mix is linear, so mixing raw outputs or denoised images is
        the same."""
        scale = self.cfg.diffusion.guidance
        net = self.net_ema
        if scale != 1.0:
            x, level, y = torch.cat([x, x]), torch.cat([level, level]), torch.cat([y, y])
            y[len(y) // 2 :] = self.null
        with self.autocast():
            out = self.edm_denoise(net, x, level, y) if edm else net(x, level, y).float()
        if scale == 1.0:
            return out
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d = self.cfg.diffusion
        shape = (len(labels), self.channels, self.size, self.size)
        x = torch.randn(shape, generator=generator, device=generator.device).to(self.device)
        x, y = self.layout(x), labels.to(self.device)
        ones = torch.ones(len(labels), device=self.device)

        if d.schedule == "edm":
            sigmas = karras_sigmas(d.sample_steps)
            x = x * sigmas[0]
            for sigma, sigma_next in pairwise(sigmas):
                denoised = self.guided(x, sigma * ones, y, edm=True)
                x = x + (sigma_next - sigma) * (x - denoised) / sigma  # Euler; last step: x = D
            return x.clamp(-1, 1)

        ts = torch.linspace(d.timesteps - 1, 0, d.sample_steps).round().long()
        ts = ts.unique_consecutive().tolist()
        for i, t in enumerate(ts):
            ab = self.alphas_cumprod[t]
            ab_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else ab.new_tensor(1.0)
            out = self.guided(x, t * (1000 / d.timesteps) * ones, y, edm=False)
            if self.prediction == "eps":
                x0 = (x - (1 - ab).sqrt() * out) / ab.sqrt()
            else:
                x0 = ab.sqrt() * x - (1 - ab).sqrt() * out
            x0 = x0.clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x.clamp(-1, 1)
