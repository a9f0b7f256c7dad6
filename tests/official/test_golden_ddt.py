"""DDT (MCG-NJU/DDT): the released model's weights in the zoo's DDT give its velocity, self-condition and block
outputs at two resolutions; its REPA loss; its Euler sampler with the last step at 0.04 and a guidance interval,
with the encoder recomputed every step or every 3 (refresh rate) or on the statistical DP schedule.

The released DDT sees t = 1 as data (time embedded at periods up to 10); the zoo feeds it 1 - t
(`model.time_convention=data`) and negates its velocity.
"""
import pytest
import torch

from golden import assert_close, assert_grads, fixture, loaded, official_method, zoo_entries
from methods import ddt_sharing as sharing
from zoo.backbones.ddt import ddt_parameter_count
from zoo.config import load_config
from zoo.flow.guidance import Guidance
from zoo.training.method import DataInfo, TrainContext
from zoo.flow.samplers import build_sampler

DDT = ["model.size=custom", "model.hidden=32", "model.depth=4", "model.heads=4", "model.patch=2", "model.time_scale=1",
       "model.time_max_period=10", "ddt.decoder_depth=1", "ddt.encoder_depth=2", "ddt.projector_dim=64",
       "model.class_dropout=0"]
FORWARD = fixture("ddt_forward")


@pytest.fixture(scope="module")
def ddt(request):
    import zoo.teachers.teacher

    real = zoo.teachers.teacher.encoder_dims
    zoo.teachers.teacher.encoder_dims = lambda names, cfg: [32]
    try:
        method = official_method("ddt", DataInfo(4, 8, 10), *DDT)
        projector = fixture("ddt_repa_loss")["state_dict"]
        return method, loaded(method, {**FORWARD["state_dict"], **projector})
    finally:
        zoo.teachers.teacher.encoder_dims = real


@pytest.mark.parametrize("size", ["x8", "x16"])
def test_velocity_self_condition_and_blocks_equal_the_released_model(ddt, size):
    method, model = ddt
    bb, inputs, out = model.backbone, FORWARD["inputs"], FORWARD["outputs"]
    x, t, y = inputs[size], inputs[f"t{size[1:]}"], inputs[f"y{size[1:]}"]
    if size == "x16":  # same weights, a 8x8 token grid: the RoPE positions are linspace(0, 16, 8)
        method16 = official_method("ddt", DataInfo(4, 16, 10), *DDT)
        model16 = method16.build_model()
        model16.load_state_dict(model.state_dict())
        bb = model16.eval().backbone
    result = bb(x, 1 - t, y, hidden_layers=(1, 2, 3, 4))
    assert_close(result.velocity, -out[f"{size}_velocity"], what="velocity")
    assert_close(bb.encode_condition(x, 1 - t, y), out[f"{size}_state"], what="self-condition z")
    for k in range(4):
        assert_close(result.hidden[k + 1], out[f"{size}_block{k}"], what=f"block {k + 1}")


def test_repa_loss_and_gradients_equal_the_released_trainer(ddt, monkeypatch):
    method, model = ddt
    golden = fixture("ddt_repa_loss")
    inputs, expected = golden["inputs"], golden["outputs"]
    model.train()
    monkeypatch.setattr(method, "noise", lambda x: (1 - inputs["base_t"], inputs["noise"]))
    monkeypatch.setattr(method, "targets", lambda batch: {"tokens": [inputs["target_tokens"]]})
    terms = method.loss_terms(model, {"image": inputs["x"], "label": inputs["y"]}, TrainContext(0, None))
    assert_close(terms["flow"].value, expected["fm_loss"], what="flow loss")
    assert_close(1 + terms["repa"].value, expected["cos_loss"], what="1 - cos (the zoo logs -cos)")
    total = sum(term.weight * term.value for term in terms.values())
    assert_close(total + 0.5, expected["loss"], what="total")
    total.backward()
    official = {**FORWARD["state_dict"], **golden["state_dict"]}
    assert_grads(method, model, official, {**expected["grads"], **expected["proj_grads"]})
    model.eval()


def euler(method, model, golden_inputs, share=None, guidance=Guidance(2.0, 0.0, 0.7)):
    sampler = build_sampler("ode", 10, "euler", last_step=0.04)
    kwargs = {"share": share} if share else {}
    field = method.velocity_field(model, golden_inputs["labels"], guidance, sampler=sampler, **kwargs)
    with torch.no_grad():
        return sampler.sample(field, golden_inputs["noise"], method.path), field


@pytest.mark.parametrize("rate", [1, 3])
def test_the_euler_sampler_with_last_step_and_refresh_rate_equals_the_released_one(ddt, rate):
    method, model = ddt
    golden = fixture("ddt_sampler")
    out, field = euler(method, model, golden["inputs"], share=None if rate == 1 else f"every:{rate}")
    assert_close(out, golden["outputs"][f"rate{rate}_samples"], tol=2e-5, what=f"samples, refresh rate {rate}")
    if rate == 3:
        recomputed = golden["outputs"]["rate3_state_recomputed"].nonzero().flatten().tolist()
        assert [step for step, _ in field.encoder_calls] == recomputed


def test_the_time_grid_ends_with_a_step_from_0_04_and_guidance_follows_the_interval():
    golden = fixture("ddt_sampler")["outputs"]
    from zoo.flow.samplers import time_grid

    assert_close(time_grid(10, 0.04), 1 - golden["timesteps"].double(), tol=1e-7, what="time grid")
    guided = [Guidance(2.0, 0.0, 0.7).active(float(t)) for t in time_grid(10, 0.04)[:-1]]
    assert guided == golden["rate1_guidance_applied"].tolist()


def test_the_dp_schedule_from_the_released_similarity_and_its_samples(ddt):
    method, model = ddt
    golden = fixture("ddt_sharing_dp")
    out = golden["outputs"]
    # the released code's cumulative reuse error and its DP give the zoo's cost and schedule
    sim = out["similarity"].double()
    cost = sharing.reuse_costs(sim.numpy())
    for s in range(10):
        for e in range(s, 10):
            assert cost[s, e] == pytest.approx(float(out["error_map_cumulated"][e, s]), abs=1e-5)
    assert sharing.dp_schedule(sim.numpy(), 3) == out["dp_timesteps"].tolist()
    assert sharing.dp_schedule(sim.numpy(), 5) == out["rate2_dp_timesteps"].tolist()
    assert sharing.dp_schedule(sim.numpy(), 2) == out["rate4_dp_timesteps"].tolist()
    # the zoo's calibration of the same template (both CFG halves at every step) gives the same similarity
    zs = []
    field = sharing.SharedConditionField(model.backbone, out["template_condition"], Guidance(2.0, 0.0, 0.7),
                                         range(10), on_encode=lambda step, z: zs.append(z), both_halves=True)
    sampler = build_sampler("ode", 10, "euler", last_step=0.04)
    with torch.no_grad():
        template = sampler.sample(field, out["template_noise"], method.path)
    assert_close(template, out["template_samples"], tol=2e-5, what="template samples")
    assert_close(sharing.similarity_matrix(torch.stack(zs)).float(), out["similarity"], tol=1e-5, what="similarity")
    # sampling with the released DP steps
    sampler_out, field = euler(method, model, golden["inputs"], share=None)
    schedule = out["dp_timesteps"].tolist()
    shared = sharing.SharedConditionField(model.backbone, golden["inputs"]["labels"], Guidance(2.0, 0.0, 0.7),
                                          schedule)
    with torch.no_grad():
        samples = sampler.sample(shared, golden["inputs"]["noise"], method.path)
    assert_close(samples, out["samples"], tol=2e-5, what="samples with the DP schedule")
    assert [step for step, _ in shared.encoder_calls] == schedule


def test_initialisation_is_the_released_one():
    """Which parameters start at zero, and the spread of the rest, as the released DDT's initialize_weights."""
    stats = fixture("ddt_init")["outputs"]["stats_brief_h64"]
    method = official_method("ddt", DataInfo(4, 8, 10), *[o.replace("hidden=32", "hidden=64") for o in DDT])
    torch.manual_seed(0)
    model = method.build_model()
    fresh = {k: v.detach() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    official = {k: torch.zeros(st["shape"]) for k, st in stats.items()} | fixture("ddt_repa_loss")["state_dict"]
    mapping = {key: [k for k, _, _ in zoo_entries(method, official, key, torch.ones(st["shape"]))]
               for key, st in stats.items()}
    for key, st in stats.items():
        for zoo_key in mapping[key]:
            value = fresh[zoo_key]
            assert bool((value == 0).all()) == st["all_zero"], f"{key} -> {zoo_key}: zero-initialised or not"
            if not st["all_zero"] and st["std"] > 0:
                assert value.float().std().item() == pytest.approx(st["std"], rel=0.3), f"{key} -> {zoo_key}"


def test_parameter_counts_and_the_xl_recipe():
    golden = fixture("ddt_init")["outputs"]
    assert ddt_parameter_count("XL", decoder_depth=6) == golden["param_count_ddt_xl2"]
    cfg = load_config("ddt", ["preset=XL"])
    assert (cfg.model.time_scale, cfg.model.time_max_period, cfg.model.time_convention) == (1.0, 10.0, "data")
    assert (cfg.model.pos_embed, cfg.model.rope_extent, cfg.model.init, cfg.model.final_norm) == \
        ("none", 16.0, "ddt", "layernorm")
    assert (cfg.optim.grad_clip, cfg.optim.beta2, cfg.sample.last_step, cfg.sample.steps) == (0.0, 0.95, 0.04, 250)
