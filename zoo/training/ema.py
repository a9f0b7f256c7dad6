"""Exponential moving average of every float parameter and buffer of a model (BN statistics included).

Keys under the `copied` prefixes are not averaged but copied from the live model at every update (REPA-E's
VAE, which its official code never averages)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, copied: tuple = ()):
        self.decay, self.warmup, self.copied = decay, warmup, tuple(copied)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """With warm-up, early averages forget fast: min(decay, (1 + step) / (10 + step))."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        ema_state, live_state = self.module.state_dict(), model.state_dict()
        averaged = {k: v.dtype.is_floating_point and not k.startswith(self.copied) for k, v in live_state.items()}
        floats = [(ema_state[k], v) for k, v in live_state.items() if averaged[k]]
        if floats:
            ema_t, live_t = zip(*floats)
            torch._foreach_lerp_(list(ema_t), list(live_t), 1 - decay)
        for k, v in live_state.items():  # integer buffers (e.g. BN's batch counter) and copied keys
            if not averaged[k]:
                ema_state[k].copy_(v)
