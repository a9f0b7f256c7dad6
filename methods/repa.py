"""REPA: representation alignment (Yu et al., ICLR 2025). See docs/methods/repa.md.

    L = L_v + lambda * L_REPA,   L_REPA = -1/|E| sum_e 1/N sum_n cos( y*_e[n], h_phi_e( h_t[n] ) )

`h_t` is the backbone's hidden state after block k on the noisy input, `h_phi_e` a trainable MLP
projector per encoder e, and `y*_e` the frozen encoder's patch tokens of the clean image, on the
backbone's token grid (the `Teacher`, zoo/teachers/teacher.py). Everything else is vanilla flow
matching: REPA changes only training.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from zoo.training.registry import register
from zoo.teachers.alignment import projector, repa_loss
from zoo.teachers.teacher import Teacher, TeacherOptions
from zoo.training.method import Method, Term

__all__ = ["REPA", "REPAConfig", "repa_loss"]


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
    teacher_class = Teacher  # a method that needs more of its teacher (REG: its class token) names a subclass

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        self.teacher = self.teacher_class(self.options, cfg, grid=self.token_grid(), owner=self.name)

    def build_extras(self, backbone) -> dict:
        backbone.check_layers(self.hidden_layers())
        dims = self.teacher.dims()
        return {"projectors": nn.ModuleList(self.build_projector(backbone.hidden_size, dim) for dim in dims)}

    def build_projector(self, width: int, dim: int) -> nn.Module:
        """h_phi for one encoder of width `dim`: REPA's MLP (a variant with another projector overrides this)."""
        return projector(width, self.options.projector_dim, dim)

    def setup(self, device, training: bool = True) -> None:
        super().setup(device, training)
        self.teacher.setup(self.device, training)

    def hidden_layers(self) -> tuple:
        return (self.options.encoder_depth,)

    def targets(self, batch: dict) -> dict:
        return {"tokens": self.teacher.tokens(batch)}

    def extra_losses(self, model, state, ctx) -> dict:
        return {"repa": Term(repa_loss(state.output.hidden[self.options.encoder_depth], model.extras["projectors"],
                                       state.targets["tokens"]), self.options.proj_coeff)}

    def from_official(self, official: dict) -> tuple[dict, list]:
        """REPA's SiT with its `projectors.{e}` (the same Linear-SiLU-Linear-SiLU-Linear layout as the zoo's)."""
        from zoo.backbones.official import take

        state, unused = super().from_official(official)
        projector_state, unused = take({k: official[k] for k in unused}, "projectors.", "extras.projectors.")
        return {**state, **projector_state}, unused
