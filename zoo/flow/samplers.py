"""Samplers that carry noise (t = 1) to data (t = 0) along a velocity field.

A velocity field is any callable `field(x, t, step, guide_at=None) -> v`, where `t` is a [B] float64
tensor, `step` the index of the outer sampler step (encoder sharing and similar tricks key on it)
and `guide_at`, when given, the time whose guidance interval decides whether guidance applies
(REPA's Heun decides the corrector's from the step's start). Every method's sampling goes through
these classes; methods change the field, never the integrator.

As in REPA's samplers, the state is integrated in float64 and handed to the field in the noise's
dtype, and times stay float64, so a guidance interval's ends are compared exactly.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from zoo.config import ODE_SOLVER_NAMES
from zoo.errors import ConfigError
from zoo.flow.interpolants import Path

Field = Callable[[Tensor, Tensor, int], Tensor]


def _t_batch(t: Tensor, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float64)


def _evaluate(field: Field, x: Tensor, dtype: torch.dtype, t: float, step: int, **kwargs) -> Tensor:
    """The field at the float64 state `x`, fed in the model's dtype, returned in float64."""
    return field(x.to(dtype), _t_batch(t, x), step, **kwargs).to(torch.float64)


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU generator seeds CUDA runs too)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def time_grid(steps: int, last_step: float = 0.0) -> Tensor:
    """steps + 1 float64 times from 1 down to 0: uniform, or with `last_step` > 0 uniform from 1 down to
    `last_step` in steps - 1 steps and then one step to 0 (DDT's sampler: `last_step=0.04`)."""
    if last_step <= 0 or steps == 1:
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    grid = torch.linspace(1.0, last_step, steps, dtype=torch.float64)
    return torch.cat([grid, grid.new_zeros(1)])


class Sampler:
    name = "base"

    def __init__(self, steps: int, last_step: float = 0.0):
        if steps < 1:
            raise ConfigError(f"sampler steps must be >= 1, got {steps}")
        if not 0 <= last_step < 1:
            raise ConfigError(f"sample.last_step={last_step} must lie in [0, 1)")
        self.steps, self.last_step = steps, last_step

    def sample(self, field: Field, noise: Tensor, path: Path, generator: Optional[torch.Generator] = None) -> Tensor:
        raise NotImplementedError


class EulerODE(Sampler):
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i): one evaluation per step."""

    name = "euler"

    def sample(self, field, noise, path, generator=None):
        x, ts = noise.to(torch.float64), time_grid(self.steps, self.last_step)
        for i in range(self.steps):
            x = x + float(ts[i + 1] - ts[i]) * _evaluate(field, x, noise.dtype, ts[i], i)
        return x.to(noise.dtype)


class HeunODE(Sampler):
    """Heun's second-order method (explicit trapezoid), as REPA's `euler_sampler(heun=True)`.

    x' = x_i + dt v(x_i, t_i);  x_{i+1} = x_i + dt (v(x_i, t_i) + v(x', t_{i+1})) / 2, where the corrector
    v(x', t_{i+1}) is guided when t_i lies in the guidance interval, and the last step is plain Euler
    (no evaluation at t = 0): 2 N - 1 evaluations. `trapezoid=True` (solver `heun_trapezoid`, the zoo's own
    variant) takes the corrector at every step, the last included, and guides it by its own time t_{i+1}.
    """

    name = "heun"

    def __init__(self, steps: int, last_step: float = 0.0, trapezoid: bool = False):
        super().__init__(steps, last_step)
        self.trapezoid = trapezoid

    def sample(self, field, noise, path, generator=None):
        x, ts = noise.to(torch.float64), time_grid(self.steps, self.last_step)
        for i in range(self.steps):
            dt = float(ts[i + 1] - ts[i])
            v = _evaluate(field, x, noise.dtype, ts[i], i)
            x_euler = x + dt * v
            if self.trapezoid:
                x = x + dt * 0.5 * (v + _evaluate(field, x_euler, noise.dtype, ts[i + 1], i))
            elif i < self.steps - 1:
                x = x + dt * 0.5 * (v + _evaluate(field, x_euler, noise.dtype, ts[i + 1], i, guide_at=_t_batch(ts[i], x)))
            else:
                x = x_euler
        return x.to(noise.dtype)


class AdaptiveODE(Sampler):
    """dopri5 through torchdiffeq (atol 1e-6, rtol 1e-3, SiT's defaults); `steps` is ignored, and there is no
    grid to end with a last step."""

    name = "dopri5"

    def __init__(self, steps: int = 1, atol: float = 1e-6, rtol: float = 1e-3, last_step: float = 0.0):
        if last_step:
            raise ConfigError(f"sample.last_step={last_step}: the adaptive dopri5 has no step grid; use euler or heun")
        super().__init__(max(steps, 1))  # pragma: no mutate -- the adaptive solver never reads its steps
        self.atol, self.rtol = atol, rtol

    def sample(self, field, noise, path, generator=None):
        from torchdiffeq import odeint

        calls = [0]

        def rhs(t, x):
            calls[0] += 1
            return field(x, _t_batch(t, x), calls[0] - 1)

        times = noise.new_tensor([1.0, 0.0])
        return odeint(rhs, noise, times, method="dopri5", atol=self.atol, rtol=self.rtol)[-1]


class EulerMaruyamaSDE(Sampler):
    """Reverse-time SDE dx = [v - w_t/2 * score] dt + sqrt(w_t) dW with w_t = 2t (REPA's sampler).

    Times follow linspace(1, t_last, steps); the last move t_last -> 0 is the noise-free mean step,
    so the number of model evaluations equals `steps`. The noise of each step is drawn in the noise's
    dtype and added to the float64 state.
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
        ts = time_grid(self.steps, self.t_last)
        x = noise.to(torch.float64)
        for i in range(self.steps):
            t_cur, dt = float(ts[i]), float(ts[i + 1] - ts[i])
            v = _evaluate(field, x, noise.dtype, t_cur, i)
            w = self.diffusion(t_cur)
            drift = v - 0.5 * w * path.velocity_to_score(v, x, _t_batch(t_cur, x))
            x = x + drift * dt
            if i < self.steps - 1:  # the last step is the mean step: no noise
                dw = _randn_like(noise, generator).to(torch.float64) * abs(dt) ** 0.5
                x = x + w ** 0.5 * dw
        return x.to(noise.dtype)


ODE_SOLVERS = {"euler": EulerODE, "heun": HeunODE, "heun_trapezoid": partial(HeunODE, trapezoid=True),
               "dopri5": AdaptiveODE}
assert tuple(ODE_SOLVERS) == ODE_SOLVER_NAMES


def build_sampler(sampler: str, steps: int, solver: str = "euler", last_step: float = 0.0) -> Sampler:
    """`sampler` is "ode" (with `solver` euler, heun, heun_trapezoid or dopri5; `last_step` as in `time_grid`)
    or "sde" (Euler-Maruyama, which always ends with REPA's mean step from 0.04)."""
    if sampler == "sde":
        return EulerMaruyamaSDE(steps)
    if sampler == "ode":
        if solver not in ODE_SOLVERS:
            raise ConfigError(f"unknown ODE solver {solver!r}; valid: {', '.join(ODE_SOLVERS)}")
        return ODE_SOLVERS[solver](steps, last_step=last_step)
    raise ConfigError(f"unknown sampler {sampler!r}; valid: ode, sde")
