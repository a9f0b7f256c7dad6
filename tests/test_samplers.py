"""The flow-matching core against closed forms.

For Gaussian data x ~ N(mu, s^2 I) the exact velocity field of any path is known:
  x_t = a x + b eps ~ N(a mu, a^2 s^2 + b^2), and
  E[v | x_t] = a' mu + (a a' s^2 + b b') / (a^2 s^2 + b^2) (x_t - a mu).
Every sampler fed that field must carry N(0, I) noise to N(mu, s^2); the score derived from it
must equal the exact score -(x_t - a mu) / (a^2 s^2 + b^2).
"""
import pytest
import torch

from zoo.flow.guidance import Guidance, guided
from zoo.flow.interpolants import CosinePath, LinearPath
from zoo.flow.samplers import AdaptiveODE, EulerMaruyamaSDE, EulerODE, HeunODE, build_sampler, time_grid
from zoo.errors import ConfigError

MU, STD = 1.5, 0.5


def exact_field(path, mu=MU, s=STD):
    def coeffs(t):
        t = t[:, None]
        return path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)

    def velocity(x, t, step=0, guide_at=None):  # a field without guidance ignores guide_at
        a, b, da, db = coeffs(t)
        return da * mu + (a * da * s ** 2 + b * db) / (a ** 2 * s ** 2 + b ** 2) * (x - a * mu)

    def score(x, t):
        a, b, _, _ = coeffs(t)
        return -(x - a * mu) / (a ** 2 * s ** 2 + b ** 2)

    return velocity, score


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()], ids=["linear", "cosine"])
@pytest.mark.parametrize("sampler,tol", [(EulerODE(200), 0.03), (HeunODE(50), 0.02), (AdaptiveODE(), 0.02),
                                         (EulerMaruyamaSDE(400), 0.05)], ids=["euler", "heun", "dopri5", "sde"])
def test_samplers_carry_noise_to_gaussian_data(path, sampler, tol):
    if isinstance(sampler, EulerMaruyamaSDE) and isinstance(path, CosinePath):
        pytest.skip("the SDE's w_t = 2t follows REPA's linear-path recipe")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    velocity, _ = exact_field(path)
    x = sampler.sample(velocity, noise, path, g)
    assert abs(x.mean().item() - MU) < tol
    assert abs(x.std().item() - STD) < tol


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()], ids=["linear", "cosine"])
def test_velocity_to_score_is_exact(path):
    velocity, score = exact_field(path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64) * 2
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.95 + 0.04
    assert torch.allclose(path.velocity_to_score(velocity(x, t), x, t), score(x, t), atol=1e-9)


def test_euler_on_constant_field_is_exact():
    noise = torch.zeros(3, 2)
    x = EulerODE(7).sample(lambda x, t, i: torch.ones_like(x), noise, LinearPath())
    assert torch.allclose(x, -torch.ones(3, 2))  # integrate v = 1 from t = 1 to 0


def test_sde_evaluates_the_model_steps_times_and_ends_with_a_mean_step():
    calls = []
    EulerMaruyamaSDE(5).sample(lambda x, t, i: calls.append(float(t[0])) or torch.zeros_like(x),
                               torch.zeros(2, 2), LinearPath(), torch.Generator().manual_seed(0))
    assert len(calls) == 5
    assert calls[0] == pytest.approx(1.0) and calls[-1] == pytest.approx(0.04)


def test_time_grid():
    assert torch.allclose(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


def test_build_sampler_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match="ode, sde"):
        build_sampler("ddim", 10)
    with pytest.raises(ConfigError, match="euler, heun, heun_trapezoid, dopri5"):
        build_sampler("ode", 10, "rk4")


class CountingModel:
    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        # conditional output = 2 x, unconditional (null label 9) = x
        return torch.where((y == 9)[:, None], x, 2 * x)


def test_cfg_combines_conditional_and_unconditional():
    model, x, y = CountingModel(), torch.ones(3, 2), torch.tensor([0, 1, 2])
    v = guided(model, x, torch.full((3,), 0.5), y, 9, Guidance(scale=1.8, low=0.0, high=0.7))
    assert torch.allclose(v, x + 1.8 * (2 * x - x))
    assert model.batch_sizes == [6]


def test_cfg_outside_interval_runs_conditional_batch_only():
    model, x, y = CountingModel(), torch.ones(3, 2), torch.tensor([0, 1, 2])
    v = guided(model, x, torch.full((3,), 0.9), y, 9, Guidance(scale=4.0, low=0.0, high=0.7))
    assert torch.allclose(v, 2 * x)
    assert model.batch_sizes == [3]  # not doubled


def test_cfg_scale_one_never_doubles():
    model = CountingModel()
    guided(model, torch.ones(2, 2), torch.full((2,), 0.5), torch.tensor([0, 1]), 9, Guidance(1.0))
    assert model.batch_sizes == [2]


def test_dopri5_passes_its_tolerances_and_counts_evaluations_as_steps(monkeypatch):
    import torchdiffeq

    seen = {}
    real = torchdiffeq.odeint

    def odeint(func, y0, t, **kwargs):
        seen.update(kwargs, times=t.tolist())
        return real(func, y0, t, **kwargs)

    monkeypatch.setattr(torchdiffeq, "odeint", odeint)
    steps = []
    AdaptiveODE(atol=1e-5, rtol=1e-2).sample(lambda x, t, i: steps.append(i) or -x, torch.ones(2, 2), LinearPath())
    assert (seen["method"], seen["atol"], seen["rtol"], seen["times"]) == ("dopri5", 1e-5, 1e-2, [1.0, 0.0])
    assert steps == list(range(len(steps))) and len(steps) > 6   # every evaluation gets the next index


@pytest.mark.parametrize("sampler", [EulerODE(5), HeunODE(5), HeunODE(5, trapezoid=True), EulerMaruyamaSDE(5)],
                         ids=["euler", "heun", "heun_trapezoid", "sde"])
def test_the_state_is_float64_inside_and_the_result_in_the_noises_dtype(sampler):
    """The field sees the state in the noise's dtype and t as float64; the update is done in float64."""
    seen = []

    def field(x, t, step, guide_at=None):
        seen.append((x.dtype, t.dtype, step))
        return torch.full_like(x, 1.0 / 3.0)

    out = sampler.sample(field, torch.zeros(2, 3), LinearPath(), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    assert all(d == torch.float32 and td == torch.float64 for d, td, _ in seen)
    steps = [s for _, _, s in seen]
    assert steps == sorted(steps) and set(steps) == set(range(5))     # every evaluation carries its outer step
    if not isinstance(sampler, EulerMaruyamaSDE):   # integrating 1/3 from t = 1 to 0 in float64: exactly -1/3
        expected = torch.full((2, 3), -1.0 / 3.0, dtype=torch.float64).float()
        assert torch.equal(out, expected)


def test_heun_variants_differ_in_their_last_step_and_corrector_guidance():
    calls = {"heun": [], "heun_trapezoid": []}
    for name, sampler in (("heun", HeunODE(4)), ("heun_trapezoid", HeunODE(4, trapezoid=True))):
        sampler.sample(lambda x, t, i, guide_at=None, n=name: calls[n].append(
            (i, float(t[0]), None if guide_at is None else float(guide_at[0]))) or torch.zeros_like(x),
            torch.zeros(1, 1), LinearPath())
    # REPA's: the corrector at t_{i+1} decides guidance from t_i, no corrector on the last step
    assert calls["heun"] == [(0, 1.0, None), (0, 0.75, 1.0), (1, 0.75, None), (1, 0.5, 0.75), (2, 0.5, None),
                             (2, 0.25, 0.5), (3, 0.25, None)]
    assert calls["heun_trapezoid"] == [(0, 1.0, None), (0, 0.75, None), (1, 0.75, None), (1, 0.5, None),
                                       (2, 0.5, None), (2, 0.25, None), (3, 0.25, None), (3, 0.0, None)]
    assert build_sampler("ode", 4, "heun_trapezoid").trapezoid and not build_sampler("ode", 4, "heun").trapezoid


def test_the_last_step_grid_and_its_use_by_the_ode_samplers():
    assert torch.allclose(time_grid(5, 0.04), torch.tensor([1.0, 0.76, 0.52, 0.28, 0.04, 0.0], dtype=torch.float64))
    assert torch.equal(time_grid(1, 0.04), torch.tensor([1.0, 0.0], dtype=torch.float64))
    times = []
    build_sampler("ode", 5, "euler", last_step=0.04).sample(lambda x, t, i: times.append(float(t[0])) or x,
                                                             torch.zeros(1, 1), LinearPath())
    assert times == pytest.approx([1.0, 0.76, 0.52, 0.28, 0.04])
    with pytest.raises(ConfigError, match="last_step"):
        build_sampler("ode", 5, "euler", last_step=1.0)


def test_heun_uses_the_last_step_grid_and_dopri5_refuses_one():
    times = []
    build_sampler("ode", 3, "heun", last_step=0.04).sample(lambda x, t, i, guide_at=None: times.append(float(t[0]))
                                                           or x, torch.zeros(1, 1), LinearPath())
    assert times == pytest.approx([1.0, 0.52, 0.52, 0.04, 0.04])
    with pytest.raises(ConfigError, match="no step grid"):
        build_sampler("ode", 3, "dopri5", last_step=0.04)
    sampler = build_sampler("ode", 3, "dopri5")
    assert (sampler.atol, sampler.rtol) == (1e-6, 1e-3)   # SiT's tolerances


@pytest.mark.parametrize("solver", ["euler", "heun", "heun_trapezoid"])
def test_many_small_steps_accumulate_in_float64(solver):
    """1000 steps of v = 1/3 from t = 1 to 0: float64 accumulation lands on -1/3 rounded to float32, float32
    accumulation would not."""
    out = build_sampler("ode", 1000, solver).sample(lambda x, t, i, guide_at=None: torch.full_like(x, 1.0 / 3.0),
                                                    torch.zeros(1, 4), LinearPath())
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((1, 4), -1.0 / 3.0))
    x32 = torch.zeros(1, 4)
    for _ in range(1000):
        x32 = x32 + (-0.001) * torch.full_like(x32, 1.0 / 3.0)
    assert not torch.equal(x32, out)   # the float32 loop differs: the test can tell the two apart


def test_grid_and_sampler_errors_are_exact():
    assert torch.equal(time_grid(2, 0.04), torch.tensor([1.0, 0.04, 0.0], dtype=torch.float64))
    assert time_grid(2, 0.04).dtype == torch.float64
    assert isinstance(build_sampler("ode", 4), EulerODE)   # the default solver
    with pytest.raises(ConfigError, match="^sampler steps must be >= 1, got 0$"):
        EulerODE(0)
    with pytest.raises(ConfigError, match="^the SDE sampler needs at least 2 steps$"):
        EulerMaruyamaSDE(1)
