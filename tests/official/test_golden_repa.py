"""REPA (sihyun-yu/REPA models/sit.py, loss.py): the official weights in the zoo's REPA give the official
velocity, projector outputs, losses and gradients. REPA's convention is the zoo's: t = 1 is noise, t unscaled."""
import pytest
import torch

from golden import assert_close, assert_total_and_grads, fixture, loaded, official_method, sit_overrides
from zoo.config import load_config
from zoo.training.method import DataInfo, TrainContext

CONFIG = fixture("repa_forward")["config"]
REPA = [*sit_overrides(CONFIG), "model.time_scale=1", f"repa.encoder_depth={CONFIG['encoder_depth']}",
        f"repa.projector_dim={CONFIG['projector_dim']}", "model.class_dropout=0"]
ENCODER_DIMS = CONFIG["z_dims"]


def repa_method(monkeypatch):
    """The zoo's REPA with two teachers of widths 32 and 48, as the fixture's z_dims."""
    import zoo.teachers.teacher

    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: ENCODER_DIMS)
    return official_method("repa", DataInfo(4, 8, 10), *REPA)


def test_forward_velocity_projector_outputs_and_block_outputs(monkeypatch):
    golden = fixture("repa_forward")
    method = repa_method(monkeypatch)
    model = loaded(method, golden["state_dict"])
    x, t, y = golden["inputs"]["x"], golden["inputs"]["t"], golden["inputs"]["y"]
    out = model.backbone(x, t, y, hidden_layers=(1, 2, 3))
    assert_close(out.velocity, golden["outputs"]["velocity"], what="velocity")
    for k, expected in enumerate(golden["outputs"]["block_outputs"], start=1):
        assert_close(out.hidden[k], expected, what=f"block {k}")
    for proj, expected in zip(model.extras["projectors"], golden["outputs"]["zs"]):
        assert_close(proj(out.hidden[2]), expected, what="projector")


@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
def test_loss_terms_total_and_gradients_equal_the_official_loss(monkeypatch, weighting):
    golden = fixture("repa_loss")
    method = repa_method(monkeypatch)
    model = loaded(method, golden["state_dict"])
    draws, expected = golden["inputs"][weighting], golden["outputs"][weighting]
    # the official t and noise, the official teacher tokens: the zoo's own step with them
    monkeypatch.setattr(method, "noise", lambda x: (draws["time_input"].flatten(), draws["noises"]))
    monkeypatch.setattr(method, "targets", lambda batch: {"tokens": golden["inputs"]["zs"]})
    batch = {"image": golden["inputs"]["images"], "label": golden["inputs"]["y"]}
    terms = method.loss_terms(model, batch, TrainContext(0, None))
    assert set(terms) == {"flow", "repa"} and terms["repa"].weight == golden["inputs"]["proj_coeff"]
    assert_close(terms["flow"].value, expected["denoising_loss_mean"], what="flow loss")
    assert_close(terms["repa"].value, expected["proj_loss_mean"], what="REPA loss")
    assert_total_and_grads(method, model, terms, expected["total"], golden["state_dict"], expected["grads"])


@pytest.mark.parametrize("preset, depth", [("B", 4), ("XL", 8)])
def test_the_paper_presets_are_the_official_recipe(preset, depth):
    cfg = load_config("repa", [f"preset={preset}"])
    assert (cfg.model.time_scale, cfg.model.time_convention) == (1.0, "noise")
    assert (cfg.repa.encoder_depth, cfg.repa.projector_dim, cfg.repa.proj_coeff) == (depth, 2048, 0.5)
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.train.batch_size, cfg.train.ema_decay) == (1e-4, 1.0, 256, 0.9999)
