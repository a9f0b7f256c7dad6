"""A latent space without a VAE: a frozen teacher's patch tokens plus a few trained residual channels, and a
convolutional decoder back to pixels (SVG, Shi et al. 2025).

    z = [ h ; match(h, r) ]  in R^{(D + c) x g x g}      h: the frozen teacher's tokens of the image on a g x g grid
                                                         r = R(x): a small ViT's c channels per token (the detail
                                                         the teacher's semantics drop), rescaled by `match`
    x^ = Dec(z)                                          a conv decoder (ResNet blocks, self-attention at low
                                                         resolutions, nearest upsampling + conv)

Only R, the mask token and Dec are trained, on L1 (+ LPIPS when its weights are on disk, + a hinge PatchGAN on
VQGAN's adaptive weight from step `gan_start`): the teacher stays frozen, so the latent keeps its semantics. `match` gives the residual channels the teacher's overall mean and
spread (one scalar each, from the batch being encoded, both detached), so that neither part dominates the
other's scale. While training, each image's residual channels are replaced by a learned mask token with
probability `mask_ratio`, so the decoder learns to rely on the teacher part too.

The diffusion model sees each channel standardised by its mean and std over the training set (`to_state`).

The module names inside `ResidualViT` are torchvision's VisionTransformer's and those of `ConvDecoder` the
latent-diffusion decoder's, so an official SVG autoencoder's state dict loads by dropping prefixes.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.cache import caller_random_state
from zoo.errors import ConfigError
from zoo.latents.discriminator import PatchDiscriminator, hinge_loss

# 2: the latent's statistics are measured on a random subset of the training images; format 1 measured them on
# every len/num-th image, which on the built-in shapes (class = index mod classes) was a single class
AUTOENCODER_FORMAT = "repa-zoo-residual-autoencoder/2"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ResidualAutoencoderRecipe:
    """The architecture and training of the residual encoder and the decoder (SVG's defaults). Every field is part of
    the trained autoencoder's cache key."""
    residual_channels: int = 8          # c: the residual ViT's output channels per token
    residual_width: int = 384           # the residual ViT (SVG: a 6-layer ViT-S-like network, dropout 0.1)
    residual_depth: int = 6
    residual_heads: int = 8
    residual_mlp: int = 1536
    residual_dropout: float = 0.1       # dropout and attention dropout inside the residual ViT (training only)
    mask_ratio: float = 0.1             # probability per image that its residual channels are the mask token
    match_residual: bool = True         # rescale the residual channels to the teacher's scalar mean and std
    decoder_channels: int = 128         # ch: the decoder's base width
    decoder_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # widths ch * mult; 2^(len - 1) upsampling
    decoder_res_blocks: int = 2         # ResNet blocks per level (+ 1, as the latent-diffusion decoder has)
    decoder_attn: List[int] = field(default_factory=lambda: [16])  # resolutions (px) with self-attention after blocks
    decoder_groups: int = 32            # GroupNorm groups
    ae_steps: int = 100000
    ae_batch_size: int = 64
    ae_lr: float = 1e-4                    # Adam, betas (0.5, 0.9) as SVG (constant, no warm-up)
    ae_beta1: float = 0.5
    ae_beta2: float = 0.9
    perceptual_weight: float = 0.0      # LPIPS weight (SVG: 1.0); > 0 needs lpips_weights
    lpips_weights: str = ""             # a folder with LPIPS-VGG's weights (zoo/latents/lpips.py)
    gan_weight: float = 0.0             # the hinge PatchGAN's weight on the adaptive scale (SVG: disc_weight 0.5); 0: none
    gan_start: int = 5001               # autoencoder step from which the GAN terms count (SVG: disc_start 5001)
    disc_channels: int = 64             # the PatchGAN discriminator's base width (SVG: 64, 3 layers)
    disc_layers: int = 3
    ae_num_images: int = 20000
    ae_stats_images: int = 2000            # training images the latent's per-channel mean and std are measured on
    ae_seed: int = 6_161


def check_recipe(r, image_size: int, grid: int, owner: str) -> None:
    """One clear line for a recipe that cannot build: the decoder must upsample the g x g grid to the image."""
    factor = image_size // grid if grid else 0
    if grid < 1 or factor * grid != image_size or 2 ** (len(r.decoder_mult) - 1) != factor:
        raise ConfigError(f"{owner}.decoder_mult={list(r.decoder_mult)} upsamples 2^{len(r.decoder_mult) - 1}x, but the "
                          f"latent grid is {grid}x{grid} for {image_size} px images: give {int(math.log2(max(factor, 1))) + 1} "
                          "entries (one per resolution)")
    if r.residual_channels < 1:
        raise ConfigError(f"{owner}.residual_channels={r.residual_channels}: at least one residual channel is needed")
    if r.residual_width % r.residual_heads:
        raise ConfigError(f"{owner}.residual_heads={r.residual_heads} does not divide residual_width={r.residual_width}")
    if not 0 <= r.mask_ratio <= 1:
        raise ConfigError(f"{owner}.mask_ratio={r.mask_ratio} is not a probability")
    for mult in r.decoder_mult:
        if (r.decoder_channels * mult) % r.decoder_groups:
            raise ConfigError(f"{owner}.decoder_groups={r.decoder_groups} does not divide the decoder width "
                              f"{r.decoder_channels * mult} (decoder_channels * decoder_mult)")


def imagenet_pixels(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> ImageNet-normalised pixels, what SVG feeds both its teacher and its residual ViT."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def match_distribution(h: Tensor, r: Tensor, eps: float = 1e-6) -> Tensor:
    """r [B, c, N] standardised by its scalar mean and spread, then given the teacher's h [B, D, N]: the scalars are
    the means over channels of the per-channel mean and std (over batch and tokens), all four detached."""
    mean_h, std_h = h.mean(dim=(0, 2)).mean().detach(), h.std(dim=(0, 2)).mean().detach()
    mean_r, std_r = r.mean(dim=(0, 2)).mean().detach(), r.std(dim=(0, 2)).mean().detach()
    return (r - mean_r) / (std_r + eps) * std_h + mean_h


class ResidualViT(nn.Module):
    """torchvision's VisionTransformer (learned positions, a class token) whose head is an MLP to c channels per
    patch token: pixels [B, 3, H, W] -> [B, c, N]."""

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int, mlp: int, channels: int,
                 dropout: float):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(image_size=image_size, patch_size=patch, num_layers=depth, num_heads=heads,
                                hidden_dim=width, mlp_dim=mlp, num_classes=channels, dropout=dropout,
                                attention_dropout=dropout)
        self.conv_proj, self.class_token, self.encoder = vit.conv_proj, vit.class_token, vit.encoder
        self.process_input = vit._process_input
        self.heads = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, channels))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.process_input(pixels)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 1:]).transpose(1, 2)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1 conv projections), plus the input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))   # [B, HW, C]
        out = torch.softmax(q @ k.transpose(1, 2) * c ** -0.5, dim=-1) @ v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvDecoder(nn.Module):
    """The latent-diffusion decoder: conv_in, a middle ResNet-attention-ResNet, then per level (lowest resolution
    first) `res_blocks + 1` ResNet blocks (each followed by attention at the resolutions in `attn`) and an upsampling,
    then GroupNorm, SiLU and conv_out to RGB. `up[i]` is level i (0: full resolution), as in its state dicts."""

    def __init__(self, latent_channels: int, grid: int, channels: int, mult, res_blocks: int, attn, groups: int):
        super().__init__()
        levels = len(mult)
        width = channels * mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(width, width, groups), AttnBlock(width, groups)
        self.mid.block_2 = ResnetBlock(width, width, groups)
        ups, size = [], grid
        for level in reversed(range(levels)):
            up, out = nn.Module(), channels * mult[level]
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(res_blocks + 1):
                up.block.append(ResnetBlock(width, out, groups))
                width = out
                if size in attn:
                    up.attn.append(AttnBlock(width, groups))
            if level:
                up.upsample, size = Upsample(width), size * 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = _norm(width, groups), nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ResidualAutoencoder(nn.Module):
    """The trained parts of the latent (residual ViT, mask token, decoder) and the latent's per-channel statistics.

    `latent(tokens, images)` builds z from the frozen teacher's tokens [B, g*g, D] and the images in [-1, 1];
    `decode(z)` maps it back to images; `to_state` / `from_state` standardise each channel for the diffusion model.
    """

    def __init__(self, recipe, image_size: int, grid: int, teacher_dim: int):
        super().__init__()
        r = recipe
        self.grid, self.teacher_dim, self.channels = grid, teacher_dim, teacher_dim + r.residual_channels
        self.mask_ratio, self.match_residual = r.mask_ratio, r.match_residual
        self.residual = ResidualViT(image_size, image_size // grid, r.residual_width, r.residual_depth,
                                    r.residual_heads, r.residual_mlp, r.residual_channels, r.residual_dropout)
        self.mask_token = nn.Parameter(torch.randn(1, r.residual_channels, 1) * 0.02)
        self.decoder = ConvDecoder(self.channels, grid, r.decoder_channels, list(r.decoder_mult),
                                   r.decoder_res_blocks, list(r.decoder_attn), r.decoder_groups)
        self.register_buffer("latent_mean", torch.zeros(1, self.channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, self.channels, 1, 1))

    def residual_channels(self, images: Tensor, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """[B, c, N]: the residual ViT on the ImageNet-normalised images; the mask token for images where `mask`
        (drawn with p = mask_ratio when training and not given); then matched to the teacher's h [B, D, N]."""
        r = self.residual(imagenet_pixels(images))
        if mask is None and self.training and self.mask_ratio > 0:
            mask = torch.rand(r.shape[0], device=r.device) < self.mask_ratio
        if mask is not None:
            m = mask.to(r.dtype).view(-1, 1, 1)
            r = r * (1 - m) + self.mask_token.expand_as(r) * m
        return match_distribution(h, r) if self.match_residual else r

    def latent(self, tokens: Tensor, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """z = [h ; r] on the g x g grid, [B, D + c, g, g] (tokens row-major, as every teacher emits them)."""
        h = tokens.float().transpose(1, 2)
        z = torch.cat([h, self.residual_channels(images, h, mask)], dim=1)
        return z.reshape(z.shape[0], self.channels, self.grid, self.grid)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def to_state(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def from_state(self, state: Tensor) -> Tensor:
        return state * self.latent_std + self.latent_mean


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, scale: float) -> Tensor:
    """scale * ||d rec / d W|| / (||d g / d W|| + 1e-4), clamped to [0, 1e4] and detached, W the decoder's last
    layer: the GAN's gradient at the output brought to the reconstruction's size (VQGAN's adaptive weight)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale


# ---------------------------------------------------------------- training and the cache
def recipe_dict(recipe) -> dict:
    """The recipe's fields (from the dataclass or a method's config section) as plain values."""
    values = {name: getattr(recipe, name) for name in ResidualAutoencoderRecipe.__dataclass_fields__}
    return {k: v if isinstance(v, (bool, int, float, str)) else list(v) for k, v in values.items()}


def autoencoder_key(recipe, teacher_identity: dict, data_identity: dict) -> str:
    from zoo.cache import fingerprint

    trained = {k: v for k, v in recipe_dict(recipe).items() if k != "lpips_weights"}
    return fingerprint({"recipe": trained, "lpips": bool(recipe.lpips_weights), "teacher": teacher_identity,
                        "data": data_identity, "format": AUTOENCODER_FORMAT})


def psnr(recon: Tensor, images: Tensor) -> float:
    """10 log10(peak^2 / MSE) for images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / F.mse_loss(recon.clamp(-1, 1), images)))


@torch.no_grad()
def latent_statistics(ae: ResidualAutoencoder, teacher, images: Tensor, batch_size: int = 250) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of z over `images` (eval mode: no mask, no dropout), all tokens pooled."""
    ae.eval()
    z = torch.cat([ae.latent(teacher(x), x) for x in images.split(batch_size)])
    return z.mean(dim=(0, 2, 3)).view(1, -1, 1, 1), z.std(dim=(0, 2, 3)).view(1, -1, 1, 1)


@torch.no_grad()
def reconstruction_psnr(ae: ResidualAutoencoder, teacher, images: Tensor, batch_size: int = 250) -> float:
    ae.eval()
    recon = torch.cat([ae.decode(ae.latent(teacher(x), x)) for x in images.split(batch_size)])
    return psnr(recon, images)


def train_residual_autoencoder(recipe, teacher, data_cfg, image_size: int, grid: int, path, identity: dict,
                               device="cpu", progress: bool = True) -> Path:
    """Adam (betas 0.5, 0.9) on the residual ViT, the mask token and the decoder: L = |x^ - x|_1 (mean) +
    perceptual_weight * LPIPS(x^, x), plus from step gan_start the hinge PatchGAN's generator term on the adaptive
    weight (the discriminator updated after each step, same optimizer settings); the teacher stays frozen. Then the latent's per-channel statistics on the
    training images and the reconstruction PSNR on held-out ones; saved atomically with its recipe."""
    from tqdm import tqdm

    from zoo.data import gather, shapes_split, subset_index, training_images
    from zoo.training.checkpoint import atomic_save

    r = recipe
    dataset = training_images(data_cfg, r.ae_num_images)
    torch.manual_seed(r.ae_seed)
    ae = ResidualAutoencoder(r, image_size, grid, teacher.dim).to(device)
    lpips = None
    if r.perceptual_weight > 0:
        if not r.lpips_weights:
            raise ConfigError("perceptual_weight > 0 needs lpips_weights: a folder with LPIPS-VGG's weights "
                              "(zoo/latents/lpips.py), or perceptual_weight=0")
        from zoo.latents.lpips import load_lpips

        lpips = load_lpips(r.lpips_weights).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=r.ae_lr, betas=(r.ae_beta1, r.ae_beta2))
    disc = disc_opt = None
    if r.gan_weight > 0:
        disc = PatchDiscriminator(r.disc_channels, r.disc_layers).to(device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=r.ae_lr, betas=(r.ae_beta1, r.ae_beta2))
    gen, start = torch.Generator().manual_seed(r.ae_seed), time.perf_counter()
    bar = tqdm(range(r.ae_steps), desc="residual autoencoder", unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    ae.train()
    for step in bar:
        index = torch.randint(len(dataset), (r.ae_batch_size,), generator=gen)
        images = gather(dataset, index, torch.rand(r.ae_batch_size, generator=gen) < 0.5)["image"].to(device)
        recon = ae.decode(ae.latent(teacher(images), images))
        l1 = (recon - images).abs().mean()
        rec = l1 + (r.perceptual_weight * lpips(recon, images).mean() if lpips is not None else 0.0)
        gan_on = disc is not None and step >= r.gan_start
        loss = rec
        if gan_on:  # the generator's term: -D(x^), on the adaptive scale
            g_loss = -disc(recon).mean()
            loss = rec + adaptive_gan_weight(rec, g_loss, ae.decoder.conv_out.weight, r.gan_weight) * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_on:  # then the discriminator, on the same images and the detached reconstructions
            disc_opt.zero_grad(set_to_none=True)
            hinge_loss(disc(images), disc(recon.detach())).backward()
            disc_opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", refresh=False)
    bar.close()
    index = subset_index(len(dataset), r.ae_stats_images)
    train_images = gather(dataset, index)["image"]
    mean, std = latent_statistics(ae, teacher, train_images.to(device))
    ae.latent_mean.copy_(mean)
    ae.latent_std.copy_(std.clamp_min(1e-6))
    record = {"train_seconds": round(time.perf_counter() - start, 1), "final_l1": l1.item()}
    if data_cfg.dataset == "shapes":
        held_out = shapes_split(data_cfg, reference=True, num_images=min(1000, r.ae_stats_images))
        images = gather(held_out, torch.arange(len(held_out)))["image"]
        record["held_out_psnr"] = reconstruction_psnr(ae, teacher, images.to(device))
    record["train_psnr"] = reconstruction_psnr(ae, teacher, train_images[:1000].to(device))
    path = Path(path)
    atomic_save({"format": AUTOENCODER_FORMAT, "recipe": recipe_dict(r), "identity": identity,
                 "shape": {"image_size": image_size, "grid": grid, "teacher_dim": teacher.dim},
                 "weights": {k: v.cpu() for k, v in ae.state_dict().items()}, **record}, path)
    return path


def load_residual_autoencoder(path, make: str) -> tuple[ResidualAutoencoder, dict]:
    """(the autoencoder in eval mode, frozen; its record without the weights)."""
    from zoo.training.checkpoint import load_artifact

    state = load_artifact(path, AUTOENCODER_FORMAT, "residual autoencoder weights", make)
    recipe = ResidualAutoencoderRecipe(**state["recipe"])
    shape = state["shape"]
    ae = ResidualAutoencoder(recipe, shape["image_size"], shape["grid"], shape["teacher_dim"])
    ae.load_state_dict(state.pop("weights"))
    return ae.eval().requires_grad_(False), state


def ensure_residual_autoencoder(path: Path, train, progress_note: str) -> Path:
    """The cached autoencoder at `path`, trained first (`train(path)`) when it is not there yet."""
    if not Path(path).exists():
        print(progress_note.format(path=path), file=sys.stderr)
        with caller_random_state():
            train(path)
    return Path(path)
