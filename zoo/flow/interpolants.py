"""Interpolant paths: x_t = alpha(t) * x + sigma(t) * eps.

Convention used everywhere in the zoo: **t = 1 is pure noise, t = 0 is data** (as in REPA and
DeepFlow; SiT's own code and DDT use the opposite). A path only defines its four coefficients;
everything else (interpolation, velocity target, conversions between velocity, noise, data and
score) is derived once here, so every method and sampler shares one implementation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_batch(t, like: Tensor) -> Tensor:
    """Broadcast a time (float, 0-d or [B] tensor) against a batch tensor shaped [B, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


class Path:
    """Base interpolant. Subclasses override the coefficients and their time derivatives."""

    name = "base"

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _coefficients(self, t, like: Tensor):
        t = _as_batch(t, like)
        return self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)

    def interpolate(self, x: Tensor, eps: Tensor, t) -> Tensor:
        """x_t = alpha_t x + sigma_t eps."""
        a, s, _, _ = self._coefficients(t, x)
        return a * x + s * eps

    def velocity_target(self, x: Tensor, eps: Tensor, t) -> Tensor:
        """v* = alpha'_t x + sigma'_t eps (for the linear path: eps - x)."""
        _, _, da, ds = self._coefficients(t, x)
        return da * x + ds * eps

    def velocity_to_eps(self, v: Tensor, x_t: Tensor, t) -> Tensor:
        """Solve x_t = a x + s eps, v = a' x + s' eps for eps."""
        a, s, da, ds = self._coefficients(t, x_t)
        return (a * v - da * x_t) / (a * ds - da * s)

    def velocity_to_data(self, v: Tensor, x_t: Tensor, t) -> Tensor:
        """Solve the same system for x (linear path: x_t - t v)."""
        a, s, da, ds = self._coefficients(t, x_t)
        return (ds * x_t - s * v) / (a * ds - da * s)

    def velocity_to_score(self, v: Tensor, x_t: Tensor, t) -> Tensor:
        """Score of p_t at x_t: -eps_hat / sigma_t."""
        _, s, _, _ = self._coefficients(t, x_t)
        return -self.velocity_to_eps(v, x_t, t) / s


class LinearPath(Path):
    """Rectified flow / SiT "Linear": alpha = 1 - t, sigma = t."""

    name = "linear"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)


class CosinePath(Path):
    """SiT "GVP": alpha = cos(pi t / 2), sigma = sin(pi t / 2) (variance preserving)."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


PATHS = {cls.name: cls for cls in (LinearPath, CosinePath)}


def build_path(name: str) -> Path:
    from zoo.errors import ConfigError

    if name not in PATHS:
        raise ConfigError(f"unknown flow.path {name!r}; valid: {', '.join(sorted(PATHS))}")
    return PATHS[name]()
