"""Exponential moving average of every float parameter and buffer of a model (BN statistics included)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """With warm-up, early averages forget fast: min(decay, (1 + step) / (10 + step))."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        ema_state, live_state = self.module.state_dict(), model.state_dict()
        floats = [(ema_state[k], v) for k, v in live_state.items() if v.dtype.is_floating_point]
        if floats:
            ema_t, live_t = zip(*floats)
            torch._foreach_lerp_(list(ema_t), list(live_t), 1 - decay)
        for k, v in live_state.items():  # integer buffers (e.g. BN's batch counter) are copied
            if not v.dtype.is_floating_point:
                ema_state[k].copy_(v)
