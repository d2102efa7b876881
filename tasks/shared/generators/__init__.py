"""Generator families, chosen by `train.family`.

Each family implements the interface in `base.Family`: built from (cfg, num_classes,
channels, size, device); `modules` and `optimizers`; `train_step(x, y)`; `sample(labels,
generator)` from the EMA weights; `export_state()` / `from_export(...)` for the weights
generate needs; `flops_per_image()` for MFU; `distribute(wrap)` for DDP. Adding a family:
subclass `Family`, register it here and add its name to `synthloop.config.FamilyName`.
"""

from __future__ import annotations

from tasks.shared.generators.base import Family
from tasks.shared.generators.cgan import CGAN
from tasks.shared.generators.diffusion import Diffusion
from tasks.shared.generators.transformer import Transformer
from tasks.shared.generators.vae import VAE

FAMILIES: dict[str, type[Family]] = {
    "cgan": CGAN,
    "diffusion": Diffusion,
    "vae": VAE,
    "transformer": Transformer,
}

__all__ = ["FAMILIES", "Family"]
