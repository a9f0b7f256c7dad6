"""The `Method` base class: vanilla flow matching on SiT, written as small named hooks.

A method subclasses `Method`, registers itself with `@register`, and overrides only the hooks it
changes. The trainer (zoo/training/trainer.py) owns the training step -- optimizers, backward, clipping,
EMA, logging, checkpoints -- and calls the hooks; no method rewrites it.

Hooks, in the order the trainer and sampler call them (see docs/architecture.md):

  building   build_backbone, build_extras, setup, state_shape
  training   phases -> loss_terms = losses(noised(batch)):
               noised   clean (encode, targets), noise (sample_time), drop_labels    -> NoisyBatch
               losses   hidden_layers, flow_loss, extra_losses               -> {name: Term}
             unaveraged (what the EMA copies)
  sampling   sampling_options, velocity_field, decode
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from zoo.backbones.sit import BackboneOutput, build_sit
from zoo.errors import ConfigError
from zoo.flow.guidance import Guidance, guided
from zoo.flow.interpolants import build_path
from zoo.flow.samplers import Field, Sampler
from zoo.flow.timesteps import build_time_sampler


@dataclass
class Term:
    """One named loss: the trainer adds `weight * value` to its phase's total and logs `value`."""
    value: Tensor
    weight: float = 1.0


@dataclass
class TrainContext:
    step: int                       # optimizer steps done before this one
    ema: Optional["ZooModel"]       # the EMA copy of the model (a teacher for self-alignment)
    rank: int = 0
    world_size: int = 1
    carry: dict = dataclasses.field(default_factory=dict)   # what one phase of this step hands to the next (REPA-E: the
                                                # VAE update's latent, t and noise); empty at every step's start


LossFn = Callable[["ZooModel", dict, TrainContext], dict]


@dataclass
class Phase:
    """One optimizer update inside a training step: its parameters and the losses it minimises."""
    name: str
    parameters: list
    losses: LossFn
    lr: Optional[float] = None      # None: optim.lr


@dataclass
class NoisyBatch:
    """One noisy training sample per image, before the network: what `noised` returns and `losses` reads."""
    x: Tensor                       # clean diffusion state (image or latent)
    eps: Tensor
    t: Tensor                       # [B], t = 1 is noise
    x_t: Tensor
    y: Tensor                       # labels after CFG dropout
    targets: dict                   # from `targets(batch)`, computed without gradient
    batch: dict                     # the raw batch (image, label, index, flip)


@dataclass
class FlowState:
    """Everything about one noisy training sample that `extra_losses` may need: the NoisyBatch and the output."""
    x: Tensor                       # clean diffusion state (image or latent)
    eps: Tensor
    t: Tensor                       # [B], t = 1 is noise
    x_t: Tensor
    y: Tensor                       # labels after CFG dropout
    output: BackboneOutput          # velocity and requested hidden states
    targets: dict                   # from `targets(batch)`, computed without gradient
    batch: dict                     # the raw batch (image, label, index, flip)

    @classmethod
    def of(cls, noisy: NoisyBatch, output: BackboneOutput) -> "FlowState":
        return cls(noisy.x, noisy.eps, noisy.t, noisy.x_t, noisy.y, output, noisy.targets, noisy.batch)


@dataclass
class SamplingOption:
    """A method-specific `zoo sample` flag, e.g. DDT's --share or ReDi's --rg."""
    flag: str
    type: type = str
    default: Any = None
    help: str = ""
    nargs: Any = None               # argparse's nargs, e.g. 2 for an interval
    metavar: Any = None             # argparse's metavar, e.g. ("LOW", "HIGH") for an interval

    @property
    def dest(self) -> str:
        """The keyword `velocity_field` receives it as: --share -> share."""
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class DataInfo:
    channels: int
    image_size: int
    num_classes: int


class ZooModel(nn.Module):
    """Every trainable part of a method: the backbone plus named extras (projectors, heads, VAE, ...).

    `forward(fn, ...)` runs `fn(self, ...)`: the trainer passes a phase's loss function through
    the model so that DistributedDataParallel sees exactly one forward per backward, whatever
    parts of the model the method's hooks touch.
    """

    def __init__(self, backbone: nn.Module, extras: Optional[dict] = None):
        super().__init__()
        self.backbone = backbone
        self.extras = nn.ModuleDict(extras or {})

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self, *args, **kwargs)


class Method:
    """Vanilla SiT: the flow-matching loss on the velocity, nothing else. Every hook is a default."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    config_class: ClassVar[Optional[type]] = None   # dataclass of the method's options, at cfg.<name>
    config_file: ClassVar[Optional[str]] = None      # default: configs/<name>.yaml
    # Whether every trainable parameter receives a gradient from every phase's forward. DDP then skips its search
    # for unused parameters (a graph traversal every step); a method with several phases never does.
    every_parameter_used: ClassVar[bool] = True
    # Whether the diffusion state is data.vae's frozen latent of the images: `setup` loads that VAE, and training from
    # a prepared store reads its latents (so it needs data.vae, the VAE that wrote them). A method that makes its own
    # latent from the images (REPA-E tunes the VAE it starts from, RAE encodes teacher tokens) reads only the images.
    reads_store_latents: ClassVar[bool] = True
    # `zoo prepare` targets this method brings, {target: help} (a helper it trains once and caches), built by
    # `prepare`. A literal dict of strings: `zoo prepare --help` reads it from the source without importing torch.
    prepare_targets: ClassVar[dict] = {}

    def __init__(self, cfg, data_info: DataInfo):
        if cfg.data.dataset == "prepared" and self.reads_store_latents and cfg.data.vae in ("", "builtin"):
            from zoo.data.store import read_meta

            raise ConfigError(f"data.dataset=prepared needs data.vae: the folder of the VAE that wrote the store, "
                              f"which decodes the samples: data.vae={read_meta(cfg.data.root)['vae']}")
        self.cfg = cfg
        self.data = data_info
        self.path = build_path(cfg.flow.path)
        self.time_sampler = build_time_sampler(cfg.flow)
        self.device = torch.device("cpu")
        self.vae = None                  # the frozen VAE of latent diffusion (data.vae), loaded by `setup`
        self.latent_cache = None         # its posterior moments of every training image and flip (in-memory data)
        self.checkpoint = None           # the checkpoint file sampled from, set by `load_for_sampling`
        self.checkpoint_weights = None   # "ema" or "model": which of its weights

    @property
    def options(self):
        """This method's own config section, `cfg.<name>`."""
        return self.cfg[self.name]

    # ---------------------------------------------------------------- building
    def build_backbone(self) -> nn.Module:
        """The velocity network. Must accept (x_t, t, y, hidden_layers=..., stop_after=...)."""
        return build_sit(self.cfg.model, input_size=self.state_shape()[-1], in_channels=self.state_shape()[0],
                         num_classes=self.data.num_classes)

    def build_extras(self, backbone: nn.Module) -> dict:
        """Trainable modules beside the backbone (projectors, heads); EMA'd and saved with it."""
        return {}

    def build_model(self) -> ZooModel:
        self.check_token_count()
        backbone = self.build_backbone()
        return ZooModel(backbone, self.build_extras(backbone))

    def setup(self, device: torch.device, training: bool = True) -> None:
        """Load frozen helpers (teacher encoders, a VAE, feature caches) onto `device`.

        Frozen modules live on the method, not in the model: they are never optimised, EMA'd or
        saved in checkpoints. `training=False` when only sampling. The default loads the frozen VAE
        of latent diffusion when `data.vae` is set and, for training on in-memory data, the cache of its
        posterior moments (built on first use), so that a step draws its latents without running the encoder.
        """
        self.device = torch.device(device)
        if self.cfg.data.vae and self.reads_store_latents:
            from zoo.latents.vae import latent_moments_cache, load_vae

            self.vae = load_vae(self.cfg).to(self.device).eval().requires_grad_(False)
            self.latent_cache = latent_moments_cache(self.vae, self.cfg) if training else None

    def used(self) -> dict:
        """What this method's row of `zoo compare` says it used: the training-time distribution, how the network
        embeds t, the teacher and the space it diffuses in. The default reads them from the config and from a
        `teacher` attribute (the shared `Teacher` component); a method whose teacher or space is its own overrides it."""
        teacher, m = getattr(self, "teacher", None), self.cfg.model
        embedding = f"{m.time_scale:g} {'t' if m.time_convention == 'noise' else '(1 - t)'}" + (
            f", period {m.time_max_period:g}" if m.time_max_period != 10000 else "")
        return {"time": self.cfg.flow.time, "embedding": embedding,
                "teacher": teacher.describe() if hasattr(teacher, "describe") else "none",
                "space": f"latents (data.vae={self.cfg.data.vae})" if self.cfg.data.vae else "pixels"}

    def token_grid(self) -> int:
        """Side of the backbone's token grid (the state's side / model.patch): what a teacher's tokens are matched to."""
        return self.state_shape()[-1] // self.cfg.model.patch

    def check_token_count(self) -> None:
        """A grid beyond model.max_tokens is almost always a forgotten VAE (ImageNet 256 in pixel space at patch 2:
        16,384 tokens); a teacher matched to it would see 4x its native input (DINOv2: 64x64 tokens, 896 px)."""
        limit, grid = self.cfg.model.max_tokens, self.token_grid()
        if limit and grid * grid > limit:
            c, h, _ = self.state_shape()
            raise ConfigError(f"{grid}x{grid} = {grid * grid} tokens (a {c}x{h}x{h} state at model.patch="
                              f"{self.cfg.model.patch}) exceed model.max_tokens={limit}: for latent diffusion set "
                              "data.vae, or raise the limit (model.max_tokens=0: none)")

    def state_shape(self) -> tuple:
        """Shape (C, H, W) of one diffusion state; a VAE or extra feature channels change it."""
        if self.cfg.data.vae:
            from zoo.latents.vae import latent_shape

            return latent_shape(self.cfg)
        return (self.data.channels, self.data.image_size, self.data.image_size)

    # ---------------------------------------------------------------- training
    def phases(self, model: ZooModel) -> list:
        """The optimizer updates of one training step, run in order. Default: one AdamW on everything."""
        return [Phase("model", [p for p in model.parameters() if p.requires_grad], self.loss_terms)]

    def encode(self, model: ZooModel, batch: dict) -> Tensor:
        """Map the raw batch to the clean diffusion state x: the images, or a VAE posterior sample of them
        (drawn from prepared posterior moments when the data is `latents`)."""
        if "latent_mean" in batch:
            return self.vae.to_state(batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_std"]))
        if self.latent_cache is not None and "index" in batch:
            mean, std = self.latent_cache.moments(batch["index"], batch["flip"], self.device)
            return self.vae.to_state(mean + std * torch.randn_like(std))
        if self.vae is not None:
            with torch.no_grad():
                return self.vae.encode(batch["image"])
        return batch["image"]

    def targets(self, batch: dict) -> dict:
        """Targets from the clean batch by frozen models; called under no_grad."""
        return {}

    def sample_time(self, n: int, device) -> Tensor:
        return self.time_sampler.sample(n, device=device)

    def noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(t, eps) for the clean states x: `sample_time`'s t, then Gaussian noise (drawn in that order)."""
        return self.sample_time(x.shape[0], x.device), torch.randn_like(x)

    def drop_labels(self, model: ZooModel, y: Tensor) -> Tensor:
        """Replace labels by the null class with probability model.class_dropout (trains CFG)."""
        p = self.cfg.model.class_dropout
        if p <= 0:
            return y
        drop = torch.rand(y.shape[0], device=y.device) < p
        return torch.where(drop, torch.full_like(y, model.backbone.null_label), y)

    def hidden_layers(self) -> tuple:
        """Block numbers (from 1) whose output tokens the backbone should return."""
        return ()

    def unaveraged(self) -> tuple:
        """State-dict key prefixes the EMA copies from the live model instead of averaging (REPA-E: its VAE)."""
        return ()

    def flow_loss(self, velocity: Tensor, target: Tensor) -> Tensor:
        """L_v = E || v_theta - v* ||^2: mean over dimensions per sample, then over the batch (samples of one
        size: the mean over every element)."""
        return ((velocity.float() - target.float()) ** 2).mean()

    def extra_losses(self, model: ZooModel, state: FlowState, ctx: TrainContext) -> dict:
        """Losses beside the flow loss, as {name: Term}. Aligning methods add theirs here."""
        return {}

    def clean(self, model: ZooModel, batch: dict) -> tuple[Tensor, dict]:
        """(x, targets): the clean diffusion state (`encode`) and the frozen targets (`targets`, without gradient)."""
        x = self.encode(model, batch)
        with torch.no_grad():
            return x, self.targets(batch)

    def noised(self, model: ZooModel, batch: dict, t: Optional[Tensor] = None,
               eps: Optional[Tensor] = None) -> NoisyBatch:
        """The `clean` state x of the batch and its frozen targets, (t, eps) -- `noise`'s draws unless given --, x_t
        and the labels after CFG dropout. The random draws, in order: t, eps, the labels' dropout."""
        x, targets = self.clean(model, batch)
        if t is None or eps is None:
            drawn_t, drawn_eps = self.noise(x)
            t, eps = drawn_t if t is None else t, drawn_eps if eps is None else eps
        x_t = self.path.interpolate(x, eps, t)
        return NoisyBatch(x, eps, t, x_t, self.drop_labels(model, batch["label"]), targets, batch)

    def losses(self, model: ZooModel, noisy: NoisyBatch, ctx: TrainContext) -> dict:
        """The flow loss on the backbone's velocity at x_t, plus `extra_losses`."""
        out = model.backbone(noisy.x_t, noisy.t, noisy.y, hidden_layers=self.hidden_layers())
        terms = {"flow": Term(self.flow_loss(out.velocity, self.path.velocity_target(noisy.x, noisy.eps, noisy.t)))}
        terms.update(self.extra_losses(model, FlowState.of(noisy, out), ctx))
        return terms

    def loss_terms(self, model: ZooModel, batch: dict, ctx: TrainContext) -> dict:
        """The default phase's loss function: `losses` of the `noised` batch (override those two, not this)."""
        return self.losses(model, self.noised(model, batch), ctx)

    def prepare(self, target: str, args) -> int:
        """Build the `zoo prepare` target `target` of `prepare_targets` (args: force, out, device, threads)."""
        raise NotImplementedError(f"{self.name} declares no zoo prepare target {target!r}")

    # ---------------------------------------------------------------- sampling
    @classmethod
    def sampling_options(cls) -> list:
        """Extra `zoo sample` flags this method understands, passed to `velocity_field` by name."""
        return []

    def velocity_field(self, model: ZooModel, labels: Tensor, guidance: Guidance, sampler: Optional[Sampler] = None,
                       **options) -> Field:
        """The velocity the sampler integrates: the backbone's, with CFG inside the guidance interval.

        `sampler` is the integrator that will run the field (its steps; DDT's encoder sharing plans over them).
        """
        backbone = model.backbone

        def model_fn(x, t, y):
            return backbone(x, t, y).velocity

        def field(x, t, step, guide_at=None):
            return guided(model_fn, x, t, labels, backbone.null_label, guidance, guide_at)

        return field

    def decode(self, model: ZooModel, state: Tensor) -> Tensor:
        """Map a sampled state back to images in [-1, 1] (a VAE decodes here)."""
        if self.vae is not None:
            return self.vae.decode(state)
        return state

    def from_official(self, official: dict) -> tuple[dict, list]:
        """An official model's state dict as this method's ZooModel state dict, and the official keys it left unused.

        The default reads a SiT (zoo/backbones/official.py); methods with heads or another backbone add theirs.
        """
        from zoo.backbones.official import prefixed, sit_state

        state, unused = sit_state(official, self.state_shape()[0])
        return prefixed(state, "backbone."), unused

    def export_vae(self, model: ZooModel):
        """A VAE this method tuned, as a diffusers AutoencoderKL (`zoo export-vae`); None: it tunes none."""
        return None

    @torch.no_grad()
    def generate(self, model: ZooModel, labels: Tensor, sampler: Sampler, guidance: Guidance = Guidance(),
                 generator: Optional[torch.Generator] = None, **options) -> Tensor:
        """Images in [-1, 1] for `labels`, starting from seeded noise. Not a hook: it calls them."""
        device = labels.device
        noise = torch.randn((labels.shape[0], *self.state_shape()), generator=generator,
                            device=generator.device if generator is not None else device).to(device)
        field = self.velocity_field(model, labels, guidance, sampler=sampler, **options)
        state = sampler.sample(field, noise, self.path, generator)
        return self.decode(model, state).clamp(-1, 1)
