"""Samplers that carry noise (t = 1) to data (t = 0) along a velocity field.

A velocity field is any callable `field(x, t, step) -> v`, where `t` is a [B] tensor and `step`
the index of the outer sampler step (encoder sharing and similar tricks key on it). Every
method's sampling goes through these classes; methods change the field, never the integrator.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from zoo.errors import ConfigError
from zoo.paths import Path

Field = Callable[[Tensor, Tensor, int], Tensor]


def _t_batch(t: Tensor, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU generator seeds CUDA runs too)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def time_grid(steps: int, t_end: float = 0.0) -> Tensor:
    """steps + 1 times from 1 down to t_end, in float64 so that step sizes are exact."""
    return torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)


class Sampler:
    name = "base"

    def __init__(self, steps: int):
        if steps < 1:
            raise ConfigError(f"sampler steps must be >= 1, got {steps}")
        self.steps = steps

    def sample(self, field: Field, noise: Tensor, path: Path, generator: Optional[torch.Generator] = None) -> Tensor:
        raise NotImplementedError


class EulerODE(Sampler):
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i): one evaluation per step."""

    name = "euler"

    def sample(self, field, noise, path, generator=None):
        x, ts = noise, time_grid(self.steps)
        for i in range(self.steps):
            v = field(x, _t_batch(ts[i], x), i)
            x = x + float(ts[i + 1] - ts[i]) * v
        return x


class HeunODE(Sampler):
    """Heun's second-order method (explicit trapezoid): two evaluations per step."""

    name = "heun"

    def sample(self, field, noise, path, generator=None):
        x, ts = noise, time_grid(self.steps)
        for i in range(self.steps):
            dt = float(ts[i + 1] - ts[i])
            v = field(x, _t_batch(ts[i], x), i)
            x_euler = x + dt * v
            v_next = field(x_euler, _t_batch(ts[i + 1], x), i)
            x = x + dt * 0.5 * (v + v_next)
        return x


class AdaptiveODE(Sampler):
    """dopri5 through torchdiffeq (atol 1e-6, rtol 1e-3, SiT's defaults); `steps` is ignored."""

    name = "dopri5"

    def __init__(self, steps: int = 1, atol: float = 1e-6, rtol: float = 1e-3):
        super().__init__(max(steps, 1))
        self.atol, self.rtol = atol, rtol

    def sample(self, field, noise, path, generator=None):
        from torchdiffeq import odeint

        calls = [0]

        def rhs(t, x):
            calls[0] += 1
            return field(x, _t_batch(t, x), calls[0] - 1)

        times = torch.tensor([1.0, 0.0], device=noise.device, dtype=noise.dtype)
        return odeint(rhs, noise, times, method="dopri5", atol=self.atol, rtol=self.rtol)[-1]


class EulerMaruyamaSDE(Sampler):
    """Reverse-time SDE dx = [v - w_t/2 * score] dt + sqrt(w_t) dW with w_t = 2t (REPA's sampler).

    Times follow linspace(1, t_last, steps); the last move t_last -> 0 is the noise-free mean step,
    so the number of model evaluations equals `steps`.
    """

    name = "sde"

    def __init__(self, steps: int, t_last: float = 0.04):
        super().__init__(steps)
        if steps < 2:
            raise ConfigError("the SDE sampler needs at least 2 steps")
        self.t_last = t_last

    @staticmethod
    def diffusion(t: float) -> float:
        return 2.0 * t

    def sample(self, field, noise, path, generator=None):
        ts = torch.cat([torch.linspace(1.0, self.t_last, self.steps, dtype=torch.float64),
                        torch.zeros(1, dtype=torch.float64)])
        x = noise
        for i in range(self.steps):
            t_cur, dt = float(ts[i]), float(ts[i + 1] - ts[i])
            t_vec = _t_batch(t_cur, x)
            v = field(x, t_vec, i)
            w = self.diffusion(t_cur)
            drift = v - 0.5 * w * path.velocity_to_score(v, x, t_vec)
            x = x + drift * dt
            if i < self.steps - 1:  # the last step is the mean step: no noise
                dw = _randn_like(x, generator) * abs(dt) ** 0.5
                x = x + w ** 0.5 * dw
        return x


ODE_SOLVERS = {"euler": EulerODE, "heun": HeunODE, "dopri5": AdaptiveODE}


def build_sampler(sampler: str, steps: int, solver: str = "euler") -> Sampler:
    """`sampler` is "ode" (with `solver` euler, heun or dopri5) or "sde" (Euler-Maruyama)."""
    if sampler == "sde":
        return EulerMaruyamaSDE(steps)
    if sampler == "ode":
        if solver not in ODE_SOLVERS:
            raise ConfigError(f"unknown ODE solver {solver!r}; valid: {', '.join(ODE_SOLVERS)}")
        return ODE_SOLVERS[solver](steps)
    raise ConfigError(f"unknown sampler {sampler!r}; valid: ode, sde")
