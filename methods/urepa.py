"""U-REPA: REPA for a U-shaped SiT (Tian et al., NeurIPS 2025). See docs/methods/urepa.md.

    L = L_v + lambda * (L_token + w * L_manifold)

The backbone is SiT-down (zoo/backbones/usit.py). Its middle, lowest-resolution stage is aligned:
its output tokens h_t go through REPA's MLP projector h_phi **first**, and only then are upsampled to
the teacher's (full-resolution) token grid, `z = up(h_phi(h_t))`. Then

    L_token    = -1/N sum_n cos( y*[n], z[n] )                       (REPA's token-wise loss)
    L_manifold = || H H^T - Y Y^T ||_F^2 / B^2,   H = normalize(mean_n z),  Y = normalize(mean_n y*)
                 (`manifold_form=pooled`); or, as in public ports (`flattened`, with lambda 0.8 there),
                 the same with H, Y the flattened [B, N*D] matrices of L2-normalised tokens

both averaged over teachers when there are several, both in fp32. Teachers, projectors and the feature
cache are REPA's (this class subclasses it); sampling is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.repa import REPA
from zoo.teachers.alignment import negative_cosine
from zoo.backbones.usit import build_usit, middle_block, resolve_stages
from zoo.errors import ConfigError
from zoo.teachers.teacher import TeacherOptions
from zoo.training.method import Term
from zoo.training.registry import register

UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest")
MANIFOLD_FORMS = ("pooled", "flattened")


@dataclass
class URepaConfig(TeacherOptions):
    stages: list[int] = field(default_factory=list)  # blocks per stage of SiT-down, e.g. [2, 2, 2]; []: model.size's
    align_block: int = 0            # the block whose output is aligned; 0: the last block of the middle stage
    projector_dim: int = 2048       # hidden width of the MLP projector
    upsample: str = "bilinear"      # projected tokens -> teacher grid: bilinear | bicubic | nearest
    proj_coeff: float = 0.5         # lambda (0.5 in one port, 0.8 in another: unverified)
    manifold_coeff: float = 3.0     # w
    manifold_form: str = "pooled"   # pooled: Gram of normalised token means | flattened: of normalised tokens (ports)


@register
class URepa(REPA):
    name = "urepa"
    description = "U-REPA: SiT-down (U-shaped SiT); its middle stage projected, upsampled, aligned (token + manifold)"
    config_class = URepaConfig

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        if self.options.upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"urepa.upsample={self.options.upsample!r}; valid: {', '.join(UPSAMPLE_MODES)}")
        if self.options.manifold_form not in MANIFOLD_FORMS:
            raise ConfigError(f"urepa.manifold_form={self.options.manifold_form!r}; valid: {', '.join(MANIFOLD_FORMS)}")

    def stages(self) -> tuple:
        return resolve_stages(self.cfg.model, self.options.stages, f"{self.name}.stages")

    def build_backbone(self):
        c, _, size = self.state_shape()
        return build_usit(self.cfg.model, stages=self.options.stages, input_size=size, in_channels=c,
                          num_classes=self.data.num_classes, stages_key=f"{self.name}.stages")

    def hidden_layers(self) -> tuple:
        return (self.options.align_block or middle_block(self.stages()),)

    def extra_losses(self, model, state, ctx) -> dict:
        (k,) = self.hidden_layers()
        token, manifold = urepa_losses(state.output.hidden[k], model.extras["projectors"], state.targets["tokens"],
                                       self.options.upsample, self.options.manifold_form)
        lam = self.options.proj_coeff
        return {"token": Term(token, lam), "manifold": Term(manifold, lam * self.options.manifold_coeff)}


def token_grid_side(tokens: Tensor) -> int:
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} tokens do not form a square grid")
    return side


def upsample_tokens(tokens: Tensor, grid: int, mode: str = "bilinear") -> Tensor:
    """[B, g*g, D] -> [B, grid*grid, D] by interpolating the row-major token grid (identity when g == grid)."""
    side = token_grid_side(tokens)
    if side == grid:
        return tokens
    b, _, d = tokens.shape
    image = tokens.transpose(1, 2).reshape(b, d, side, side)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(image, size=(grid, grid), mode=mode, **kwargs).flatten(2).transpose(1, 2)


def project_then_upsample(hidden: Tensor, projector, grid: int, mode: str = "bilinear") -> Tensor:
    """z = up(h_phi(h)): the MLP runs on the stage's own (coarse) tokens, the interpolation after it.

    The order matters with an interpolating upsampler: the MLP is non-linear, so up(h_phi(h)) differs
    from h_phi(up(h)); with `nearest` (a copy) the two coincide.
    """
    return upsample_tokens(projector(hidden), grid, mode)


def manifold_loss(features: Tensor, targets: Tensor, form: str = "pooled") -> Tensor:
    """|| H H^T - Y Y^T ||_F^2 / B^2 (the mean squared difference of two B x B Gram matrices), in fp32.

    pooled     H, Y: the L2-normalised token means of each sample; H H^T holds the cosine similarities between
               the batch's samples, so the loss matches the student's sample-to-sample structure to the
               teacher's, whatever their widths.
    flattened  H, Y: each sample's L2-normalised tokens flattened to one [N * D] row (public ports); an entry
               of H H^T is then the sum over tokens of their cosines, up to N.
    """
    if form not in MANIFOLD_FORMS:
        raise ValueError(f"unknown manifold form {form!r}; valid: {', '.join(MANIFOLD_FORMS)}")
    with torch.autocast(features.device.type, enabled=False):
        if form == "flattened":
            h = F.normalize(features.float(), dim=-1).flatten(1)
            y = F.normalize(targets.float(), dim=-1).flatten(1)
        else:
            h = F.normalize(features.float().mean(dim=1), dim=-1)
            y = F.normalize(targets.float().mean(dim=1), dim=-1)
        return ((h @ h.T - y @ y.T) ** 2).sum() / h.shape[0] ** 2


def urepa_losses(hidden: Tensor, projectors, targets: list, mode: str = "bilinear",
                 manifold_form: str = "pooled") -> tuple[Tensor, Tensor]:
    """(L_token, L_manifold) of the hidden tokens against each teacher's tokens, averaged over teachers."""
    token, manifold = [], []
    for proj, y in zip(projectors, targets):
        z = project_then_upsample(hidden, proj, token_grid_side(y), mode)
        token.append(negative_cosine(z, y))
        manifold.append(manifold_loss(z, y, manifold_form))
    return torch.stack(token).mean(), torch.stack(manifold).mean()
