"""Training-time samplers for t in [0, 1] (t = 1 is noise)."""
from __future__ import annotations

import torch


class TimeSampler:
    name = "base"

    def sample(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


class UniformTime(TimeSampler):
    """t ~ U(0, 1): REPA's and SiT's default."""

    name = "uniform"

    def sample(self, n, device=None, generator=None):
        return torch.rand(n, device=device, generator=generator)


class LogitNormalTime(TimeSampler):
    """t = sigmoid(s), s ~ N(mean, std) (SD3, DDT).

    REPA's "lognormal" option (sigma = exp(N(0, 1)), t = sigma / (1 + sigma)) is exactly this
    sampler with mean 0 and std 1, since exp(s) / (1 + exp(s)) = sigmoid(s).
    """

    name = "logit_normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def sample(self, n, device=None, generator=None):
        s = torch.randn(n, device=device, generator=generator) * self.std + self.mean
        return torch.sigmoid(s)


def build_time_sampler(flow_cfg) -> TimeSampler:
    from zoo.errors import ConfigError

    if flow_cfg.time == "uniform":
        return UniformTime()
    if flow_cfg.time in ("logit_normal", "lognormal"):
        return LogitNormalTime(flow_cfg.time_mean, flow_cfg.time_std)
    raise ConfigError(f"unknown flow.time {flow_cfg.time!r}; valid: uniform, logit_normal (alias lognormal)")
