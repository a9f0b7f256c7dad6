"""SRA, self-representation alignment (Jiang et al., 2025): the model's own EMA, at a lower noise level and
a deeper block, is the teacher. See docs/methods/sra.md.

    t' = clamp(t - U(0, max_gap), 0, 1)            (t = 1 is noise: t' is the less noisy time)
    L_SRA = d( h_phi( h_s(x_t, t) ),  sg( h^EMA_d(x_t', t') ) )
    L = L_v + lambda * L_SRA

`h_s` is the student's tokens [B, N, D] after block s on x_t, `h_phi` a trainable head (the official
Linear(D, 2D) -> SiLU -> Linear(2D, D)), and `h^EMA_d` the EMA model's tokens after the deeper block d on
x_t' = (1 - t') x + t' eps, with the same x, eps and labels. The distance d is the official code's
recommended `1 - F.cosine_similarity(a, b)` at weight 0.5 -- PyTorch's default dim=1, which for [B, N, D]
is the cosine over the N tokens of each channel, averaged over samples and channels -- or the paper's smooth
L1 (beta 0.05, official weight 0.2). No external encoder: nothing is downloaded or pretrained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.teachers.alignment import negative_cosine, projector
from zoo.errors import ConfigError
from zoo.training.method import Method, Term
from zoo.training.registry import register

DISTANCES = ("cosine", "token_cosine", "smooth_l1")
PROJECTORS = ("head", "mlp")


@dataclass
class SRAConfig:
    """The method's options, at cfg.sra (defaults mirrored in configs/sra.yaml)."""
    student_block: int = 8      # s: the student's block (counted from 1); 8 of 28 in SiT-XL
    teacher_block: int = 20     # d: the EMA teacher's block; 20 of 28
    max_gap: float = 0.2        # t - t' ~ U(0, max_gap)
    projector: str = "head"     # head: Linear(D, 2D) -> SiLU -> Linear(2D, D) (official) | mlp: REPA's 3 layers
    projector_dim: int = 2048   # hidden width of the `mlp` projector
    distance: str = "cosine"    # cosine (over tokens, official) | token_cosine (per token, REPA's) | smooth_l1
    weight: float = 0.5         # lambda (official: 0.5 for cosine, 0.2 for smooth_l1)


@register
class SRA(Method):
    name = "sra"
    description = "SRA: align block s to the EMA model's deeper block at a lower noise level (no external encoder)"
    config_class = SRAConfig
    # next to this file, so the method also works from another package (docs/extending.md)
    config_file = Path(__file__).resolve().parents[1] / "configs" / "sra.yaml"

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        o = self.options
        if o.distance not in DISTANCES:
            raise ConfigError(f"sra.distance={o.distance!r}; valid: {', '.join(DISTANCES)}")
        if o.projector not in PROJECTORS:
            raise ConfigError(f"sra.projector={o.projector!r}; valid: {', '.join(PROJECTORS)}")
        if not 0 <= o.max_gap <= 1:
            raise ConfigError(f"sra.max_gap must lie in [0, 1], got {o.max_gap}")

    def build_extras(self, backbone) -> dict:
        o, dim = self.options, backbone.hidden_size
        backbone.check_layers((o.student_block, o.teacher_block))
        if o.projector == "mlp":
            return {"projector": projector(dim, o.projector_dim, dim)}
        return {"projector": nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))}

    def hidden_layers(self) -> tuple:
        return (self.options.student_block,)

    def used(self) -> dict:
        return {**super().used(), "teacher": f"own EMA, block {self.options.teacher_block} at a lower noise level"}

    def teacher_time(self, t: torch.Tensor) -> torch.Tensor:
        """t' = max(t - U(0, max_gap), 0): a less noisy time for the teacher (t' <= t <= 1)."""
        return (t - self.options.max_gap * torch.rand_like(t)).clamp(min=0)

    @torch.no_grad()
    def teacher_tokens(self, ema, state) -> torch.Tensor:
        """The EMA model's tokens after block d on the same image and noise at t'; no gradient."""
        d = self.options.teacher_block
        t_teacher = self.teacher_time(state.t)
        x_teacher = self.path.interpolate(state.x, state.eps, t_teacher)
        return ema.backbone(x_teacher, t_teacher, state.y, hidden_layers=(d,), stop_after=d).hidden[d]

    def extra_losses(self, model, state, ctx) -> dict:
        if ctx.ema is None:
            raise ConfigError("sra needs the EMA model as its teacher, and this training context has none")
        o = self.options
        student = model.extras["projector"](state.output.hidden[o.student_block])
        return {"sra": Term(sra_loss(student, self.teacher_tokens(ctx.ema, state), o.distance), o.weight)}


    def from_official(self, official: dict) -> tuple[dict, list]:
        """SiT-SRA's SiT with its `ap_head` (Linear(D, 2D) -> SiLU -> Linear(2D, D)) as this method's head."""
        from zoo.backbones.official import take

        state, unused = super().from_official(official)
        rest = {k: official[k] for k in unused}
        head = {}
        for old, new in (("ap_head.linear1.", "extras.projector.0."), ("ap_head.linear2.", "extras.projector.2.")):
            mapped, _ = take(rest, old, new)
            head.update(mapped)
        return {**state, **head}, [k for k in unused if not k.startswith("ap_head.")]


def sra_loss(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """L_SRA between the projected student tokens and the detached teacher tokens [B, N, D], in fp32.

    cosine        mean over (b, d) of 1 - cos(student[b, :, d], teacher[b, :, d])  (over the tokens, official)
    token_cosine  -mean over (b, n) of cos(student[b, n], teacher[b, n])           (per token, as REPA)
    smooth_l1     smooth L1 with beta 0.05, mean over every element
    """
    teacher = teacher.detach()
    if distance == "token_cosine":
        return negative_cosine(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        if distance == "cosine":
            return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()
        return F.smooth_l1_loss(student.float(), teacher.float(), beta=0.05)
