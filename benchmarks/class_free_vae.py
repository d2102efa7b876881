"""A CVAE whose latent is pushed to carry no class, for long_tail.py's transfer sampler.

The loop's VAE (tasks/shared/generators/vae.py) learns a latent that carries the class as
well as the style, so decoding another class's latent with a short class's label gives back
the other class. Here an adversary, a small MLP, learns to predict the label from the
sampled latent z, and the encoder is trained to leave it at chance: its loss gains
`weight` times the cross-entropy of the adversary's prediction against the uniform
distribution, ramped in over the first 500 steps (Fader networks, Lample et al., NeurIPS
2017; here on the latent of a CVAE rather than of an autoencoder). The adversary takes two
Adam steps per VAE step on the detached latent. Everything else is the family as shipped:
its reconstruction, KL warm-up, EMA decoder and sampling. The adversary is not exported.

`use(weight)` swaps it in for `train.family: vae` in this process only (a benchmark
option, not a loop setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.shared.generators import FAMILIES
from tasks.shared.generators.vae import VAE, kl_weight, reconstruction

ADVERSARY_LR = 1e-3
ADVERSARY_STEPS = 2  # per VAE step, so it keeps up with the encoder
RAMP = 500  # steps over which the encoder's adversarial weight rises to `weight`


def use(weight: float) -> None:
    """`train.family: vae` trains a ClassFreeVAE with this adversarial weight."""
    FAMILIES["vae"] = type("ClassFreeVAE", (ClassFreeVAE,), {"weight": weight})


class ClassFreeVAE(VAE):
    weight: float = 1.0

    def __init__(self, cfg, num_classes, channels, size, device) -> None:  # noqa: ANN001
        super().__init__(cfg, num_classes, channels, size, device)
        latent = cfg.vae.latent_dim
        self.adversary = self.place(
            nn.Sequential(nn.Linear(latent, 128), nn.SiLU(), nn.Linear(128, num_classes))
        )
        self.adversary_opt = torch.optim.Adam(self.adversary.parameters(), ADVERSARY_LR)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.cfg.vae
        target = (x + 1) / 2
        eps = torch.randn(len(x), v.latent_dim, generator=self.rng, device=self.device)
        logits, mu, logvar = self.autoencoder(self.layout(x), y, eps)
        z = mu + eps * (0.5 * logvar).exp()
        recon = reconstruction(logits.float(), target, v.likelihood).mean()
        kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(1).mean()
        # the encoder's side: the adversary's prediction from z should be uniform
        fool = -F.log_softmax(self.adversary(z), 1).mean()
        ramp = min(1.0, (self.steps + 1) / RAMP)
        loss = recon + kl_weight(self.steps + 1, v.beta, v.kl_warmup) * kl
        loss = loss + self.weight * ramp * fool
        opt = self.optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for _ in range(ADVERSARY_STEPS):
            adversary = F.cross_entropy(self.adversary(z.detach()), y)
            self.adversary_opt.zero_grad(set_to_none=True)
            adversary.backward()
            self.adversary_opt.step()
        self.steps += 1
        self.ema_update(self.decoder_ema, self.decoder)
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(),
                "adversary": adversary.detach()}  # fmt: skip
