"""REG (Martinser/REG models/sit.py, loss.py, samplers.py): the official weights in the zoo's REG give the official
velocities (image and class token), block outputs, projector outputs, losses, gradients and SDE samples. REG's
convention is the zoo's (it is REPA's code): t = 1 is noise, t unscaled."""
import pytest
import torch

import zoo.flow.samplers
from golden import assert_close, assert_total_and_grads, fixture, loaded, official_method, sit_overrides
from methods.reg import pack, unpack
from zoo.flow.guidance import Guidance
from zoo.flow.samplers import EulerMaruyamaSDE
from zoo.training.method import DataInfo, TrainContext

GOLDEN = fixture("reg_golden")
CONFIG = GOLDEN["config"]
REG = [*sit_overrides(CONFIG), f"model.mlp_ratio={CONFIG['mlp_ratio']}", "model.time_scale=1",
       f"reg.encoder_depth={CONFIG['encoder_depth']}", f"reg.projector_dim={CONFIG['projector_dim']}",
       "model.class_dropout=0"]


def reg_method(monkeypatch, *overrides):
    """The zoo's REG with a teacher of the fixture's width (its class token is as wide as its patch tokens)."""
    import zoo.teachers.teacher

    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: CONFIG["z_dims"])
    return official_method("reg", DataInfo(4, 8, CONFIG["num_classes"]), *REG, *overrides)


def test_every_official_key_is_used_and_the_class_token_has_no_position(monkeypatch):
    method = reg_method(monkeypatch)
    state, unused = method.from_official(GOLDEN["state_dict"])
    assert not unused
    assert {"backbone.class_in.weight", "backbone.class_norm.weight", "backbone.class_out.weight"} <= set(state)
    assert GOLDEN["state_dict"]["pos_embed"][0, 0].abs().max() == 0   # what REGSiT adds nothing for


def test_forward_velocities_block_outputs_and_projector_output(monkeypatch):
    method = reg_method(monkeypatch)
    model = loaded(method, GOLDEN["state_dict"])
    inputs, expected = GOLDEN["inputs"]["forward"], GOLDEN["outputs"]["forward"]
    out = model.backbone(inputs["x"], inputs["t"], inputs["y"], hidden_layers=(1, 2), class_token=inputs["cls_token"])
    assert_close(out.velocity, expected["velocity"], what="velocity")
    assert_close(out.class_velocity, expected["cls_velocity"], what="class token velocity")
    for k, block in enumerate(expected["block_outputs"], start=1):
        assert out.hidden[k].shape[1] == 1 + 16   # the class token first, then the 4x4 patch tokens
        assert_close(out.hidden[k], block, what=f"block {k}")
    assert_close(model.extras["projectors"][0](out.hidden[CONFIG["encoder_depth"]]), expected["zs"][0],
                 what="projector")


def test_loss_terms_total_and_gradients_equal_the_official_loss(monkeypatch):
    method = reg_method(monkeypatch)
    model = loaded(method, GOLDEN["state_dict"])
    inputs, expected = GOLDEN["inputs"]["loss"], GOLDEN["outputs"]["loss"]
    # the official t, noises and teacher tokens ([CLS ; patches], its CLS alone): the zoo's own step with them
    monkeypatch.setattr(method, "noise", lambda x: (inputs["time_input"].flatten(), inputs["noises"]))
    monkeypatch.setattr(method, "targets", lambda batch: {"tokens": inputs["zs"], "class_token": inputs["cls_token"]})
    monkeypatch.setattr(torch, "randn_like", lambda like: inputs["noises_cls"])   # eps_c, drawn after eps
    batch = {"image": inputs["images"], "label": inputs["y"]}
    terms = method.loss_terms(model, batch, TrainContext(0, None))
    monkeypatch.undo()
    assert set(terms) == {"flow", "cls", "repa"}
    assert (terms["repa"].weight, terms["cls"].weight) == (inputs["proj_coeff"], inputs["cls"])
    assert_close(terms["flow"].value, expected["denoising_loss"].mean(), what="flow loss")
    assert_close(terms["cls"].value, expected["denoising_loss_cls"].mean(), what="class token loss")
    assert_close(terms["repa"].value, expected["proj_loss"].mean(), what="REPA loss")
    assert_total_and_grads(method, model, terms, expected["total"], GOLDEN["state_dict"], expected["grads"])


@pytest.mark.parametrize("run", ["nocfg", "cfg", "cfg_cls_cond", "cfg_cls3"])
def test_the_sde_sampler_on_the_packed_state_gives_the_official_samples(monkeypatch, run):
    """The zoo's Euler-Maruyama sampler, fed the official per-step noises of the image and the class token, on the
    field of `REG.velocity_field`: the official euler_maruyama_sampler's samples (its class token dropped). The
    official cls_cfg_scale 0 (the class token's conditional drift) is the zoo's class scale 1."""
    method = reg_method(monkeypatch)
    model = loaded(method, GOLDEN["state_dict"])
    inputs, expected = GOLDEN["inputs"]["sampling"], GOLDEN["outputs"]["sampling"][run]
    noises = iter(pack(eps, cls) for eps, cls in zip(expected["eps"], expected["cls_eps"]))
    monkeypatch.setattr(zoo.flow.samplers, "_randn_like", lambda x, generator: next(noises))
    guidance = Guidance(expected["cfg_scale"], expected["guidance_low"], expected["guidance_high"])
    field = method.velocity_field(model, inputs["y"], guidance, class_cfg=expected["cls_cfg_scale"] or 1.0)
    state = EulerMaruyamaSDE(inputs["num_steps"]).sample(field, pack(inputs["latents"], inputs["cls_latents"]),
                                                         method.path)
    assert next(noises, None) is None   # every official draw was used: one per noisy step
    assert_close(unpack(state, (4, 8, 8))[0], expected["samples"].float(), what=f"samples ({run})")
