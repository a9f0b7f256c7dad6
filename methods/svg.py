"""SVG: latent diffusion without a VAE, on a frozen teacher's features plus residual channels (Shi et al., 2025).
See docs/methods/svg.md.

    latent     z = [h ; match(h, R(x))]      h: the frozen teacher's patch tokens (D channels on the g x g grid),
                                             R: a small trained ViT adding c channels of detail (zoo/latents/
                                             residual_autoencoder.py), decoded by a trained conv decoder
    state      x = (z - mu) / sigma          per channel, over the training set (`feature_norm`)
    training   t = shift(u, s_train), u ~ U(0, 1); x_t = (1 - t) x + t eps; L = || v(x_t, t, y) - (eps - x) ||^2
    sampling   Euler on the grid shift(tau_i, s_sample), CFG; images = Dec(sigma x_0 + mu)

    shift(t, s) = t / (s + (1 - s) t)        the official shift s (< 1: more time near noise) in the zoo's time
                                             (t = 1 is noise); SVG trains with s = 0.4 and samples with s = 0.15

The autoencoder (residual ViT + decoder) is trained once, before the diffusion model and without it, on the run's
data and teacher, and cached (`zoo prepare svg-autoencoder`, or on first use); it is frozen and
lives on the method, like a VAE: `encode` and `decode` are the seams. The backbone is the zoo's SiT at patch 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from zoo.cache import cache_dir
from zoo.data import data_identity
from zoo.errors import ConfigError
from zoo.flow.samplers import AdaptiveODE, EulerODE, HeunODE, time_grid
from zoo.latents.residual_autoencoder import (ResidualAutoencoderRecipe, autoencoder_key, check_recipe,
                                              ensure_residual_autoencoder, load_residual_autoencoder,
                                              train_residual_autoencoder)
from zoo.teachers import build_encoders, require_one_encoder
from zoo.teachers.teacher import Teacher, TeacherOptions
from zoo.training.method import Method
from zoo.training.registry import register

PREPARE_COMMAND = "zoo prepare svg-autoencoder"


@dataclass
class SVGConfig(ResidualAutoencoderRecipe, TeacherOptions):  # exactly one encoder; the paper: DINOv3 ViT-S/16+
    downsample: int = 16            # image pixels per latent token side: the teacher's and the residual ViT's patch
    feature_norm: bool = True       # standardise every latent channel by its training-set mean and std
    train_shift: float = 0.4        # s of the training times (official `shift`); 1: uniform t
    sample_shift: float = 0.15      # s of the sampling grid (official `timestep_shift` of sample_svg.py); 1: none
    autoencoder: str = ""           # a trained autoencoder file; "": the cache, keyed by recipe, teacher and data


def shift_time(t: Tensor, s: float) -> Tensor:
    """t' = t / (s + (1 - s) t): SVG's rational shift s t / (1 + (s - 1) t) of the data-time 1 - t, as the zoo's t."""
    return t / (s + (1 - s) * t)


def shift_rate(t: Tensor, s: float) -> Tensor:
    """d shift_time / dt = s / (s + (1 - s) t)^2."""
    return s / (s + (1 - s) * t) ** 2


def shifted_field(field, sampler, s: float):
    """The field that makes `sampler`, stepping on its own grid tau, step on the shifted grid t = shift_time(tau, s).

    Euler and Heun: at step i the model runs at t = shift(tau) and its velocity is scaled by (t_{i+1} - t_i) /
    (tau_{i+1} - tau_i), so x + dtau * field = x + dt * v: exactly the official Euler on the shifted grid (Heun's
    corrector, at tau_{i+1}, is evaluated at t_{i+1}). dopri5 integrates the same ODE in tau (scaled by dt/dtau).
    The SDE integrates on its own grid: its diffusion and score are functions of t, so no shift applies.
    """
    if s == 1 or not isinstance(sampler, (EulerODE, HeunODE, AdaptiveODE)):
        return field
    if isinstance(sampler, AdaptiveODE):
        def continuous(x, tau, step, guide_at=None):
            v = field(x, shift_time(tau, s), step, guide_at=None if guide_at is None else shift_time(guide_at, s))
            return v * shift_rate(tau, s).to(v.dtype).view(-1, *[1] * (v.dim() - 1))

        return continuous
    taus = time_grid(sampler.steps, sampler.last_step)
    ts = shift_time(taus, s)
    ratio = (ts[1:] - ts[:-1]) / (taus[1:] - taus[:-1])

    def stepped(x, tau, step, guide_at=None):
        v = field(x, shift_time(tau, s), step, guide_at=None if guide_at is None else shift_time(guide_at, s))
        return v * float(ratio[step])

    return stepped


@register
class SVG(Method):
    name = "svg"
    description = "SVG: diffusion on a frozen teacher's features plus trained residual channels, no VAE"
    config_class = SVGConfig
    config_file = Path(__file__).resolve().parents[1] / "configs" / "svg.yaml"
    prepare_targets = {"svg-autoencoder": "train SVG's residual encoder and decoder on a preset's data and teacher"}

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        o = self.options
        if cfg.data.vae:
            raise ConfigError(f"data.vae={cfg.data.vae!r}: svg diffuses its own latent (teacher tokens and residual "
                              "channels, decoded by its own decoder); set data.vae=''")
        require_one_encoder("svg", o.encoder, "SVG's latent holds the tokens of")
        size = data_info.image_size
        if o.downsample < 1 or size % o.downsample:
            raise ConfigError(f"svg.downsample={o.downsample} must divide data.image_size={size}")
        for key in ("train_shift", "sample_shift"):
            if not getattr(o, key) > 0:
                raise ConfigError(f"svg.{key}={getattr(o, key)} must be > 0 (1: no shift)")
        check_recipe(o, size, self.grid(), self.name)
        self.teacher = Teacher(o, cfg, grid=self.grid(), owner=self.name)
        self.autoencoder = None

    def grid(self) -> int:
        return self.data.image_size // self.options.downsample

    def state_shape(self) -> tuple:
        """[h ; r]: the teacher's D channels and the c residual ones, on the g x g token grid."""
        return (self.teacher.dims()[0] + self.options.residual_channels, self.grid(), self.grid())

    # ---------------------------------------------------------------- the latent space
    def setup(self, device, training: bool = True) -> None:
        super().setup(device, training)
        self.teacher.setup(self.device, training)       # training only: sampling decodes, it never encodes
        self.autoencoder = self.load_autoencoder()

    def _encoder(self):
        """The teacher's encoder (loaded by `setup` when training; built here for the cache key otherwise)."""
        if self.teacher.encoders:
            return self.teacher.encoders[0]
        return build_encoders(self.options.encoder, self.options.encoder_weights, grid=self.grid(), cfg=self.cfg,
                              device=self.device)[0]

    def autoencoder_path(self, encoder) -> Path:
        if self.options.autoencoder:
            return Path(self.options.autoencoder).expanduser()
        key = autoencoder_key(self.options, {**encoder.identity(), "latent_grid": self.grid()}, data_identity(self.cfg.data))
        return cache_dir("svg") / f"autoencoder-{key}.pt"

    def prepare_autoencoder(self, retrain: bool = False) -> Path:
        """The autoencoder's file: trained first when missing or `retrain` (`zoo prepare svg-autoencoder`), on the
        training images, through the frozen teacher."""
        encoder = self._encoder()
        path = self.autoencoder_path(encoder)

        def train(target):
            train_residual_autoencoder(self.options, encoder, self.cfg.data, self.data.image_size, self.grid(),
                                       target, {"encoder": encoder.identity()}, self.device)

        if retrain:
            train(path)
        return ensure_residual_autoencoder(path, train, "training SVG's residual encoder and decoder for this teacher "
                                                        "and data once; it is cached at {path}")

    def prepare(self, target: str, args) -> int:
        """`zoo prepare svg-autoencoder`: train the autoencoder once (cached, or at --out) and print its PSNR."""
        import shutil

        self.device = torch.device(args.device)
        path = self.prepare_autoencoder(retrain=args.force)
        if args.out:
            shutil.copyfile(path, args.out)  # the cache's file, so svg.autoencoder=OUT uses the same weights
        record = torch.load(path, map_location="cpu", weights_only=True)
        c, g, _ = self.state_shape()
        held_out = f"{record['held_out_psnr']:.2f} dB on 1000 held-out images, " if "held_out_psnr" in record else ""
        print(f"svg autoencoder: {args.out or path}\nlatent {c}x{g}x{g}; reconstruction PSNR {held_out}"
              f"{record['train_psnr']:.2f} dB on training images; trained {record['recipe']['ae_steps']} steps in "
              f"{record['train_seconds']:.0f} s")
        return 0

    def load_autoencoder(self):
        path = self.prepare_autoencoder()
        ae, _ = load_residual_autoencoder(path, PREPARE_COMMAND)
        if ae.channels != self.state_shape()[0] or ae.grid != self.grid():
            raise ConfigError(f"the autoencoder in {path} makes {ae.channels}x{ae.grid}x{ae.grid} latents, but this "
                              f"config needs {'x'.join(map(str, self.state_shape()))}: train it for this config "
                              f"(`{PREPARE_COMMAND}`)")
        return ae.to(self.device)

    def encode(self, model, batch: dict) -> Tensor:
        """The clean state: the frozen teacher's tokens (cached or computed now) and the frozen residual encoder's
        channels of the images (eval mode: no mask token, no dropout, as the official diffusion training), then
        standardised per channel."""
        with torch.no_grad():
            tokens = self.teacher.tokens(batch)[0]
            z = self.autoencoder.latent(tokens, batch["image"].to(self.device))
            return self.autoencoder.to_state(z) if self.options.feature_norm else z

    def decode(self, model, state: Tensor) -> Tensor:
        z = self.autoencoder.from_state(state) if self.options.feature_norm else state
        return self.autoencoder.decode(z.float())

    # ---------------------------------------------------------------- time shifts
    def used(self) -> dict:
        c, g, _ = self.state_shape()
        return {**super().used(), "time": f"{self.cfg.flow.time}, shifted ({self.options.train_shift:g})",
                "space": f"teacher tokens + {self.options.residual_channels} residual channels ({c} x {g} x {g}), "
                         "decoded by a trained conv decoder"}

    def sample_time(self, n: int, device) -> Tensor:
        """SVG's training times: the configured sampler's t (uniform officially), shifted by train_shift."""
        return shift_time(super().sample_time(n, device), self.options.train_shift)

    def velocity_field(self, model, labels, guidance, sampler=None, **options):
        field = super().velocity_field(model, labels, guidance, sampler=sampler, **options)
        return shifted_field(field, sampler, self.options.sample_shift)

    # ---------------------------------------------------------------- official weights
    def from_official(self, official: dict) -> tuple[dict, list]:
        """SVG's DiT: its token embedding `ln1` (a Linear on each token's D + c channels) is the zoo's patch-1
        convolution; the rest are SiT's keys (learn_sigma's half of the output dropped)."""
        renamed = dict(official)
        if "ln1.weight" in renamed:
            weight = renamed.pop("ln1.weight")
            renamed["x_embedder.proj.weight"] = weight[:, :, None, None]
            renamed["x_embedder.proj.bias"] = renamed.pop("ln1.bias")
        return super().from_official(renamed)
