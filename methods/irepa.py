"""iREPA: REPA with the teacher's spatial structure emphasised (Singh et al., 2025). See docs/methods/irepa.md.

    y~_e = (y*_e - alpha * mean_n y*_e) / (std_n y*_e + 1e-6)            per image, over its N tokens
    L = L_v + lambda * L_iREPA,   L_iREPA = -1/|E| sum_e 1/N sum_n cos( y~_e[n], conv_e( h_t )[n] )

Two changes to REPA, nothing else: the targets are normalised over each image's tokens (the share of a token that
all tokens of the image have in common is mostly removed, so the loss asks for the image's spatial layout, not one
global descriptor at every position), and the projector is a k x k convolution over the token grid instead of a
token-wise MLP. The paper's finding behind it: a teacher's spatial structure, not its global accuracy, predicts
how much alignment to it helps generation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.repa import REPA, REPAConfig
from zoo.errors import ConfigError
from zoo.teachers.alignment import ConvProjector, spatial_zscore
from zoo.training.registry import register


PROJECTORS = ("conv", "mlp", "linear")
SPATIAL_NORMS = ("zscore", "none")


@dataclass
class IREPAConfig(REPAConfig):    # REPA's encoder, encoder_depth and projector_dim (used by projector=mlp)
    proj_coeff: float = 1.0       # lambda: the official LDM config's (REPA's is 0.5)
    projector: str = "conv"       # conv (iREPA) | mlp (REPA's) | linear: the official projection_layer_type
    projector_kernel: int = 3     # k of the conv projector (odd); 1 makes it a token-wise linear map
    spatial_norm: str = "zscore"  # zscore (iREPA) | none (REPA's targets): the official spnorm_method
    zscore_alpha: float = 0.6     # alpha: the share of each image's mean token removed from its tokens (official 0.6)


@register
class IREPA(REPA):
    name = "irepa"
    description = "iREPA: REPA with a conv projector and spatially z-scored teacher tokens"
    config_class = IREPAConfig

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        for key, valid in (("projector", PROJECTORS), ("spatial_norm", SPATIAL_NORMS)):
            if getattr(self.options, key) not in valid:
                raise ConfigError(f"irepa.{key}={getattr(self.options, key)!r}; valid: {', '.join(valid)}")
        kernel = self.options.projector_kernel
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"irepa.projector_kernel={kernel}: needs an odd size >= 1 (1, 3, 5, 7), so the "
                              "projected grid keeps its shape")

    def used(self) -> dict:
        row = super().used()
        if self.options.spatial_norm == "zscore":
            row["teacher"] += f", spatially z-scored (alpha {self.options.zscore_alpha:g})"
        return row

    def build_projector(self, width: int, dim: int) -> nn.Module:
        """conv: a k x k convolution over the token grid; mlp: REPA's; linear: one token-wise Linear."""
        kind = self.options.projector
        if kind == "conv":
            return ConvProjector(width, dim, self.options.projector_kernel)
        return super().build_projector(width, dim) if kind == "mlp" else nn.Linear(width, dim)

    def targets(self, batch: dict) -> dict:
        tokens = self.teacher.tokens(batch)
        if self.options.spatial_norm == "zscore":
            tokens = [spatial_zscore(y, self.options.zscore_alpha) for y in tokens]
        return {"tokens": tokens}

    def from_official(self, official: dict) -> tuple[dict, list]:
        """The iREPA LDM SiT: REPA's layout, each projector wrapped as `projectors.{e}.projection_layer` (a Conv2d,
        a Linear or REPA's MLP), which is the zoo's `conv` (ConvProjector) or the projector itself."""
        state, unused = super().from_official(official)   # REPA's: projectors.{e}.* -> extras.projectors.{e}.*
        inner = ".conv." if self.options.projector == "conv" else "."
        return {k.replace(".projection_layer.", inner) if k.startswith("extras.projectors.") else k: v
                for k, v in state.items()}, unused
