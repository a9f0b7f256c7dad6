"""The samplers against REPA's samplers.py (euler_sampler with and without Heun, euler_maruyama_sampler) on
the same official weights, noise and labels, with CFG inside guidance intervals: the same samples and the
same model evaluations (which steps are guided, at which batch size and time)."""
import pytest
import torch

import zoo.flow.samplers
from golden import assert_close, fixture, loaded, official_method, sit_overrides
from zoo.errors import ConfigError
from zoo.flow.guidance import Guidance
from zoo.training.method import DataInfo
from zoo.flow.samplers import build_sampler

GOLDEN = fixture("repa_samplers")
MODEL = [*sit_overrides(GOLDEN["config"]), "model.time_scale=1", f"repa.encoder_depth={GOLDEN['config']['encoder_depth']}",
         f"repa.projector_dim={GOLDEN['config']['projector_dim']}"]
RUNS = GOLDEN["config"]["runs"]


@pytest.fixture(scope="module")
def zoo_model():
    import zoo.teachers.teacher

    real = zoo.teachers.teacher.encoder_dims
    zoo.teachers.teacher.encoder_dims = lambda names, cfg: GOLDEN["config"]["z_dims"]
    try:
        method = official_method("repa", DataInfo(4, 8, 1000), *MODEL)
        return method, loaded(method, GOLDEN["state_dict"])
    finally:
        zoo.teachers.teacher.encoder_dims = real


def sample(method, model, run, monkeypatch):
    """The zoo's sampler for the official run, recording every backbone evaluation as (batch, t)."""
    noises = iter(GOLDEN["inputs"]["sde_noises"])
    monkeypatch.setattr(zoo.flow.samplers, "_randn_like", lambda x, generator: next(noises))
    calls, backbone = [], model.backbone
    real_forward = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda x, t, y, **kw: calls.append((len(x), float(t[0]))) or
                        real_forward(x, t, y, **kw))
    kind = "sde" if run["sampler"] == "euler_maruyama_sampler" else "ode"
    solver = "heun" if run.get("heun") else "euler"
    guidance = Guidance(run["cfg_scale"], run.get("guidance_low", 0.0), run.get("guidance_high", 1.0))
    sampler = build_sampler(kind, GOLDEN["inputs"]["num_steps"], solver)
    labels = GOLDEN["inputs"]["y"]
    field = method.velocity_field(model, labels, guidance, sampler=sampler)
    with torch.no_grad():
        out = sampler.sample(field, GOLDEN["inputs"]["latents"], method.path)
    return out, calls


@pytest.mark.parametrize("name", list(RUNS))
def test_samples_and_evaluations_equal_the_official_samplers(zoo_model, monkeypatch, name):
    method, model = zoo_model
    if RUNS[name]["cfg_scale"] < 1:   # the official samplers never guide with it (no batch-8 call): silently nothing
        assert 8 not in GOLDEN["outputs"]["calls"][name]["eval_batch"].tolist()
        with pytest.raises(ConfigError, match="guides nothing"):   # the zoo refuses it instead
            sample(method, model, RUNS[name], monkeypatch)
        return
    out, calls = sample(method, model, RUNS[name], monkeypatch)
    official = GOLDEN["outputs"]["calls"][name]
    assert [b for b, _ in calls] == official["eval_batch"].tolist(), "guided evaluations (batch 8) differ"
    assert [t for _, t in calls] == pytest.approx(official["eval_t"].tolist(), abs=1e-12)
    assert_close(out.double(), GOLDEN["outputs"]["samples"][name], what=name)


def test_a_grid_time_on_the_interval_end_is_guided():
    """linspace(1, 0, 11) holds 0.8 exactly in float64: [0, 0.8] guides it (float32 0.8 would not)."""
    calls = GOLDEN["outputs"]["calls"]["euler_cfg1.8_low0.0_high0.8"]
    assert calls["eval_batch"].tolist()[2] == 8
    assert Guidance(1.8, 0.0, 0.8).active(torch.tensor([0.8], dtype=torch.float64))
    assert not Guidance(1.0).active(0.5)   # a scale of 1 guides nothing
    with pytest.raises(ConfigError, match="guides nothing"):   # the official samplers ignore < 1 silently: refused
        Guidance(0.5)


def test_the_zoos_trapezoid_heun_is_another_sampler(zoo_model, monkeypatch):
    method, model = zoo_model
    run = {**RUNS["heun_cfg1.8_low0.0_high0.7"]}
    official = GOLDEN["outputs"]["samples"]["heun_cfg1.8_low0.0_high0.7"]
    out, calls = sample(method, model, run, monkeypatch)
    assert_close(out.double(), official, what="heun")
    monkeypatch.undo()
    guidance = Guidance(1.8, 0.0, 0.7)
    sampler = build_sampler("ode", 10, "heun_trapezoid")
    with torch.no_grad():
        other = sampler.sample(method.velocity_field(model, GOLDEN["inputs"]["y"], guidance, sampler=sampler),
                               GOLDEN["inputs"]["latents"], method.path)
    assert (other.double() - official).abs().max() > 1e-4
