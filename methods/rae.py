"""RAE: diffusion transformers in the latent space of a representation autoencoder (Zheng et al., 2025).
See docs/methods/rae.md.

    latent     z = (y - mu) / sqrt(var + 1e-5)     y: the frozen encoder's raw patch tokens [N, D], laid out [D, g, g];
                                                    mu, var per position and channel (zoo/latents/token_decoder.py)
    decoder    a ViT trained once on noised tokens y + tau U eps -> pixels (L1), `zoo prepare rae-decoder`
    backbone   DiT^DH: a DiT of width W, then a wide, shallow DDT head of width W_h >= D (zoo/backbones/ddt_head.py)
    time       alpha = sqrt(D g^2 / base), base 4096;  t -> alpha t / (1 + (alpha - 1) t)
               applied to every training t (logit-normal truncated to [0, 0.999]) and to the sampling grid
               t_k = shift(t_min + (1 - t_min) u_k), u_k uniform from 1 to 0, t_min = 0.001
    loss       L = || v_theta(z_t, t, y) - (eps - z) ||^2          (plain flow matching in the latent)

The method holds the teacher (`Teacher`, with its token cache) and the frozen `TokenLatents`; it plugs them into
the latent-diffusion seam of `Method` through its own `encode`, `state_shape` and `decode`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from zoo.data import build_dataset, data_identity, gather, shapes_split, subset_index
from zoo.errors import ConfigError
from zoo.flow.guidance import guided
from zoo.flow.samplers import AdaptiveODE, EulerODE, HeunODE, time_grid
from zoo.teachers import build_encoders, encoder_dims, require_one_encoder
from zoo.teachers.teacher import Teacher, TeacherOptions
from zoo.training.method import Method
from zoo.training.registry import register

DECODER_COMMAND = "zoo prepare rae-decoder"


@dataclass
class RAEConfig(TeacherOptions):
    """RAE's options, at cfg.rae; the defaults are the paper's (DINOv2-B with registers, DiT^DH-XL, ViT-XL decoder)."""
    grid: int = 16                  # g: the encoder's token grid (DINOv2 at 224 px: 16); the state is [D, g, g]
    head_width: int = 2048          # W_h, the DDT head's width (must be >= the token width D)
    head_depth: int = 2
    head_heads: int = 16
    shift_base: float = 4096.0      # alpha = sqrt(D g^2 / shift_base)
    time_max: float = 0.999         # training t is drawn in [0, time_max] before the shift (RAE: 1 - 1/1000)
    sample_t_min: float = 0.001     # the sampling grid ends at shift(t_min)
    decoder: str = ""               # a decoder file from `zoo prepare rae-decoder --out`; "": the cache
    decoder_width: int = 1152       # the decoder ViT (RAE's ViT-XL: 1152 wide, 28 layers, 16 heads, MLP 4096)
    decoder_depth: int = 28
    decoder_heads: int = 16
    decoder_mlp: int = 4096
    noise_tau: float = 0.8          # tau: the decoder is trained on y + tau U eps
    decoder_steps: int = 40000      # RAE: 16 epochs of ImageNet at batch 512
    decoder_batch_size: int = 512
    decoder_lr: float = 2.0e-4      # AdamW betas (0.9, 0.95), no weight decay; warm-up 1/16, cosine to final_lr
    decoder_final_lr: float = 2.0e-5
    decoder_ema: float = 0.9978     # the decoder that is kept is the EMA
    decoder_seed: int = 0
    stats_momentum: float = 0.1     # RAE's running estimate of the latent statistics; 0: the exact mean and variance
    stats_batches: int = 5000       # batches of the training set they are estimated on (RAE: one pass, 5000 x 256)
    stats_batch_size: int = 256
    held_out_images: int = 1000     # images the decoder never saw, scored by PSNR after training


def time_shift(t: Tensor, alpha: float) -> Tensor:
    """RAE's dimension-dependent shift alpha t / (1 + (alpha - 1) t): alpha > 1 moves t towards noise (t = 1)."""
    return alpha * t / (1 + (alpha - 1) * t)


def time_shift_rate(t: Tensor, alpha: float) -> Tensor:
    """d shift / d t = alpha / (1 + (alpha - 1) t)^2."""
    return alpha / (1 + (alpha - 1) * t) ** 2


def truncated_logit_normal(n: int, mean: float, std: float, low: float, high: float, device=None) -> Tensor:
    """t = sigmoid(Z), Z ~ N(mean, std^2) truncated to logit([low, high]), by the inverse CDF of one uniform draw
    (RAE's `truncated_logitnormal_sample`, in float32 as there)."""
    mu, sigma = torch.as_tensor(mean), torch.as_tensor(std)
    base = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(sigma))
    cdf_low = base.cdf((torch.logit(torch.as_tensor(low)) - mu) / sigma)
    cdf_high = base.cdf((torch.logit(torch.as_tensor(high)) - mu) / sigma)
    u = cdf_low + (cdf_high - cdf_low) * torch.rand(n).clamp_(0, 1)
    return torch.sigmoid(mu + sigma * base.icdf(u)).clamp(low, high).to(device)


def shifted_field(velocity: Callable, sampler, alpha: float, t_min: float) -> Callable:
    """The field a zoo sampler integrates over its uniform grid u so that it steps on RAE's grid t = warp(u),
    warp(u) = shift(t_min + (1 - t_min) u).

    `velocity(x, t, guide_at)` is the model's (guided) velocity at the true time t. A fixed-grid sampler (Euler,
    Heun) gets v * (warp(u_{i+1}) - warp(u_i)) / (u_{i+1} - u_i) at step i, so its update x + du * field equals
    x + dt * v on the warped grid exactly; the adaptive dopri5 gets v * dwarp/du (the same ODE in u).
    """
    def warp(u):
        return time_shift(t_min + (1 - t_min) * u, alpha)

    grid = None if isinstance(sampler, AdaptiveODE) else time_grid(sampler.steps, sampler.last_step)

    def field(x, u, step, guide_at=None):
        v = velocity(x, warp(u), None if guide_at is None else warp(guide_at))
        if grid is None:
            rate = time_shift_rate(t_min + (1 - t_min) * u, alpha) * (1 - t_min)
        else:
            rate = (warp(grid[step + 1]) - warp(grid[step])) / (grid[step + 1] - grid[step])
        return v * float(rate.flatten()[0])   # one time per call: every sample of the batch shares it

    return field


@register
class RAE(Method):
    name = "rae"
    description = "RAE: diffusion in a frozen encoder's normalised tokens (DiT^DH, shifted t), a trained ViT decoder"
    config_class = RAEConfig
    reads_store_latents = False     # the latent is the encoder's tokens of the store's images, not a VAE's
    prepare_targets = {"rae-decoder": "train RAE's token decoder (and the latent statistics) on a preset's data"}

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        o = self.options
        if cfg.data.vae:
            raise ConfigError(f"data.vae={cfg.data.vae!r}: RAE's latent space is its encoder's tokens (rae.encoder); "
                              "leave data.vae empty")
        require_one_encoder("rae", o.encoder, "RAE diffuses the tokens of")
        if cfg.model.patch != 1:
            raise ConfigError(f"model.patch={cfg.model.patch}: RAE's DiT^DH reads one token per latent position "
                              "(model.patch=1)")
        if o.grid < 1 or cfg.data.image_size % o.grid:
            raise ConfigError(f"rae.grid={o.grid} must divide data.image_size={cfg.data.image_size} (each token is "
                              "decoded to a square block of pixels)")
        if o.head_width < self.token_dim():
            raise ConfigError(f"rae.head_width={o.head_width} is narrower than the encoder's tokens "
                              f"(D = {self.token_dim()}): RAE's head must be at least as wide as D")
        if self.shift() < 1:
            raise ConfigError(f"rae.shift_base={o.shift_base} gives a time shift {self.shift():.3f} < 1 for a "
                              f"{'x'.join(map(str, self.state_shape()))} latent (RAE requires >= 1): lower rae.shift_base")
        if not 0 < o.time_max <= 1 or not 0 <= o.sample_t_min < 1:
            raise ConfigError(f"rae.time_max={o.time_max} must lie in (0, 1] and rae.sample_t_min={o.sample_t_min} "
                              "in [0, 1)")
        if cfg.flow.time not in ("uniform", "logit_normal", "lognormal"):
            raise ConfigError(f"flow.time={cfg.flow.time!r}; valid for rae: uniform, logit_normal")
        self.teacher = Teacher(o, cfg, grid=o.grid, owner=self.name)
        self.latents = None

    # ---------------------------------------------------------------- building
    def token_dim(self) -> int:
        return encoder_dims(self.options.encoder, self.cfg)[0]

    def state_shape(self) -> tuple:
        """[D, g, g]: one normalised token per position of the encoder's grid."""
        return (self.token_dim(), self.options.grid, self.options.grid)

    def used(self) -> dict:
        d, g, _ = self.state_shape()
        return {**super().used(), "time": f"{self.cfg.flow.time}, shifted (alpha {self.shift():.2f})",
                "space": f"the teacher's normalised tokens ({d} x {g} x {g}), decoded by a trained ViT"}

    def shift(self) -> float:
        """alpha = sqrt(D g^2 / shift_base) (RAE: sqrt(768 * 16 * 16 / 4096) = 6.93 for DINOv2-B)."""
        return math.sqrt(math.prod(self.state_shape()) / self.options.shift_base)

    def build_backbone(self):
        from zoo.backbones.ddt_head import DiTDH
        from zoo.backbones.sit import resolve_size

        dims, o = resolve_size(self.cfg.model), self.options
        return DiTDH(input_size=o.grid, in_channels=self.token_dim(), num_classes=self.data.num_classes,
                     head_hidden=o.head_width, head_depth=o.head_depth, head_heads=o.head_heads,
                     mlp_ratio=self.cfg.model.mlp_ratio, **dims)

    def setup(self, device, training: bool = True) -> None:
        super().setup(device, training)
        self.teacher.setup(self.device, training)   # with its token cache: a training step reads cached tokens
        self.latents = self.load_latents().to(self.device)

    # ---------------------------------------------------------------- the latent space
    def decoder_recipe(self) -> dict:
        o = self.options
        return {"width": o.decoder_width, "depth": o.decoder_depth, "heads": o.decoder_heads, "mlp": o.decoder_mlp,
                "noise_tau": o.noise_tau, "steps": o.decoder_steps, "batch_size": o.decoder_batch_size,
                "lr": o.decoder_lr, "final_lr": o.decoder_final_lr, "beta1": 0.9, "beta2": 0.95,
                "ema_decay": o.decoder_ema, "seed": o.decoder_seed, "stats_momentum": o.stats_momentum,
                "stats_batches": o.stats_batches, "stats_batch_size": o.stats_batch_size}

    def _encoder(self):
        if self.teacher.encoders:
            return self.teacher.encoders[0]
        return build_encoders(self.options.encoder, self.options.encoder_weights, grid=self.options.grid,
                              cfg=self.cfg, device=self.device)[0]

    def decoder_identity(self, encoder) -> dict:
        return {"encoder": encoder.identity(), "data": data_identity(self.cfg.data)}

    def decoder_file(self, encoder) -> Path:
        from zoo.latents.token_decoder import decoder_path

        if self.options.decoder:
            return Path(self.options.decoder).expanduser()
        return decoder_path(self.decoder_identity(encoder), self.decoder_recipe(), "rae")

    def load_latents(self, retrain: bool = False, out: Optional[Path] = None):
        """The frozen TokenLatents (statistics + decoder) of this encoder and data: from rae.decoder, or the cache,
        trained first when missing (or `retrain`, or to `out`)."""
        from zoo.latents.token_decoder import ensure_token_decoder, load_token_latents

        encoder = self._encoder()
        path = Path(out) if out else self.decoder_file(encoder)
        if retrain or out:
            self.train_decoder(encoder, path)
        elif not self.options.decoder:   # the cache: trained once, on first use
            ensure_token_decoder(path, lambda: self.train_decoder(encoder, path), "RAE token decoder")
        return load_token_latents(path, self.decoder_identity(encoder), DECODER_COMMAND)[0]

    def train_decoder(self, encoder, path: Path) -> Path:
        from zoo.latents.token_decoder import train_token_decoder

        cfg, o = self.cfg, self.options
        dataset = build_dataset(cfg.data)
        cache = self.teacher.caches[0] if self.teacher.caches and self.teacher.encoders[0] is encoder else None

        def tokens_of(batch):
            if cache is not None:
                return cache.lookup(batch["index"], batch["flip"])
            return encoder(batch["image"].to(self.device)).float().cpu()

        def draw(gen, n):
            index = torch.randint(len(dataset), (n,), generator=gen)
            flip = torch.rand(n, generator=gen) < 0.5 if cfg.data.hflip else torch.zeros(n, dtype=torch.bool)
            batch = gather(dataset, index, flip)
            return batch["image"], tokens_of(batch)

        def held_out():
            if cfg.data.dataset == "shapes":   # the reference split: shapes the decoder was never trained on
                images = shapes_split(cfg.data, reference=True, num_images=o.held_out_images)
                for index in torch.arange(len(images)).split(250):
                    batch = gather(images, index)
                    yield batch["image"], encoder(batch["image"].to(self.device)).float().cpu()
            else:  # a folder: a seeded subset of every class (the decoder samples these too: reported as such)
                index = subset_index(len(dataset), o.held_out_images, seed=1)
                for part in index.split(250):
                    batch = gather(dataset, part)
                    yield batch["image"], encoder(batch["image"].to(self.device)).float().cpu()

        return train_token_decoder(self.decoder_recipe(), self.decoder_identity(encoder), self.token_dim(), o.grid,
                                   cfg.data.image_size, draw, held_out, path, self.device)

    def unaveraged(self) -> tuple:
        """The fixed Gaussian frequencies of the time embedding are copied, not averaged (they never change)."""
        return ("backbone.t_embedder.W",)

    def encode(self, model, batch: dict) -> Tensor:
        """The clean state: the teacher's tokens of the images (cached when the data allows), normalised."""
        with torch.no_grad():
            return self.latents.to_state(self.teacher.tokens(batch)[0].to(self.device))

    def decode(self, model, state: Tensor) -> Tensor:
        return self.latents.decode(state)

    # ---------------------------------------------------------------- training and sampling
    def sample_time(self, n: int, device) -> Tensor:
        """RAE's t: uniform on [0, time_max] or logit-normal truncated to it (flow.time), then shifted."""
        f, high = self.cfg.flow, self.options.time_max
        if f.time == "uniform":
            t = torch.rand(n) * high
        else:
            t = truncated_logit_normal(n, f.time_mean, f.time_std, 0.0, high)
        return time_shift(t, self.shift()).to(device)

    def velocity_field(self, model, labels, guidance, sampler=None, **options):
        """CFG in its interval at the shifted time; on an ODE sampler's grid warped to RAE's (`shifted_field`). The SDE
        sampler keeps the zoo's unshifted schedule (its score conversion reads the grid's own time)."""
        backbone = model.backbone

        def model_fn(x, t, y):
            return backbone(x, t, y).velocity

        def velocity(x, t, guide_at=None):
            return guided(model_fn, x, t, labels, backbone.null_label, guidance, guide_at)

        if not isinstance(sampler, (EulerODE, HeunODE, AdaptiveODE)):
            return lambda x, t, step, guide_at=None: velocity(x, t, guide_at)
        return shifted_field(velocity, sampler, self.shift(), self.options.sample_t_min)

    def from_official(self, official: dict) -> tuple[dict, list]:
        """RAE's `DiTwDDTHead` state dict (the same module names; its fixed position and RoPE tables are dropped)."""
        from zoo.backbones.ddt_head import official_ddt_head_state
        from zoo.backbones.official import prefixed

        state, unused = official_ddt_head_state(official)
        return prefixed(state, "backbone."), unused

    def prepare(self, target: str, args) -> int:
        return prepare_decoder(self, args)


def prepare_decoder(method: RAE, args) -> int:
    """`zoo prepare rae-decoder`: fit the statistics and train the decoder once (cached), print its held-out PSNR."""
    from zoo.latents.token_decoder import load_token_latents

    method.device = torch.device(args.device)
    method.teacher.setup(method.device, True)
    encoder = method._encoder()
    path = Path(args.out) if args.out else method.decoder_file(encoder)
    if args.force or args.out or not path.exists():
        method.train_decoder(encoder, path)
    _, record = load_token_latents(path, method.decoder_identity(encoder), DECODER_COMMAND)
    o = method.options
    print(f"rae decoder: {path}\nlatent {'x'.join(map(str, method.state_shape()))} of {o.encoder} tokens, time shift "
          f"{method.shift():.3f}\nreconstruction of {record['held_out_images']} held-out images: PSNR "
          f"{record['held_out_psnr']:.2f} dB, L1 {record['held_out_l1']:.4f}; trained {record['recipe']['steps']} "
          f"steps in {record['train_seconds']:.0f} s")
    return 0


__all__ = ["RAE", "RAEConfig", "time_shift", "truncated_logit_normal", "shifted_field"]
