"""REPA: representation alignment (Yu et al., ICLR 2025). See docs/methods/repa.md.

    L = L_v + lambda * L_REPA,   L_REPA = -1/|E| sum_e 1/N sum_n cos( y*_e[n], h_phi_e( h_t[n] ) )

`h_t` is the backbone's hidden state after block k on the noisy input, `h_phi_e` a trainable MLP
projector per encoder e, and `y*_e` the frozen encoder's patch tokens of the clean image, on the
backbone's token grid. Everything else is vanilla flow matching: REPA changes only training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zoo.alignment import negative_cosine, projector
from zoo.data import build_dataset
from zoo.encoders import build_encoders, encoder_dims
from zoo.encoders.feature_cache import cacheable, load_or_build
from zoo.errors import ConfigError
from zoo.method import Method, Term
from zoo.registry import register

CACHE_MODES = ("auto", "always", "never")


@dataclass
class TeacherOptions:
    """The frozen teachers' options, shared by every method that loads them through REPA's `setup`."""
    encoder: str = "builtin"        # one or more encoders, comma-separated (zoo.encoders.encoder_names())
    encoder_weights: str = ""       # local weights file or folder per encoder, comma-separated, same order
    feature_cache: str = "auto"     # auto: cache teacher tokens for in-memory data | always | never


@dataclass
class REPAConfig(TeacherOptions):
    encoder_depth: int = 8          # k: align the output of block k (8 for SiT-L/XL, 4 for SiT-B)
    projector_dim: int = 2048       # hidden width of the MLP projector
    proj_coeff: float = 0.5         # lambda


@register
class REPA(Method):
    name = "repa"
    description = "REPA: align block-k hidden states to a frozen encoder's patch tokens (negative cosine)"
    config_class = REPAConfig

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        if self.options.feature_cache not in CACHE_MODES:
            raise ConfigError(f"{self.name}.feature_cache={self.options.feature_cache!r}; valid: {', '.join(CACHE_MODES)}")
        self.encoders, self.caches = [], []

    def token_grid(self) -> int:
        """Side of the backbone's token grid, which the teacher's tokens are matched to."""
        return self.state_shape()[-1] // self.cfg.model.patch

    def build_extras(self, backbone) -> dict:
        backbone.check_layers(self.hidden_layers())
        o = self.options
        dims = encoder_dims(o.encoder, self.cfg)
        return {"projectors": nn.ModuleList(projector(backbone.hidden_size, o.projector_dim, d) for d in dims)}

    def setup(self, device, training: bool = True) -> None:
        super().setup(device, training)
        self.encoders, self.caches = [], []
        if not training:
            return  # sampling never needs the teacher
        o = self.options
        if self.cfg.data.dataset == "latents":
            raise ConfigError(f"{self.name}'s teacher needs the images, and prepared latents hold none: train on the "
                              "image folder with data.vae=<VAE> instead")
        self.encoders = build_encoders(o.encoder, o.encoder_weights, grid=self.token_grid(), cfg=self.cfg,
                                       device=self.device)
        if o.feature_cache == "never":
            return
        dataset = build_dataset(self.cfg.data)
        if o.feature_cache == "always" or cacheable(dataset):
            self.caches = [load_or_build(encoder, self.cfg.data, dataset) for encoder in self.encoders]

    def hidden_layers(self) -> tuple:
        return (self.options.encoder_depth,)

    def targets(self, batch: dict) -> dict:
        """y*: each encoder's patch tokens of the clean (possibly flipped) images, cached or computed now."""
        if self.caches:
            return {"tokens": [c.lookup(batch["index"], batch["flip"]).to(self.device) for c in self.caches]}
        return {"tokens": [encoder(batch["image"]) for encoder in self.encoders]}

    def extra_losses(self, model, state, ctx) -> dict:
        return {"repa": Term(repa_loss(state.output.hidden[self.options.encoder_depth], model.extras["projectors"],
                                       state.targets["tokens"]), self.options.proj_coeff)}

    def from_official(self, official: dict) -> tuple[dict, list]:
        """REPA's SiT with its `projectors.{e}` (the same Linear-SiLU-Linear-SiLU-Linear layout as the zoo's)."""
        from zoo.backbones.official import take

        state, unused = super().from_official(official)
        projectors, unused = take({k: official[k] for k in unused}, "projectors.", "extras.projectors.")
        return {**state, **projectors}, unused


def repa_loss(hidden: torch.Tensor, projectors, targets: list) -> torch.Tensor:
    """L_REPA: the negative token-wise cosine of each projector's output to its encoder's tokens, averaged
    over encoders."""
    return torch.stack([negative_cosine(proj(hidden), y) for proj, y in zip(projectors, targets)]).mean()
