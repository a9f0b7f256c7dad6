"""Latent diffusion: a VAE between images and the diffusion state, for any method.

`data.vae` picks it: "" (pixel space, the default), `builtin` (a small VAE the zoo trains once on the
run's data, `zoo prepare vae`), or a local folder in diffusers' `AutoencoderKL` layout (SD-VAE:
`stabilityai/sd-vae-ft-ema`). The diffusion state is `(z - shift) * scale` for a posterior sample
`z`, as latent diffusion trains (SD-VAE: scale 0.18215, shift 0); the built-in VAE stores the scale
that gives its latents unit variance. Both are diffusers `AutoencoderKL`s, saved and loaded the same
way, so a tuned VAE (REPA-E) exports to the format every other tool reads.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.cache import cache_dir, caller_random_state, fingerprint, weights_identity
from zoo.config import to_dict
from zoo.data import data_identity, gather, subset_index, training_images
from zoo.errors import CheckpointError, ConfigError, MissingWeightsError
from zoo.training.helper_lr import warmup_cosine

SD_VAE_FETCH = "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {path}"


def builtin_autoencoder(recipe, image_channels: int = 3):
    """The built-in VAE's architecture: diffusers' AutoencoderKL, downsampling 2^(len(channels) - 1) times."""
    from diffusers import AutoencoderKL

    channels = tuple(recipe.channels)
    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                         layers_per_block=recipe.layers_per_block, latent_channels=recipe.latent_channels,
                         norm_num_groups=min(16, channels[0]), mid_block_add_attention=False)


class VAE(nn.Module):
    """Images in [-1, 1] <-> diffusion states `(z - shift) * scale`. Trainable or frozen, as its owner decides.

    The shift and scale are the config's `shift_factor` / `scaling_factor`, or per channel its
    `latents_mean` / `latents_std` when present (as a VAE tuned by REPA-E is exported, with its BN statistics).
    """

    def __init__(self, autoencoder, source: str = ""):
        super().__init__()
        self.autoencoder, self.source = autoencoder, source
        cfg = autoencoder.config
        self.latent_channels = cfg.latent_channels
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            shift, scale = torch.tensor(cfg.latents_mean), 1 / torch.tensor(cfg.latents_std)
        else:
            shift, scale = torch.tensor([float(cfg.shift_factor or 0.0)]), torch.tensor([float(cfg.scaling_factor)])
        self.register_buffer("shift", shift.float().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", scale.float().view(1, -1, 1, 1), persistent=False)

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of q(z | x), unscaled."""
        dist = self.autoencoder.encode(images).latent_dist
        return dist.mean, dist.std

    def to_state(self, z: Tensor) -> Tensor:
        return (z - self.shift) * self.scale

    def encode(self, images: Tensor) -> Tensor:
        """A fresh posterior sample of each image, as a diffusion state."""
        mean, std = self.posterior(images)
        return self.to_state(mean + std * torch.randn_like(std))

    def decode_latent(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z).sample

    def decode(self, state: Tensor) -> Tensor:
        return self.decode_latent(state / self.scale + self.shift)


class PosteriorMoments(nn.Module):
    """A frozen VAE's posterior (mean, std) of images, laid out as the feature cache holds teacher tokens:
    [B, 2C, h*w] (zoo/teachers/feature_cache.py builds, stores and looks them up)."""

    name = "vae"

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def identity(self) -> dict:
        """The VAE's folder and its weights' size and time: a VAE retrained in place gets a new cache."""
        folder = Path(self.vae.source)
        files = sorted(folder.glob("diffusion_pytorch_model.*")) if folder.is_dir() else []
        return {"vae": str(folder.resolve()), "weights": [weights_identity(f) for f in files]}

    def forward(self, images: Tensor) -> Tensor:
        mean, std = self.vae.posterior(images)
        return torch.cat([mean, std], 1).flatten(2)


class LatentMomentsCache:
    """`moments(index, flip)` -> the cached posterior (mean, std) [B, C, h, w] of those training images."""

    def __init__(self, features, latent_channels: int, side: int):
        self.features, self.channels, self.side = features, latent_channels, side

    def moments(self, index: Tensor, flip: Tensor, device) -> tuple[Tensor, Tensor]:
        both = self.features.lookup(index, flip).to(device)
        both = both.view(len(index), 2 * self.channels, self.side, self.side)
        return both[:, :self.channels], both[:, self.channels:]


def latent_moments_cache(vae: VAE, cfg):
    """The posterior moments of every training image, unflipped and flipped, in float16 as a prepared store keeps
    them (built once, then memory-mapped); None where the data is not held in memory (an image folder)."""
    from zoo.data import build_dataset
    from zoo.teachers.feature_cache import cacheable, load_or_build

    dataset = build_dataset(cfg.data)
    if not cacheable(dataset):
        return None
    _, side, _ = latent_shape(cfg)
    return LatentMomentsCache(load_or_build(PosteriorMoments(vae), cfg.data, dataset), vae.latent_channels, side)


def _read_folder_config(path: Path) -> dict:
    config = path / "config.json"
    if not config.exists():
        raise MissingWeightsError("VAE (diffusers AutoencoderKL folder with config.json)", path,
                                  SD_VAE_FETCH.format(path=path))
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"VAE config {config} is corrupt: {exc}") from None


def latent_shape(cfg, name: str | None = None) -> tuple:
    """(C, h, w) of one diffusion state with the VAE `name` (default: data.vae), without loading any weights."""
    name = cfg.data.vae if name is None else name
    size = cfg.data.image_size
    if not name:
        return (3, size, size)
    if name == "builtin":
        channels, depth = cfg.autoencoder.latent_channels, len(cfg.autoencoder.channels)
    else:
        config = _read_folder_config(Path(name).expanduser())
        channels, depth = config["latent_channels"], len(config["block_out_channels"])
    factor = 2 ** (depth - 1)
    if size % factor:
        raise ConfigError(f"data.image_size={size} is not divisible by the VAE's downsampling factor {factor}")
    return (channels, size // factor, size // factor)


def vae_architecture(cfg, name: str) -> VAE:
    """The VAE `name` with fresh weights, from its recipe or config.json alone (to build a model before loading)."""
    from diffusers import AutoencoderKL

    if name == "builtin":
        return VAE(builtin_autoencoder(cfg.autoencoder))
    return VAE(AutoencoderKL.from_config(_read_folder_config(Path(name).expanduser())))


def load_vae(cfg, name: str | None = None, progress: bool = True) -> VAE:
    """The VAE `name` (default: data.vae): the built-in one (trained first if absent) or a diffusers folder."""
    from diffusers import AutoencoderKL

    name = cfg.data.vae if name is None else name
    path = ensure_builtin_vae(cfg, progress) if name == "builtin" else Path(name).expanduser()
    _read_folder_config(path)
    try:
        net = AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the VAE in {path}: {str(exc).splitlines()[0][:300]}") from None
    vae = VAE(net, str(path))
    if cfg.data.dataset == "prepared" and name == cfg.data.vae:
        from zoo.data.store import check_store_vae

        check_store_vae(cfg.data.root, vae)
    return vae


# ---------------------------------------------------------------- the built-in VAE
def builtin_vae_dir(cfg) -> Path:
    recipe = to_dict(cfg.autoencoder)
    if recipe["perceptual_weight"]:  # the term's network is part of the recipe
        from zoo.teachers.builtin import teacher_key

        recipe["perceptual_teacher"] = teacher_key(cfg.data, cfg.teacher)
    else:  # (a key only when on: the VAEs cached before the term keep theirs)
        del recipe["perceptual_weight"]
    key = fingerprint({"vae": recipe, "data": data_identity(cfg.data), "format": 1})
    return cache_dir("vae") / f"vae-{key}"


def ensure_builtin_vae(cfg, progress: bool = True) -> Path:
    path = builtin_vae_dir(cfg)
    if not (path / "config.json").exists():
        print(f"training the built-in VAE for this data once; it is cached at {path}", file=sys.stderr)
        with caller_random_state():
            train_builtin_vae(cfg, path, progress)
    return path


def kl_to_standard_normal(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(0, I)), summed over latent dimensions, averaged over the batch."""
    var = std.pow(2)
    return 0.5 * (mean.pow(2) + var - 1 - var.clamp_min(1e-12).log()).flatten(1).sum(1).mean()


def train_builtin_vae(cfg, path, progress: bool = True) -> Path:
    """L1 + perceptual_weight * perceptual + kl_weight * KL, AdamW with warm-up and cosine decay; then the latent scale.

    The perceptual term is LPIPS's form on the built-in teacher's features (zoo/latents/perceptual.py): VGG,
    which LPIPS needs, cannot be downloaded here, and knows nothing of the built-in data. No GAN. The scale written
    into the folder's config is 1 / std of the posterior means of the training images, so diffusion states have
    unit variance. zoo_vae.json records the reconstruction of held-out images (the shapes' reference split; a
    seeded subset of an image folder) in L1 and PSNR.
    """
    from tqdm import tqdm

    r = cfg.autoencoder
    dataset = training_images(cfg.data, r.num_images)
    perceptual = None
    if r.perceptual_weight:
        from zoo.latents.perceptual import builtin_perceptual

        perceptual = builtin_perceptual(cfg, progress)
    torch.manual_seed(r.seed)
    net = builtin_autoencoder(r)
    opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=0.0)
    gen, start = torch.Generator().manual_seed(r.seed), time.perf_counter()
    bar = tqdm(range(r.steps), desc="vae", unit="step", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = r.lr * warmup_cosine(step, r.steps)
        index = torch.randint(len(dataset), (r.batch_size,), generator=gen)
        images = gather(dataset, index, torch.rand(r.batch_size, generator=gen) < 0.5)["image"]
        dist = net.encode(images).latent_dist
        recon = net.decode(dist.sample()).sample
        l1 = (recon - images).abs().mean()
        loss = l1 + r.kl_weight * kl_to_standard_normal(dist.mean, dist.std)
        if perceptual is not None:
            loss = loss + r.perceptual_weight * perceptual(recon, images).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", refresh=False)
    bar.close()
    net.eval()
    with torch.no_grad():
        index = subset_index(len(dataset), 1000)  # not the leading images: an image folder is sorted by class
        probe = gather(dataset, index)
        means = torch.cat([net.encode(x).latent_dist.mean for x in probe["image"].split(250)])
    net.register_to_config(scaling_factor=float(1.0 / means.std()), shift_factor=float(means.mean()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    net.save_pretrained(tmp)
    (tmp / "zoo_vae.json").write_text(json.dumps({
        "recipe": to_dict(r), "data": data_identity(cfg.data), "train_seconds": round(time.perf_counter() - start, 1),
        **reconstruction_quality(net, cfg.data, min(1000, len(dataset)))}, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # the folder appears whole or not at all
    return path


@torch.no_grad()
def reconstruction_quality(autoencoder, data_cfg, num: int) -> dict:
    """L1 and PSNR (images in [-1, 1], peak-to-peak 2) of decoding the posterior means of `num` held-out images."""
    from zoo.eval.reference import reference_images

    images = reference_images(data_cfg, num)[0].float() / 127.5 - 1
    recon = torch.cat([autoencoder.decode(autoencoder.encode(x).latent_dist.mean).sample for x in images.split(250)])
    return {"reconstruction_images": len(images), "reconstruction_l1": float((recon - images).abs().mean()),
            "reconstruction_psnr": float(10 * torch.log10(4 / F.mse_loss(recon, images)))}
