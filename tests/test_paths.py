"""Path coefficients, targets and conversions against direct transcriptions of the equations."""
import math

import pytest
import torch

from zoo.flow.interpolants import CosinePath, LinearPath, build_path
from zoo.errors import ConfigError

T = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.9, 1.0])


def test_linear_coefficients():
    p = LinearPath()
    assert torch.allclose(p.alpha(T), 1 - T)
    assert torch.allclose(p.sigma(T), T)
    assert torch.allclose(p.d_alpha(T), -torch.ones_like(T))
    assert torch.allclose(p.d_sigma(T), torch.ones_like(T))


def test_cosine_coefficients():
    p = CosinePath()
    assert torch.allclose(p.alpha(T), torch.cos(math.pi * T / 2))
    assert torch.allclose(p.sigma(T), torch.sin(math.pi * T / 2))
    # derivatives by finite differences
    h = 1e-4
    Td = T.double().clamp(h, 1 - h)
    assert torch.allclose(p.d_alpha(Td), (p.alpha(Td + h) - p.alpha(Td - h)) / (2 * h), atol=1e-6)
    assert torch.allclose(p.d_sigma(Td), (p.sigma(Td + h) - p.sigma(Td - h)) / (2 * h), atol=1e-6)


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()])
def test_interpolant_and_target(path):
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.rand(6, generator=g)
    a, s = path.alpha(t)[:, None, None, None], path.sigma(t)[:, None, None, None]
    da, ds = path.d_alpha(t)[:, None, None, None], path.d_sigma(t)[:, None, None, None]
    assert torch.allclose(path.interpolate(x, eps, t), a * x + s * eps)
    assert torch.allclose(path.velocity_target(x, eps, t), da * x + ds * eps)
    # t = 1 is noise, t = 0 is data
    assert torch.allclose(path.interpolate(x, eps, torch.ones(6)), eps, atol=1e-6)
    assert torch.allclose(path.interpolate(x, eps, torch.zeros(6)), x, atol=1e-6)


def test_linear_target_is_eps_minus_x():
    x, eps, t = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4)
    assert torch.allclose(LinearPath().velocity_target(x, eps, t), eps - x)


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()])
def test_velocity_conversions_recover_eps_and_data(path):
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(5, 8, generator=g).double(), torch.randn(5, 8, generator=g).double()
    t = torch.rand(5, generator=g).double() * 0.9 + 0.05
    x_t, v = path.interpolate(x, eps, t), path.velocity_target(x, eps, t)
    assert torch.allclose(path.velocity_to_eps(v, x_t, t), eps)
    assert torch.allclose(path.velocity_to_data(v, x_t, t), x)
    assert torch.allclose(path.velocity_to_score(v, x_t, t), -eps / path.sigma(t)[:, None])


def test_linear_data_from_velocity_is_xt_minus_tv():
    x_t, v, t = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3)
    assert torch.allclose(LinearPath().velocity_to_data(v, x_t, t), x_t - t[:, None] * v, atol=1e-6)


def test_unknown_path_lists_valid():
    with pytest.raises(ConfigError, match="cosine, linear"):
        build_path("vp")
