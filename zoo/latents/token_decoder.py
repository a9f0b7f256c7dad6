"""A frozen encoder's patch tokens as the latent space of diffusion, and the ViT that decodes them to pixels.

    latent    z = (y - mu) / sqrt(var + eps)          y: raw tokens [B, N, D] of a frozen encoder; mu, var [N, D]:
                                                       per position and channel over the training set; the state
                                                       is z laid out as [B, D, g, g]
    decoder   x = Dec(y~),  y~ = y + sigma eps,  sigma = tau U,  U ~ U(0, 1) per image,  eps ~ N(0, I)
              (trained with the noise so that it tolerates imperfect tokens: the diffusion model's samples)
    decode    x = Dec(z sqrt(var + eps) + mu)          at sampling, without noise

The decoder is a pre-norm ViT (MAE's decoder layout): a linear map of each token to the decoder width, a
learned class token in front, fixed 2D sin-cos positions (zeros for the class token), `depth` layers of softmax
attention and a GELU MLP (LayerNorm eps 1e-12), a final LayerNorm and a linear map of each token to a `patch` x
`patch` pixel block; the class token's output is dropped. It is trained once per (encoder, data, recipe) on L1
reconstruction and cached (`TokenDecoderArtifact`); the statistics are stored with it. Any method that diffuses a
frozen encoder's tokens holds a `TokenLatents` built from that artifact.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.backbones.layers import sincos_pos_embed_2d, unpatchify
from zoo.cache import cache_dir, caller_random_state, fingerprint
from zoo.errors import ConfigError
from zoo.training.checkpoint import atomic_save, load_artifact

TOKEN_DECODER_FORMAT = "repa-zoo-token-decoder/1"


# ---------------------------------------------------------------- the decoder
class DecoderLayer(nn.Module):
    """x + Attn(LN(x)), then + MLP(LN(.)): one pre-norm ViT layer with separate q, k, v maps (MAE's layout)."""

    def __init__(self, width: int, heads: int, mlp: int, eps: float = 1e-12):
        super().__init__()
        if width % heads:
            raise ConfigError(f"the token decoder's width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TokenDecoder(nn.Module):
    """Raw tokens [B, g*g, D] -> images [B, 3, g*patch, g*patch] (in [-1, 1] once trained)."""

    def __init__(self, dim: int, grid: int, patch: int, width: int, depth: int, heads: int, mlp: int,
                 channels: int = 3, eps: float = 1e-12):
        super().__init__()
        self.dim, self.grid, self.patch, self.channels = dim, grid, patch, channels
        self.embed = nn.Linear(dim, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        table = torch.cat([torch.zeros(1, width), sincos_pos_embed_2d(width, grid)])  # the class token's row: zeros
        self.register_buffer("pos", table[None], persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(width, heads, mlp, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.pred = nn.Linear(width, patch * patch * channels)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] != self.grid ** 2 or tokens.shape[2] != self.dim:
            raise ValueError(f"the token decoder reads [B, {self.grid ** 2}, {self.dim}] tokens, got "
                             f"{list(tokens.shape)}")
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos.to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return unpatchify(self.pred(self.norm(x))[:, 1:], self.patch, self.channels)


def official_decoder_state(official: dict) -> tuple[dict, list]:
    """RAE's `GeneralDecoder` state dict as TokenDecoder's, and the keys left unused (its fixed position table)."""
    layer = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.attention.query": "query",
             "attention.attention.key": "key", "attention.attention.value": "value",
             "attention.output.dense": "proj", "intermediate.dense": "fc1", "output.dense": "fc2"}
    top = {"decoder_embed": "embed", "decoder_norm": "norm", "decoder_pred": "pred"}
    state, unused = {}, []
    for key, value in official.items():
        if key == "trainable_cls_token":
            state["cls_token"] = value
        elif key.startswith("decoder_layers."):
            _, index, rest = key.split(".", 2)
            module, param = rest.rsplit(".", 1)
            state[f"layers.{index}.{layer[module]}.{param}"] = value
        elif key.split(".")[0] in top:
            module, param = key.split(".", 1)
            state[f"{top[module]}.{param}"] = value
        else:
            unused.append(key)
    return state, unused


# ---------------------------------------------------------------- statistics and noise
def latent_statistics(batches: Iterable[Tensor], momentum: float = 0.1) -> tuple[Tensor, Tensor]:
    """Per-position, per-channel mean and variance [N, D] of raw tokens [B, N, D] over the batches.

    momentum > 0: RAE's estimator (`LayerNormwStatistics` of calculate_stat.py), a running average from mean 0 and
    variance 1, each batch moving them by `momentum` towards its own mean and (biased) variance. momentum = 0: the
    exact mean and population variance of all the tokens seen.
    """
    mean = var = None
    total, sum_, sum_sq = 0, 0.0, 0.0
    for tokens in batches:
        tokens = tokens.double()
        if momentum > 0:
            if mean is None:
                mean, var = torch.zeros_like(tokens[0]), torch.ones_like(tokens[0])
            mean = (1 - momentum) * mean + momentum * tokens.mean(0)
            var = (1 - momentum) * var + momentum * tokens.var(0, unbiased=False)
        else:
            total, sum_, sum_sq = total + len(tokens), sum_ + tokens.sum(0), sum_sq + tokens.pow(2).sum(0)
    if momentum > 0:
        if mean is None:
            raise ConfigError("the latent statistics need at least one batch of tokens")
        return mean.float(), var.float()
    if total == 0:
        raise ConfigError("the latent statistics need at least one batch of tokens")
    mean = sum_ / total
    return mean.float(), (sum_sq / total - mean.pow(2)).clamp_min(0).float()


def noise_augment(tokens: Tensor, tau: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """y + sigma eps with sigma = tau U, U ~ U(0, 1) per image (RAE's `noising`: U drawn first, then eps)."""
    if tau <= 0:
        return tokens
    sigma = tau * torch.rand((tokens.shape[0],) + (1,) * (tokens.dim() - 1), generator=generator,
                             device=tokens.device)
    return tokens + sigma * torch.randn(tokens.shape, generator=generator, device=tokens.device)


# ---------------------------------------------------------------- the latent space
class TokenLatents(nn.Module):
    """Raw encoder tokens <-> diffusion states [B, D, g, g] <-> images, with a trained `TokenDecoder`. Frozen."""

    def __init__(self, decoder: TokenDecoder, mean: Tensor, var: Tensor, eps: float = 1e-5):
        super().__init__()
        self.decoder, self.eps = decoder, eps
        self.register_buffer("mean", mean.float(), persistent=False)
        self.register_buffer("var", var.float(), persistent=False)

    def state_shape(self) -> tuple:
        return (self.decoder.dim, self.decoder.grid, self.decoder.grid)

    def to_state(self, tokens: Tensor) -> Tensor:
        """Raw tokens [B, N, D] -> normalised state [B, D, g, g]."""
        z = (tokens.float() - self.mean) / torch.sqrt(self.var + self.eps)
        g = self.decoder.grid
        return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], g, g)

    def to_tokens(self, state: Tensor) -> Tensor:
        """Normalised state [B, D, g, g] -> raw tokens [B, N, D]."""
        tokens = state.float().flatten(2).transpose(1, 2)
        return tokens * torch.sqrt(self.var + self.eps) + self.mean

    def decode(self, state: Tensor) -> Tensor:
        return self.decoder(self.to_tokens(state))


# ---------------------------------------------------------------- training and the cache
def decoder_path(identity: dict, recipe: dict, name: str = "token-decoder") -> Path:
    key = fingerprint({"identity": identity, "recipe": recipe, "format": TOKEN_DECODER_FORMAT})
    return cache_dir("token-decoder") / f"{name}-{key}.pt"


def build_decoder(recipe: dict, dim: int, grid: int, image_size: int) -> TokenDecoder:
    if image_size % grid:
        raise ConfigError(f"the image size {image_size} is not a multiple of the token grid {grid}: the decoder "
                          "maps each token to a square block of pixels")
    return TokenDecoder(dim, grid, image_size // grid, recipe["width"], recipe["depth"], recipe["heads"],
                        recipe["mlp"])


def psnr(images: Tensor, recon: Tensor) -> float:
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / F.mse_loss(recon.clamp(-1, 1).float(), images.float())))


def train_token_decoder(recipe: dict, identity: dict, dim: int, grid: int, image_size: int,
                        draw: Callable[[torch.Generator, int], tuple[Tensor, Tensor]],
                        held_out: Callable[[], Iterable[tuple[Tensor, Tensor]]], path: Path,
                        device=None, progress: bool = True) -> Path:
    """Fit the latent statistics, then train the decoder on noised tokens with L1 and save both atomically.

    `draw(generator, n)` returns (images [n, 3, H, W] in [-1, 1], their raw tokens [n, N, D]), a random batch of the
    training set; `held_out()` yields such pairs of images the decoder never sees, scored by PSNR after training.
    The recipe's keys: width, depth, heads, mlp (the decoder); noise_tau; steps, batch_size, lr, final_lr, beta1,
    beta2, ema_decay, seed; stats_batches, stats_batch_size, stats_momentum.
    """
    from tqdm import tqdm

    r, device = dict(recipe), torch.device(device or "cpu")
    gen = torch.Generator().manual_seed(r["seed"])
    mean, var = latent_statistics((draw(gen, r["stats_batch_size"])[1] for _ in range(r["stats_batches"])),
                                  r["stats_momentum"])
    torch.manual_seed(r["seed"])
    decoder = build_decoder(r, dim, grid, image_size).to(device)
    ema = copy.deepcopy(decoder).requires_grad_(False)
    opt = torch.optim.AdamW(decoder.parameters(), lr=r["lr"], betas=(r["beta1"], r["beta2"]), weight_decay=0.0)
    start, warmup = time.perf_counter(), max(1, r["steps"] // 16)   # RAE: 1 warm-up epoch of 16
    bar = tqdm(range(r["steps"]), desc="token decoder", unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:   # linear warm-up from 0, then cosine from lr to final_lr (RAE's schedule)
            group["lr"] = r["lr"] * (step + 1) / warmup if step < warmup else r["final_lr"] + 0.5 * (
                r["lr"] - r["final_lr"]) * (1 + math.cos(math.pi * (step - warmup) / max(1, r["steps"] - warmup)))
        images, tokens = draw(gen, r["batch_size"])
        images, tokens = images.to(device), tokens.to(device)
        recon = decoder(noise_augment(tokens, r["noise_tau"], None))
        l1 = (recon - images).abs().mean()
        opt.zero_grad(set_to_none=True)
        l1.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), decoder.parameters()):
                e.lerp_(p, 1 - r["ema_decay"])
        bar.set_postfix(l1=f"{l1.item():.4f}", refresh=False)
    bar.close()
    seconds = round(time.perf_counter() - start, 1)
    ema.eval()
    with torch.no_grad():
        pairs = [(x, ema(y.to(device)).cpu()) for x, y in held_out()]
    images, recon = torch.cat([x for x, _ in pairs]), torch.cat([r_ for _, r_ in pairs])
    record = {"format": TOKEN_DECODER_FORMAT, "recipe": r, "identity": identity, "dim": dim, "grid": grid,
              "image_size": image_size, "mean": mean, "var": var, "weights": {k: v.cpu() for k, v in ema.state_dict().items()},
              "train_seconds": seconds, "held_out_images": len(images), "held_out_psnr": psnr(images, recon),
              "held_out_l1": float((recon.clamp(-1, 1) - images).abs().mean())}
    atomic_save(record, path)
    return Path(path)


def load_token_latents(path: Path, identity: Optional[dict] = None, make: str = "zoo prepare") -> tuple:
    """(TokenLatents in eval mode, its record without the weights) from a file `train_token_decoder` wrote; with
    `identity`, a file made for another encoder or data is refused."""
    record = load_artifact(path, TOKEN_DECODER_FORMAT, "token decoder weights", make)
    if identity is not None and record["identity"] != identity:
        raise ConfigError(f"the token decoder {path} was trained for {record['identity']}, not for this run's "
                          f"{identity}; train one with `{make}`")
    decoder = build_decoder(record["recipe"], record["dim"], record["grid"], record["image_size"])
    decoder.load_state_dict(record.pop("weights"))
    latents = TokenLatents(decoder, record["mean"], record["var"])
    return latents.eval().requires_grad_(False), record


def ensure_token_decoder(path: Path, train: Callable[[], Path], what: str) -> Path:
    """The decoder at `path`, trained first (and said so) when it is not there."""
    if not Path(path).exists():
        print(f"training the {what} once; it is cached at {path}", file=sys.stderr)
        with caller_random_state():
            train()
    return Path(path)
