"""transformer: a class-conditional autoregressive Transformer over quantised pixels.

Tokens. Every pixel value in [-1, 1] is rounded to one of train.transformer.levels evenly
spaced values, the end points included (so black and white survive exactly: a digit's
background stays 0). An image is C*H*W tokens in raster order with the channels
interleaved (pixel (0, 0)'s R, G, B, then pixel (0, 1)'s ...), so a colour pixel's channels
are predicted one after another, each seeing those already drawn.

Network: a decoder-only GPT in nanoGPT's layout. Pre-LN blocks (LayerNorm -> causal
self-attention -> residual; LayerNorm -> 4x MLP with GELU -> residual), a final LayerNorm
and a linear head over the levels. Input position 0 is the class embedding (the class is
the BOS token), position i > 0 the embedding of pixel token i - 1, plus a learned position
embedding; output i predicts pixel token i. Training is teacher-forced cross-entropy over
every position in one pass, attention through scaled_dot_product_attention(is_causal=True).
Dropout (train.transformer.dropout, default 0) draws its masks from the family's `rng`,
like every other random draw of a step, and is applied to the embeddings and the residual
branches; attention weights are not dropped (SDPA would draw from torch's global stream).

Sampling: one token per step with a KV cache (each layer's keys and values of the prefix
are kept, so a step runs the network on one position only). Logits are divided by the
temperature and cut to the top_k likeliest levels (0: no cut; 1: greedy); the token is
drawn by inverting the CDF at a uniform number drawn up front from the caller's generator
on its own device, so a CPU generator draws the same numbers whatever device the model is
on. The EMA weights sample; sampling runs eagerly (the growing cache would recompile a
compiled step at every length).

Larger images: quantised pixels with a size cap, not a VQ-VAE. A sequence is C*H*W tokens:
64 for the 8x8 digits, 768 for 16x16 RGB, 784 for 28x28 grey, 3072 for 32x32 RGB, 4096 for
64x64 grey. Attention cost grows with the square of that length and sampling takes one
network step per token, so above train.transformer.max_tokens (1024) the family refuses
with a ConfigError that names the setting. Raising max_tokens is allowed (a GPU can train
32x32x3 at 3072 tokens; sampling is then 3072 sequential steps). A VQ-VAE tokenizer is
what would make large images cheap, but it is a second model with its own training, and
its reconstruction error bounds sample quality: it could not be tuned or measured on the
default data (8x8 grey), so it is not built here.

bf16 autocast and torch.compile come from the base helpers; channels_last does not apply
(the networks hold no convolutions and the images become token sequences).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from synthloop.config import ConfigError, TrainConfig
from tasks.shared.generators.base import Family

BETAS = (0.9, 0.95)  # nanoGPT's Adam betas
GRAD_CLIP = 1.0  # max global gradient norm, as nanoGPT
INIT_STD = 0.02  # GPT-2's weight initialisation


# --- tokens ------------------------------------------------------------------------------


def quantise(images: torch.Tensor, levels: int) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, H*W*C) int64 tokens in [0, levels): raster
    order, channels interleaved, each value rounded to the nearest of `levels` levels."""
    q = ((images.float().clamp(-1, 1) + 1) * ((levels - 1) / 2)).round().long()
    return q.permute(0, 2, 3, 1).reshape(len(images), -1)


def dequantise(tokens: torch.Tensor, channels: int, size: int, levels: int) -> torch.Tensor:
    """The inverse of `quantise`: (N, H*W*C) tokens -> (N, C, H, W) float in [-1, 1]."""
    images = tokens.float() * (2 / (levels - 1)) - 1
    return images.view(len(tokens), size, size, channels).permute(0, 3, 1, 2).contiguous()


def dropout(x: torch.Tensor, p: float, rng: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout with its mask from `rng` (None or p = 0: the identity)."""
    if rng is None or p == 0:
        return x
    keep = torch.rand(x.shape, generator=rng, device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


def pick(
    logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int
) -> torch.Tensor:
    """Draw one token per row of (N, V) logits at the given (N,) uniform numbers."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    cdf = logits.softmax(-1).cumsum(-1)
    # scaled by the total, so rounding in the cumsum can never push u past the last bin
    token = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1)
    return token.clamp_max(logits.shape[-1] - 1)


# --- the network ---------------------------------------------------------------------------


class KVCache:
    """Every layer's keys and values of the positions run so far, for one sampling pass;
    allocated once for the whole sequence, so a step writes one slot and copies nothing."""

    def __init__(self, layers: int, length: int) -> None:
        self.layers, self.capacity = layers, length
        self.kv: torch.Tensor | None = None  # (layers, 2, N, heads, length, head_dim)
        self.length = 0  # positions cached; advanced by GPT.trunk after the last layer

    def extend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (N, heads, t, head_dim) keys and values; return all of them so far."""
        if self.kv is None:  # the dtype is the step's (bf16 under autocast)
            n, heads, _, dim = k.shape
            shape = (self.layers, 2, n, heads, self.capacity, dim)
            self.kv = k.new_empty(shape)
        end = self.length + k.shape[2]
        self.kv[layer, 0, :, :, self.length : end] = k
        self.kv[layer, 1, :, :, self.length : end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (
            z.view(n, t, self.n_head, c // self.n_head).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if t != 1:
                raise ValueError("a KV-cache step runs one position at a time")
            k, v = cache.extend(layer, k, v)
            # one query over every cached position: the prefix is exactly what it may see
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        p: float,
        rng: torch.Generator | None,
    ) -> torch.Tensor:
        x = x + dropout(self.attn(self.ln1(x), cache, layer), p, rng)
        return x + dropout(self.mlp(self.ln2(x)), p, rng)


class GPT(nn.Module):
    """Class token first, then pixel tokens; logits over the levels at every position."""

    def __init__(
        self,
        num_classes: int,
        levels: int,
        length: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        p_drop: float,
    ) -> None:
        super().__init__()
        self.p_drop = p_drop
        self.cls = nn.Embedding(num_classes, n_embd)
        self.tok = nn.Embedding(levels, n_embd)
        self.pos = nn.Embedding(length, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, levels)
        self.apply(self._init)
        for name, param in self.named_parameters():  # GPT-2: residual projections scaled
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(param, std=INIT_STD / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def trunk(
        self, h: torch.Tensor, cache: KVCache | None = None, rng: torch.Generator | None = None
    ) -> torch.Tensor:
        """(N, t, n_embd) input embeddings at positions start..start+t -> (N, t, levels)."""
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + h.shape[1], device=h.device)
        h = dropout(h + self.pos(positions), self.p_drop, rng)
        for layer, block in enumerate(self.blocks):
            h = block(h, cache, layer, self.p_drop, rng)
        if cache is not None:
            cache.length += h.shape[1]
        return self.head(self.ln_f(h))

    def forward(
        self, y: torch.Tensor, tokens: torch.Tensor, rng: torch.Generator | None = None
    ) -> torch.Tensor:
        """Teacher-forced: the class and (N, t) pixel tokens -> (N, t + 1, levels) logits,
        output i predicting pixel token i."""
        h = torch.cat([self.cls(y)[:, None], self.tok(tokens)], dim=1)
        return self.trunk(h, rng=rng)

    def step(self, y: torch.Tensor, last: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """The next token's (N, levels) logits from one new input, the prefix from `cache`:
        the class at the first step, then the token drawn last."""
        h = self.cls(y) if cache.length == 0 else self.tok(last)
        return self.trunk(h[:, None], cache)[:, 0]


# --- the family ----------------------------------------------------------------------------


class Transformer(Family):
    name = "transformer"
    export_module = "gpt_ema"

    def __init__(
        self, cfg: TrainConfig, num_classes: int, channels: int, size: int, device: torch.device
    ) -> None:
        super().__init__(cfg, num_classes, channels, size, device)
        t = cfg.transformer
        self.length = channels * size * size
        if self.length > t.max_tokens:
            raise ConfigError(
                f"train.transformer.max_tokens: {size}x{size}x{channels} images are "
                f"{self.length} tokens (one per pixel and channel), above max_tokens="
                f"{t.max_tokens}. Raise train.transformer.max_tokens to {self.length} (attention "
                "cost grows with its square, sampling takes one step per token) or choose "
                "train.family cgan or diffusion"
            )
        # plain .to(): self.place's channels_last is for convolutions, and this has none
        self.gpt = GPT(
            num_classes, t.levels, self.length, t.n_layer, t.n_head, t.n_embd, t.dropout
        ).to(self.device)
        self.gpt_ema = copy.deepcopy(self.gpt).eval().requires_grad_(False)
        self.modules = {"gpt": self.gpt, "gpt_ema": self.gpt_ema}
        # its own lr (nanoGPT's for small models), not train.lr: that one is tuned for the GAN
        self.optimizers = {"gpt": self.adam(self.gpt.parameters(), t.lr, BETAS)}
        self.net = self.compiled(self.gpt)

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.net = self.compiled(wrap(self.gpt))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return quantise(images, self.cfg.transformer.levels)

    def images(self, tokens: torch.Tensor) -> torch.Tensor:
        return dequantise(tokens, self.channels, self.size, self.cfg.transformer.levels)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.tokens(x)
        rng = self.rng if self.cfg.transformer.dropout else None
        with self.autocast():
            logits = self.net(y, tokens[:, :-1], rng)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        opt = self.optimizers["gpt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.gpt.parameters(), GRAD_CLIP, foreach=True)
        opt.step()
        self.steps += 1
        self.ema_update(self.gpt_ema, self.gpt)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def sample_tokens(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N, C*H*W) tokens of the given classes from the EMA weights, one per step."""
        t = self.cfg.transformer
        n = len(labels)
        uniforms = torch.rand(n, self.length, generator=generator, device=generator.device)
        uniforms, y = uniforms.to(self.device), labels.to(self.device)
        tokens = torch.empty(n, self.length, dtype=torch.long, device=self.device)
        cache, last = KVCache(t.n_layer, self.length), None
        for i in range(self.length):
            with self.autocast():
                logits = self.gpt_ema.step(y, last, cache)
            last = tokens[:, i] = pick(logits, uniforms[:, i], t.temperature, t.top_k)
        return tokens

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.images(self.sample_tokens(labels, generator))
