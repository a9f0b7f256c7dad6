"""DeepFlow: deeply supervised flow models with VeRA blocks (Shin et al., ICCV 2025). See docs/methods/deepflow.md.

    L = sum_i w_i || v_i - v*(t_i) ||^2  +  lambda_acc sum_{i<K} || x_{t_i} - t_i sg(v_i) + 0.5 a_i t_i^2 - x ||^2
        [ + lambda_REPA * mean_j L_REPA(post-VeRA state j) ]

The backbone (zoo/backbones/deepflow.py) is a SiT cut into K branches with a velocity head after
each and a VeRA block between them. Branch 1 sees the time t of the noisy input; each later branch
a time one small step away, t_{i+1} = clamp(t_i +/- U(0, time_gap), 0, 1), the sign drawn once per
training step (the official code's coin). At sampling every branch gets the same t and only the
final velocity is used, through the core's samplers. With `deepflow.repa=true` REPA's loss
(zoo/teachers/alignment.py) aligns each post-VeRA hidden state; with `repa=false` no teacher is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from zoo.teachers.alignment import projectors, repa_loss
from zoo.teachers.teacher import Teacher, TeacherOptions, check_options
from zoo.backbones.deepflow import build_deepflow_sit, check_splits
from zoo.backbones.sit import resolve_size
from zoo.errors import ConfigError
from zoo.training.method import FlowState, Method, NoisyBatch, Term
from zoo.training.registry import register


@dataclass
class DeepFlowConfig(TeacherOptions):  # the teacher's options: used only with repa=true
    splits: list[int] = field(default_factory=lambda: [8, 16])           # split after these blocks (XL/2-3T)
    weights: list[float] = field(default_factory=lambda: [0.2, 0.2, 1.0])  # w_i, one per branch, the last = final
    time_gap: float = 0.01          # beta: upper bound of |t_{i+1} - t_i|
    acc_coeff: float = 1.0          # lambda_acc
    acc_mlp_dim: int = 2048         # hidden width P of ACC_MLP (H -> P -> 2P -> P -> H)
    repa: bool = False              # REPA on the post-VeRA hidden states
    legacy_scaling: bool = False    # clamp the time-gap modulation's scale to [-5, 5] (official --legacy-scaling,
                                    # which its README asks for with REPA ("ssl-align"))
    # REPA's options (methods/repa.py), used only with repa=true
    projector_dim: int = 2048
    proj_coeff: float = 0.5


def branch_times(t: Tensor, branches: int, max_gap: float) -> list:
    """[t_1 = t, t_2, ..., t_K]: t_{i+1} = clamp(t_i + s * U(0, max_gap), 0, 1), one sign s for the whole step.

    Draws the sign first (one uniform), then one gap per sample and branch.
    """
    sign = 1.0 if torch.rand(()) < 0.5 else -1.0
    times = [t]
    for _ in range(branches - 1):
        gap = torch.rand(t.shape, device=t.device, dtype=t.dtype) * max_gap
        times.append((times[-1] + sign * gap).clamp(0.0, 1.0))
    return times


def deep_supervision_terms(velocities: list, targets: list, weights: list, flow_loss) -> dict:
    """sum_i w_i L_v(v_i, v*_i) as named terms: `flow` for the final branch (what every method logs), `flow_bI` for
    intermediate branch I."""
    terms = {f"flow_b{i}": Term(flow_loss(v, target), float(w))
             for i, (v, target, w) in enumerate(zip(velocities[:-1], targets[:-1], weights[:-1]), start=1)}
    terms["flow"] = Term(flow_loss(velocities[-1], targets[-1]), float(weights[-1]))
    return terms


def acceleration_loss(x: Tensor, noisy: list, times: list, velocities: list, accelerations: list) -> Tensor:
    """sum_i E || x_{t_i} - t_i sg(v_i) + 0.5 a_i t_i^2 - x ||^2 over the VeRA blocks i = 1..K-1.

    A second-order step from t_i to 0 (dt = -t_i); with a = 0 it is the first-order reconstruction error, zero for
    the exact velocity on the linear path. The velocity is detached: this loss trains the acceleration only.
    """
    total = x.new_zeros((), dtype=torch.float32)
    for x_t, t, v, a in zip(noisy, times, velocities, accelerations):
        t = t.float().reshape(-1, *([1] * (x.dim() - 1)))
        x0_hat = x_t.float() - t * v.detach().float() + 0.5 * a.float() * t ** 2
        total = total + ((x0_hat - x.float()) ** 2).mean()   # per sample, then over the batch
    return total


@register
class DeepFlow(Method):
    name = "deepflow"
    description = "DeepFlow: branched SiT, deep supervision, VeRA blocks and an acceleration loss (REPA optional)"
    config_class = DeepFlowConfig

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        o = self.options
        self.splits = check_splits(o.splits, resolve_size(cfg.model)["depth"])
        if len(o.weights) != len(self.splits) + 1:
            raise ConfigError(f"deepflow.weights has {len(o.weights)} values but deepflow.splits={list(o.splits)} "
                              f"makes {len(self.splits) + 1} branches: give one weight per branch")
        if not 0 <= o.time_gap <= 1:
            raise ConfigError(f"deepflow.time_gap={o.time_gap} must lie in [0, 1]")
        check_options(o, self.name)
        self.teacher = Teacher(o, cfg, grid=self.token_grid(), owner=self.name) if o.repa else None  # with repa=true

    def build_backbone(self) -> nn.Module:
        c, size, _ = self.state_shape()
        return build_deepflow_sit(self.cfg.model, splits=self.splits, acc_dim=self.options.acc_mlp_dim,
                                  input_size=size, in_channels=c, num_classes=self.data.num_classes,
                                  legacy_scaling=self.options.legacy_scaling)

    def build_extras(self, backbone) -> dict:
        if self.teacher is None:
            return {}
        # one set of projectors per VeRA block: each post-VeRA state is aligned on its own
        return {"projectors": nn.ModuleList(projectors(backbone.hidden_size, self.options.projector_dim,
                                                       self.teacher.dims()) for _ in self.splits)}

    def setup(self, device, training: bool = True) -> None:
        super().setup(device, training)
        if self.teacher is not None:
            self.teacher.setup(self.device, training)

    def targets(self, batch: dict) -> dict:
        return {"tokens": self.teacher.tokens(batch)} if self.teacher is not None else {}

    def losses(self, model, noisy: NoisyBatch, ctx) -> dict:
        """Per-branch times, deep supervision, the acceleration loss, then `extra_losses` (REPA)."""
        o, x, eps, t = self.options, noisy.x, noisy.eps, noisy.t
        times = branch_times(t, len(self.splits) + 1, o.time_gap)
        out = model.backbone(noisy.x_t, t, noisy.y, branch_times=times[1:])
        velocity_targets = [self.path.velocity_target(x, eps, s) for s in times]
        terms = deep_supervision_terms(out.velocities, velocity_targets, o.weights, self.flow_loss)
        noisy_states = [noisy.x_t] + [self.path.interpolate(x, eps, s) for s in times[1:-1]]  # x_{t_i} per VeRA block
        terms["acc"] = Term(acceleration_loss(x, noisy_states, times[:-1], out.velocities[:-1], out.accelerations),
                            o.acc_coeff)
        terms.update(self.extra_losses(model, FlowState.of(noisy, out), ctx))
        return terms

    def from_official(self, official: dict) -> tuple[dict, list]:
        """The official DeepFlow (zoo/backbones/official.py) and, with REPA, its `projectors.{j}`, one per VeRA block
        (one encoder)."""
        from zoo.backbones.official import deepflow_state, prefixed

        state, unused = deepflow_state(official)
        state = prefixed(state, "backbone.")
        if self.options.repa:
            for key in [k for k in unused if k.startswith("projectors.")]:
                _, j, rest = key.split(".", 2)
                state[f"extras.projectors.{j}.0.{rest}"] = official[key]
            unused = [k for k in unused if not k.startswith("projectors.")]
        return state, unused

    def extra_losses(self, model, state: FlowState, ctx) -> dict:
        if self.teacher is None:
            return {}
        per_block = [repa_loss(h, projectors, state.targets["tokens"])
                     for h, projectors in zip(state.output.refined, model.extras["projectors"])]
        return {"repa": Term(torch.stack(per_block).mean(), self.options.proj_coeff)}
