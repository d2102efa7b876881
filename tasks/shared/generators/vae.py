"""vae: a class-conditional variational autoencoder (Kingma & Welling 2014; CVAE, Sohn et
al. 2015). Only the decoder samples.

Encoder q(z | x, y): a 3x3 conv stem at the image size, then strided 4x4 convs down to the
small map of `cgan.pyramid` (4x4; 7x7 for 28 pixels), the flattened map and a class
embedding into a linear layer giving the posterior mean and log-variance.
Decoder p(x | z, y): the mirror, as cgan's generator: z and a class embedding through a
linear layer to the small map, then nearest-upsample + 3x3 conv blocks up to the image
size. Both carry the label at every layer as FiLM: GroupNorm without its own affine, then
a gain and bias looked up per class (no batch statistics: a sample does not depend on the
rest of its batch, and DDP needs no BatchNorm sync).

Loss: the negative ELBO per image, recon + w * KL(q || N(0, I)), with the KL weight w
rising linearly from beta / kl_warmup at step 1 to beta at step kl_warmup (`kl_weight`),
so the decoder learns to use z before the KL term pulls the posterior to the prior.
Likelihood (train.vae.likelihood), on pixels scaled to [0, 1]:
  bernoulli  binary cross-entropy on the decoder's logits (continuous targets): its
             gradient does not fade as a pixel nears 0 or 1, so strokes come out sharp and
             the black background stays black.
  gaussian   a Gaussian around sigmoid(logits) with one shared, analytically optimal std
             (sigma-VAE, Rybkin et al. 2021: sigma^2 = the batch's mean squared error),
             which balances reconstruction against KL without a hand-set scale.
Either way the image a latent decodes to is the likelihood's mean, sigmoid(logits).

Sampling: z = temperature * N(0, I) noise drawn from the caller's generator, decoded by the
EMA decoder; temperature 0 gives the decoder's output at the prior mean, the same for every
seed. The decoder's weights are averaged (EMA, train.ema_decay); only that average is
exported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from synthloop.config import TrainConfig
from tasks.shared.generators.base import Family
from tasks.shared.generators.cgan import ClassNorm, UpsamplingDecoder, level_channels, pyramid
from tasks.shared.generators.diffusion import groups

BETAS = (0.9, 0.999)
LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite early in training
MIN_LOG_SIGMA = math.log(1e-3)  # gaussian: a floor on the shared std (a perfect batch)


def kl_weight(step: int, beta: float, warmup: int) -> float:
    """The KL term's weight at optimizer step `step` (1-based): linear up to beta over
    `warmup` steps, beta from then on (and throughout when warmup is 0)."""
    if warmup <= 0:
        return beta
    return beta * min(1.0, step / warmup)


def film(channels: int, num_classes: int) -> ClassNorm:
    """FiLM: GroupNorm without affine, then a gain and bias per class."""
    return ClassNorm(nn.GroupNorm(groups(channels), channels, affine=False), channels, num_classes)


class Encoder(nn.Module):
    def __init__(self, latent_dim: int, num_classes: int, channels: int, size: int, width: int):
        super().__init__()
        base, levels = pyramid(size)
        chans = level_channels(width, levels)[::-1]  # from the image size down
        self.stem = nn.Conv2d(channels, chans[0], 3, padding=1)
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 4, stride=2, padding=1) for cin, cout in pairwise(chans)
        )
        self.films = nn.ModuleList(film(c, num_classes) for c in chans)
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.head = nn.Linear(chans[-1] * base**2 + latent_dim, 2 * latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.films[0](self.stem(x), y))
        for conv, film in zip(self.convs, self.films[1:], strict=True):
            h = F.silu(film(conv(h), y))
        mu, logvar = self.head(torch.cat([h.flatten(1), self.embed(y)], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)


class Decoder(UpsamplingDecoder):
    """z, y -> per-pixel logits (N, C, H, W): cgan's generator body with FiLM and SiLU."""

    def __init__(self, latent_dim: int, num_classes: int, channels: int, size: int, width: int):
        super().__init__(latent_dim, num_classes, channels, size, width, film, F.silu)


class Autoencoder(nn.Module):
    """Encoder and decoder as one module, so a step is one forward (one DDP wrapper, one
    compiled graph). The reparameterisation noise comes in from the family's rng."""

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x, y)
        z = mu + eps * (0.5 * logvar).exp()
        return self.decoder(z, y), mu, logvar


def reconstruction(logits: torch.Tensor, target: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x | z) per image (summed over pixels), in nats; target in [0, 1]."""
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:  # gaussian with the batch's optimal shared std (sigma-VAE)
        err = (torch.sigmoid(logits) - target) ** 2
        log_sigma = (0.5 * err.mean().log()).clamp(min=MIN_LOG_SIGMA)
        nll = 0.5 * err * torch.exp(-2 * log_sigma) + log_sigma + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(1)


class VAE(Family):
    name = "vae"
    export_module = "decoder_ema"

    def __init__(
        self, cfg: TrainConfig, num_classes: int, channels: int, size: int, device: torch.device
    ) -> None:
        super().__init__(cfg, num_classes, channels, size, device)
        v = cfg.vae
        self.encoder = self.place(Encoder(v.latent_dim, num_classes, channels, size, v.width))
        self.decoder = self.place(Decoder(v.latent_dim, num_classes, channels, size, v.width))
        self.decoder_ema = copy.deepcopy(self.decoder).eval().requires_grad_(False)
        self.modules = {
            "encoder": self.encoder,
            "decoder": self.decoder,
            "decoder_ema": self.decoder_ema,
        }
        self.autoencoder = Autoencoder(self.encoder, self.decoder)
        self.optimizers = {"vae": self.adam(self.autoencoder.parameters(), v.lr, BETAS)}
        self.net, self.dec_ema = self.compiled(self.autoencoder), self.compiled(self.decoder_ema)

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.net = self.compiled(wrap(self.autoencoder))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.cfg.vae
        target = (x + 1) / 2  # [-1, 1] -> [0, 1], the likelihood's scale
        x = self.layout(x)
        eps = torch.randn(len(x), v.latent_dim, generator=self.rng, device=self.device)
        with self.autocast():
            logits, mu, logvar = self.net(x, y, eps)
        mu, logvar = mu.float(), logvar.float()
        recon = reconstruction(logits.float(), target, v.likelihood).mean()
        kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(1).mean()
        loss = recon + kl_weight(self.steps + 1, v.beta, v.kl_warmup) * kl

        opt = self.optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.steps += 1
        self.ema_update(self.decoder_ema, self.decoder)
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        v = self.cfg.vae
        # always drawn, so a generator's stream advances the same at every temperature
        z = torch.randn(len(labels), v.latent_dim, generator=generator, device=generator.device)
        with self.autocast():
            logits = self.dec_ema(v.temperature * z.to(self.device), labels.to(self.device))
        return (torch.sigmoid(logits.float()) * 2 - 1).clamp(-1, 1)
