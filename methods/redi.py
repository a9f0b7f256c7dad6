"""ReDi: joint diffusion of the image and PCA-reduced encoder features (Kouzelis et al., 2025). See docs/methods/redi.md.

The diffusion state is the image (or latent) x with r extra channels: the frozen encoder's patch
tokens of the clean image, standardised per dimension, projected on their first r principal
components (zoo/latents/pca.py), laid out on the token grid and resized bilinearly to the state's grid.

    training   [x_t ; r_t] = alpha_t [x ; r] + sigma_t [eps_x ; eps_r]      one t, independent noise
               h = x_t W_x + r_t W_r   (one patch embedding of the concatenation: sequence length unchanged)
               L = L_v(x part) + lambda_r L_v(r part); with probability p per batch the features are
               dropped (the clean r zeroed before noising, as officially) and lambda_r = 0, so the model
               also learns v(x_t | no r) -- p = 0 officially, 0.2 when training for guidance
    sampling   v = v(x_t, no r) + w_r (v(x_t, r_t) - v(x_t, no r))             representation guidance (all
               channels), CFG (w) on the image channels (official --cfg-vae; `cfg_features` for all),
               and both at once (the zoo's extension), each inside its own interval (`guided_velocity`);
               only the image channels are decoded. Diagnostics (`--features`): `real` moves the feature
               channels along a training image's noising path, so only the image is generated; `dropped`
               shows the model zeroed features, as a dropped training batch.

The frozen teacher and its token cache are the shared `Teacher` (zoo/teachers/teacher.py); ReDi has no
alignment loss and no projector.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.data import build_dataset, gather, subset_index
from zoo.teachers import require_one_encoder
from zoo.teachers.feature_cache import dataset_identity
from zoo.errors import ConfigError, DataError
from zoo.flow.guidance import Guidance
from zoo.teachers.teacher import Teacher, TeacherOptions
from zoo.training.method import Method, NoisyBatch, SamplingOption, Term
from zoo.latents.pca import FeaturePCA, load_or_fit, load_pca, pca_cache_path, pca_identity
from zoo.training.registry import register

PCA_COMMAND = "zoo prepare pca --method redi"
DROPPED_FEATURES = ("noise", "zeros")
FEATURE_SOURCES = ("generated", "real", "dropped")
REAL_FEATURE_IMAGES = 5000  # training images `--features real` draws each sample's features from


@dataclass
class ReDiConfig(TeacherOptions):  # exactly one encoder; the paper: dinov2-vit-b-reg
    rank: int = 8                   # r: principal components diffused beside the image
    feature_weight: float = 1.0     # lambda_r
    feature_dropout: float = 0.0    # probability per batch that the features are dropped (0.2 trains RG)
    dropped_features: str = "noise" # what a dropped batch shows in the feature channels: noise (the clean features
                                    # zeroed before noising, official) | zeros (the input zeroed, as RG's pass sees it)
    cfg_features: bool = False      # CFG also guides the feature channels (official default); False: --cfg-vae
    whiten: bool = False            # scale each component to unit variance (the zoo's option; the official code
                                    # never whitens)
    pca: str = ""                   # a fitted PCA file; "": the cache, keyed by encoder and data, fitted on first use
    pca_images: int = 76800         # training images (evenly spread) the PCA is fitted on (official: 300 batches of 256)
    rg_scale: float = 1.0           # w_r when sampling without --rg (1: no representation guidance)
    rg_interval: List[float] = field(default_factory=lambda: [0.0, 1.0])  # RG only while low <= t <= high


@dataclass
class JointNoisyBatch(NoisyBatch):
    """The noisy joint state, and whether this batch's features were dropped (the feature loss then weighs 0)."""
    dropped: bool = False


@register
class ReDi(Method):
    name = "redi"
    description = "ReDi: joint diffusion of the image and PCA-reduced encoder features; representation guidance"
    config_class = ReDiConfig

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        o = self.options
        require_one_encoder("redi", o.encoder, "ReDi diffuses the features of")
        if o.rank < 1:
            raise ConfigError(f"redi.rank={o.rank}: at least one PCA component is needed")
        if not 0 <= o.feature_dropout <= 1:
            raise ConfigError(f"redi.feature_dropout={o.feature_dropout} is not a probability")
        if o.dropped_features not in DROPPED_FEATURES:
            raise ConfigError(f"redi.dropped_features={o.dropped_features!r}; valid: {', '.join(DROPPED_FEATURES)}")
        if o.pca_images < 2:
            raise ConfigError(f"redi.pca_images={o.pca_images}: the PCA needs at least 2 images")
        if len(o.rg_interval) != 2:
            raise ConfigError(f"redi.rg_interval={list(o.rg_interval)} must be [low, high]")
        self.teacher = Teacher(o, cfg, grid=self.token_grid(), owner=self.name)
        self.pca: Optional[FeaturePCA] = None
        self._real_features: Optional[tuple] = None   # (feature maps, labels) for `--features real`, built once

    # ---------------------------------------------------------------- building
    def image_channels(self) -> int:
        return Method.state_shape(self)[0]

    def state_shape(self) -> tuple:
        """The joint state [x ; r]: the image's (or latent's) channels, then r feature channels on its grid."""
        c, h, w = Method.state_shape(self)
        return (c + self.options.rank, h, w)

    # The default SiT built from `state_shape` takes C + r input and output channels: its patch embedding of the
    # concatenation is exactly x W_x + r W_r + b (tests/methods/test_redi.py), and its velocity covers both parts.

    def setup(self, device, training: bool = True) -> None:
        super().setup(device, training)
        self.teacher.setup(self.device, training)      # the teacher and its token cache, then the PCA of its tokens
        self.pca = self.fit_feature_pca(device)[0] if training else None

    def fit_feature_pca(self, device=None, refit: bool = False) -> tuple:
        """(the PCA of the teacher's standardised tokens on the training set, r): from `redi.pca`, or the cache,
        fitted first (and logged) when missing or `refit`. Called by `setup` and `zoo prepare pca`."""
        if not self.teacher.encoders:
            self.teacher.setup(device or self.device)
        encoder, data_cfg, o = self.teacher.encoders[0], self.cfg.data, self.options
        dataset = build_dataset(data_cfg)
        identity = pca_identity(encoder.identity(), dataset_identity(data_cfg, dataset))
        if o.pca and not refit:
            pca = load_pca(o.pca, identity, PCA_COMMAND)
        else:
            num = min(o.pca_images, len(dataset))
            fresh = refit or not pca_cache_path(identity, num).exists()
            pca, _ = load_or_fit(identity, num, lambda: self._pca_tokens(dataset, num), refit=refit)
            if fresh:
                print(f"redi: the first {o.rank} of {pca.dim} components keep {pca.kept_variance(o.rank):.1%} of the "
                      "standardised tokens' variance", file=sys.stderr)
        pca.check_rank(o.rank)
        return pca, o.rank

    @torch.no_grad()
    def _pca_tokens(self, dataset, num: int, batch_size: int = 256):
        """The teacher's tokens of `num` training images drawn over the whole set (`subset_index`: every class in
        proportion), unflipped, batch by batch."""
        chosen = subset_index(len(dataset), num)
        for index in chosen.split(batch_size):
            if self.teacher.caches:
                yield self.teacher.caches[0].lookup(index, torch.zeros_like(index, dtype=torch.bool))
            else:
                images = gather(dataset, index)["image"]
                yield self.teacher.encoders[0](images.to(self.device)).float().cpu()

    # ---------------------------------------------------------------- training
    def targets(self, batch: dict) -> dict:
        """r: the teacher's tokens (cached or computed now) -> standardised PCA coordinates on the state's grid."""
        tokens = self.teacher.tokens(batch)[0]
        coords = self.pca.project(tokens, self.options.rank, whiten=self.options.whiten)
        return {"features": feature_map(coords, self.state_shape()[-1])}

    def clean(self, model, batch: dict) -> tuple:
        """The clean joint state [x ; r] (the features computed once, as the targets)."""
        with torch.no_grad():
            targets = self.targets(batch)
        return join(self.encode(model, batch), targets["features"]), targets

    def drop_features(self) -> bool:
        """One draw per batch (the official code's `random.random() < dino_drop_prob`), from torch's RNG so
        that resumed runs draw the same."""
        return bool(torch.rand(()) < self.options.feature_dropout)

    def noised(self, model, batch: dict, t=None, eps=None) -> JointNoisyBatch:
        """The jointly noised state: one t, independent noise for every channel of both parts. A dropped batch has its
        features zeroed: the clean ones before noising (`dropped_features=noise`) or the noisy input (`zeros`)."""
        noisy = JointNoisyBatch(**vars(super().noised(model, batch, t, eps)), dropped=self.drop_features())
        if noisy.dropped:
            c = self.image_channels()
            if self.options.dropped_features == "noise":
                noisy.x = without_features(noisy.x, c)
                noisy.x_t = self.path.interpolate(noisy.x, noisy.eps, noisy.t)
            else:
                noisy.x_t = without_features(noisy.x_t, c)
        return noisy

    def losses(self, model, noisy: JointNoisyBatch, ctx) -> dict:
        """L = L_v(x) + lambda_r L_v(r); lambda_r = 0 for a dropped batch."""
        c = self.image_channels()
        v = model.backbone(noisy.x_t, noisy.t, noisy.y).velocity
        target = self.path.velocity_target(noisy.x, noisy.eps, noisy.t)
        return {"flow": Term(self.flow_loss(v[:, :c], target[:, :c])),
                "features": Term(self.flow_loss(v[:, c:], target[:, c:]),
                                 0.0 if noisy.dropped else self.options.feature_weight)}

    # ---------------------------------------------------------------- sampling
    @classmethod
    def sampling_options(cls) -> list:
        return [SamplingOption("--rg", float, None, "representation guidance weight w_r (1 = none; default: "
                               "redi.rg_scale)"),
                SamplingOption("--rg-interval", float, None, "apply RG only while LOW <= t <= HIGH (t = 1 is noise; "
                               "default: redi.rg_interval)", nargs=2,
                               metavar=("LOW", "HIGH")),
                SamplingOption("--features", str, None, "generated (default): the model generates the feature "
                               "channels | real (a diagnostic, ODE samplers): they follow the noising path of a "
                               "training image of the sample's class, so only the image is generated | dropped: "
                               "the model sees them zeroed, as in a dropped training batch")]

    def representation_guidance(self, rg: Optional[float] = None, rg_interval=None) -> Guidance:
        o = self.options
        low, high = rg_interval if rg_interval is not None else o.rg_interval
        scale = float(o.rg_scale if rg is None else rg)
        if scale < 1:   # the official sampler, like CFG's, guides only above 1: a smaller weight would do nothing
            raise ConfigError(f"{'redi.rg_scale' if rg is None else '--rg'}={scale:g}: a representation guidance "
                              "weight below 1 guides nothing (1 = none); for the image velocity without the "
                              "features use --features dropped")
        return Guidance(scale, float(low), float(high))

    def velocity_field(self, model, labels: Tensor, guidance: Guidance, rg: Optional[float] = None,
                       rg_interval=None, features: Optional[str] = None, sampler=None, **options):
        if options:
            raise ConfigError(f"redi has no sampling option(s) {', '.join(options)}; valid: rg, rg_interval, features")
        features = features or "generated"
        if features not in FEATURE_SOURCES:
            raise ConfigError(f"--features {features}: valid: {', '.join(FEATURE_SOURCES)}")
        if features == "real" and sampler is not None and sampler.name not in ("euler", "heun"):
            raise ConfigError(f"--features real follows the features' noising path with a fixed-step ODE sampler "
                              f"(euler, heun), not {sampler.name}")
        backbone, channels = model.backbone, self.image_channels()
        rep = self.representation_guidance(rg, rg_interval)
        real = []   # with --features real: (the real features, their noise), fixed at the first call (t = 1)

        def model_fn(x, t, y):
            return backbone(x, t, y).velocity

        def field(x, t, step, guide_at=None):
            if features == "dropped":
                x = without_features(x, channels)
            v = guided_velocity(model_fn, x, t, labels, backbone.null_label, channels, guidance, rep, guide_at,
                                cfg_features=self.options.cfg_features)
            if features != "real":
                return v
            if not real:    # the state's feature channels are still pure noise: the path starts from them
                noise = x[:, channels:].clone()
                real.extend([self.draw_real_features(labels, noise).to(x.dtype), noise])
            # the path's own velocity: constant on the linear path, so Euler/Heun keep the channels exactly on it
            return torch.cat([v[:, :channels], self.path.velocity_target(real[0], real[1], t).to(v.dtype)], dim=1)

        return field

    @torch.no_grad()
    def real_feature_pool(self) -> tuple:
        """(feature maps [N, r, s, s], labels [N]) of `REAL_FEATURE_IMAGES` training images spread over the set,
        unflipped, computed once, batch by batch: the encoder runs here (no token cache is built), the PCA is the
        run's."""
        if self._real_features is None:
            if not self.teacher.encoders:
                self.teacher.hold_encoders(self.device)
            pca, rank = self.fit_feature_pca(self.device)
            dataset = build_dataset(self.cfg.data)
            maps, labels = [], []
            for index in subset_index(len(dataset), min(REAL_FEATURE_IMAGES, len(dataset))).split(256):
                batch = gather(dataset, index)
                coords = pca.project(self.teacher.encoders[0](batch["image"].to(self.device)), rank,
                                     whiten=self.options.whiten)
                maps.append(feature_map(coords, self.state_shape()[-1]))
                labels.append(batch["label"].to(self.device))
            self._real_features = (torch.cat(maps), torch.cat(labels))
        return self._real_features

    def draw_real_features(self, labels: Tensor, noise: Tensor) -> Tensor:
        """For each label, the features of a training image of that class, drawn at random; the draw is seeded by
        the sample's noise, so a chunk of samples gets the same features again and other chunks get others."""
        pool, pool_labels = self.real_feature_pool()
        gen = torch.Generator().manual_seed(int(noise.double().abs().sum().item() * 1e6) % 2 ** 62)
        chosen = []
        for y in labels.tolist():
            candidates = (pool_labels == y).nonzero().flatten().cpu()
            if not len(candidates):
                raise DataError(f"--features real: none of the {len(pool_labels)} training images drawn has class {y}")
            chosen.append(int(candidates[torch.randint(len(candidates), (1,), generator=gen)]))
        return pool[torch.tensor(chosen, device=pool.device)].to(noise.device)

    def decode(self, model, state: Tensor) -> Tensor:
        """Only the image channels are decoded; the generated features are dropped."""
        return super().decode(model, state[:, :self.image_channels()])


def feature_map(coords: Tensor, size: int) -> Tensor:
    """[B, g*g, r] per-token coordinates -> [B, r, size, size]: laid out on the g x g token grid (row-major, as the
    encoders emit them), resized bilinearly to the state's grid (the official code: `interpolate(..., 'bilinear')`)."""
    b, n, r = coords.shape
    g = round(n ** 0.5)
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    grid = coords.transpose(1, 2).reshape(b, r, g, g)
    if g == size:
        return grid
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)


def join(x: Tensor, features: Tensor) -> Tensor:
    return torch.cat([x, features.to(x.dtype)], dim=1)


def without_features(state: Tensor, channels: int) -> Tensor:
    """The joint state with its feature channels zeroed: what the model sees when the features are dropped."""
    return torch.cat([state[:, :channels], torch.zeros_like(state[:, channels:])], dim=1)


def guided_velocity(model_fn: Callable, x: Tensor, t: Tensor, y: Tensor, null_label: int, channels: int,
                    cfg: Guidance, rg: Guidance, guide_at: Optional[Tensor] = None, cfg_features: bool = False) -> Tensor:
    """The joint velocity with CFG and representation guidance, each inside its interval.

    With v(x, r, y) the model on the joint state, v(x, -, y) on the state with the features zeroed and
    `-` for the null label:

        neither    v(x, r, y)
        CFG        v(x, r, -) + w (v(x, r, y) - v(x, r, -))                     (official forward_with_cfg[_vae])
        RG         v(x, -, y) + w_r (v(x, r, y) - v(x, -, y))                   (official forward_with_rg)
        both       v(x, -, -) + w (v(x, -, y) - v(x, -, -)) + w_r (v(x, r, y) - v(x, -, y))  (the zoo's extension)

    RG guides every channel, as the official code does; CFG's w applies to the image channels and, with
    `cfg_features`, to the feature channels too -- otherwise w = 1 there (the official --cfg-vae: the feature
    channels keep the conditional velocity under CFG alone). All passes of a step run as one batch.
    """
    when = t if guide_at is None else guide_at
    use_cfg, use_rg = cfg.active(when), rg.active(when)
    if not (use_cfg or use_rg):
        return model_fn(x, t, y)
    bare, null = without_features(x, channels), torch.full_like(y, null_label)
    if use_cfg and use_rg:
        passes = [(x, y), (bare, y), (bare, null)]
    else:
        passes = [(x, y), (x, null) if use_cfg else (bare, y)]
    v = model_fn(torch.cat([p[0] for p in passes]), t.repeat(len(passes)), torch.cat([p[1] for p in passes]))
    v = v.chunk(len(passes))
    w = v[0].new_ones(1, x.shape[1], 1, 1)   # the CFG scale of each channel
    w[:, :channels] = cfg.scale
    if cfg_features:
        w[:, channels:] = cfg.scale
    if use_cfg and use_rg:
        return v[2] + w * (v[1] - v[2]) + rg.scale * (v[0] - v[1])
    return v[1] + (w if use_cfg else rg.scale) * (v[0] - v[1])
