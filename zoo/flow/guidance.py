"""Classifier-free guidance with a guidance interval.

v = v_u + w (v_c - v_u), applied only while w > 1 and t_low <= t <= t_high (Kynkaanniemi et al.;
REPA's best setting is w = 1.8 with t_high = 0.7, in the zoo's convention where t = 1 is noise), as in
REPA's samplers: the interval is tested on the sampler's float64 time, so a grid time that lies on an
end of the interval is guided; a scale of 1 guides nothing, and a scale below 1, which those samplers
silently ignore, is refused. Outside the interval the model runs once on the conditional batch: the
batch is doubled only where guidance is actually applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from zoo.errors import ConfigError

# model_fn(x, t, y) -> velocity
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Guidance:
    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if self.scale < 1:   # the official samplers guide only above 1: a smaller scale would silently do nothing
            raise ConfigError(f"a guidance scale of {self.scale:g} guides nothing: it must be >= 1 (1 = no guidance)")

    def active(self, t: Tensor | float) -> bool:
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        return self.scale > 1.0 and self.low <= t <= self.high


def guided(model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor, null_label: int, guidance: Guidance,
           guide_at: Tensor | None = None) -> Tensor:
    """The guided velocity; one forward of batch B outside the interval, of 2B inside it.

    `guide_at` is the time whose interval decides (default `t`; REPA's Heun corrector: the step's start)."""
    if not guidance.active(t if guide_at is None else guide_at):
        return model_fn(x, t, y)
    null = torch.full_like(y, null_label)
    v = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance.scale * (v_cond - v_uncond)
