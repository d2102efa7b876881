"""What every generator family implements, and the fast-path pieces they share.

A family owns its networks (online and EMA copies), their optimizers and one random
generator, `rng`. The training loop (tasks/train/stage.py) only calls `train_step`; generate only
calls `sample`. Every random draw of a training step (noise, timesteps, augmentation, label
dropout) comes from `rng`, whose state is part of `state_dict()`, so a resumed run replays
exactly the draws an uninterrupted one would have made.

The fast path lives here so each family uses it the same way: bf16 autocast on CUDA,
channels_last weights and inputs, fused Adam on CUDA, torch.compile behind a flag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from synthloop.config import TrainConfig


def derive_seed(seed: int, stream: str) -> int:
    """Independent seeds for independent random streams, all from the one configured seed."""
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Family:
    """A class-conditional image generator: networks, EMA, optimizers, one training step.

    Subclasses build their networks in `__init__`, fill `modules` (every weight, EMA
    included) and `optimizers`, name the module that samples (`export_module`, an EMA copy),
    and implement `train_step` and `sample`. Images are float NCHW in [-1, 1]; labels are
    int64 class indices.
    """

    name: ClassVar[str]
    export_module: ClassVar[str]  # the key in `modules` whose weights generate needs

    def __init__(
        self, cfg: TrainConfig, num_classes: int, channels: int, size: int, device: torch.device
    ) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.channels = channels
        self.size = size
        self.device = torch.device(device)
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(derive_seed(cfg.seed, f"{self.name}-train"))
        self.steps = 0  # optimizer steps taken; drives the EMA warm-up
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._flops: float | None = None

    # --- what a family implements ----------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step (EMA update included) on a batch; returns detached 0-dim
        loss tensors, so the caller decides when to pay for a device sync."""
        raise NotImplementedError

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Images of the given classes from the EMA weights, float NCHW in [-1, 1]. Noise is
        drawn from `generator` on its own device, so a CPU generator gives the same noise
        whatever device the model is on."""
        raise NotImplementedError

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Data-parallel training: `train_step` then calls each trained network through
        `wrap(network)` (DistributedDataParallel, which averages its gradients over the
        ranks). `modules` keeps the plain networks, so checkpoints and exports are unchanged."""
        raise NotImplementedError

    # --- export: the weights generate needs ------------------------------------------------

    def export_state(self) -> dict[str, torch.Tensor]:
        state = self.modules[self.export_module].state_dict()
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def load_export(self, state: dict[str, torch.Tensor]) -> None:
        self.modules[self.export_module].load_state_dict(state)

    @classmethod
    def from_export(
        cls,
        cfg: TrainConfig,
        num_classes: int,
        channels: int,
        size: int,
        state: dict[str, torch.Tensor],
        device: torch.device,
    ) -> Family:
        """Rebuild a family for sampling from `export_state()`."""
        family = cls(cfg, num_classes, channels, size, device)
        family.load_export(state)
        return family

    # --- checkpoints: everything a bit-exact resume needs ----------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "rng": self.rng.get_state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, module in self.modules.items():
            module.load_state_dict(state["modules"][key])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        self.rng.set_state(state["rng"])
        self.steps = int(state["steps"])

    def parameter_counts(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in m.parameters()) for k, m in self.modules.items()}

    def flops_per_image(self, batch: int = 2) -> float:
        """Measured FLOPs of one training image through a full step (forward and backward of
        every network the step runs; matmuls and convolutions, the MFU convention). Counted
        on a throw-away CPU copy, so this model's weights and random streams are untouched."""
        if self._flops is None:
            cfg = self.cfg.model_copy(update={"compile": False, "bf16": False})
            with torch.random.fork_rng(devices=[]):
                cpu = torch.device("cpu")
                probe = type(self)(cfg, self.num_classes, self.channels, self.size, cpu)
                x = torch.zeros(batch, self.channels, self.size, self.size)
                y = torch.arange(batch) % self.num_classes
                with FlopCounterMode(display=False) as counter:
                    probe.train_step(x, y)
            self._flops = counter.get_total_flops() / batch
        return self._flops

    # --- the fast path ---------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        # bf16 on CUDA only: tensor-core speed, no loss scaling needed. On CPU it would be
        # slower for small convs and change the numerics the CPU tests rely on.
        enabled = self.cfg.bf16 and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def place(self, module: nn.Module) -> nn.Module:
        """Move a network to the device, NHWC when channels_last (faster convs on GPUs)."""
        module = module.to(self.device)
        if self.cfg.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def compiled(self, module: nn.Module) -> nn.Module:
        """torch.compile wraps the module and shares its weights: `modules` keeps the plain
        module (clean state_dict keys), the step calls the compiled one."""
        return torch.compile(module) if self.cfg.compile else module

    def adam(self, params: Any, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        # fused: one kernel for every parameter on CUDA; foreach (multi-tensor) on CPU.
        fast = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.Adam(params, lr=lr, betas=betas, **fast)

    @torch.no_grad()
    def ema_update(self, ema: nn.Module, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * model. The decay warms up as (1+n)/(10+n), so a
        short run's average is not dominated by the random initial weights. Buffers (e.g.
        BatchNorm running statistics) are copied."""
        decay = min(self.cfg.ema_decay, (1 + self.steps) / (10 + self.steps))
        ema_params = list(ema.parameters())
        torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
