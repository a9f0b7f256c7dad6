"""ReDi (zelaki/ReDi): the official joint model's weights in the zoo's ReDi give the official training loss
(features kept and dropped) and gradients, and the official SDE samples with CFG of all channels, CFG of the
image channels (--cfg-vae) and representation guidance. ReDi's code is a fork of SiT's: its network sees
t = 1 as data (`model.time_convention=data`)."""
import pytest
import torch

import zoo.flow.samplers
from golden import assert_close, assert_total_and_grads, fixture, loaded, official_method, sit_overrides
from zoo.flow.guidance import Guidance
from zoo.training.method import DataInfo, TrainContext
from zoo.flow.samplers import build_sampler

LOSS = fixture("redi_loss")
RANK = LOSS["config"]["pca_rank"]
REDI = [*sit_overrides(LOSS["config"]), "model.time_scale=1", "model.time_convention=data", f"redi.rank={RANK}"]


@pytest.fixture(scope="module")
def redi():
    method = official_method("redi", DataInfo(4, 8, 10), *REDI)
    return method, loaded(method, LOSS["state_dict"])


@pytest.mark.parametrize("case", ["case_keep", "case_drop"])
def test_training_loss_and_gradients_equal_the_official_transport(redi, monkeypatch, case):
    method, model = redi
    draws, expected = LOSS["inputs"][case], LOSS["outputs"][case]
    model.train()
    monkeypatch.setattr(method, "clean", lambda model, batch: (LOSS["inputs"]["x_joint"].clone(), {}))
    monkeypatch.setattr(method, "noise", lambda x: (1 - draws["t"], draws["noise_x0"]))
    monkeypatch.setattr(method, "drop_features", lambda: expected["features_dropped"])
    monkeypatch.setattr(method, "drop_labels", lambda model, y: expected["labels_effective"])
    terms = method.loss_terms(model, {"label": LOSS["inputs"]["y"]}, TrainContext(0, None))
    assert terms["features"].weight == expected["lam"]
    assert_close(terms["flow"].value, expected["loss_img_per_sample"].mean(), what="image loss")
    assert_close(terms["features"].value, expected["loss_feat_per_sample"].mean(), what="feature loss")
    assert_total_and_grads(method, model, terms, expected["loss_total"], LOSS["state_dict"], expected["grads"])
    model.eval()


SAMPLING = fixture("redi_sampling")


@pytest.mark.parametrize("case, cfg, rg, cfg_features", [("cfg_all_channels", 2.4, 1.0, True),
                                                         ("cfg_image_only", 2.4, 1.0, False),
                                                         ("rg", 1.0, 1.8, False)])
def test_sde_samples_with_cfg_and_representation_guidance_equal_the_official_sampler(redi, monkeypatch, case, cfg,
                                                                                     rg, cfg_features):
    """The official SDE (SiT's Euler-Maruyama, diffusion (1 - t), last step 'Mean' of 0.04) is the zoo's sampler with
    w_t = 2t on the same grid; the official noise is fed to it."""
    method, model = redi
    run = SAMPLING["outputs"][case]
    noises = iter(run["em_noise_first_half"])
    monkeypatch.setattr(zoo.flow.samplers, "_randn_like", lambda x, generator: next(noises))
    monkeypatch.setattr(method.options, "cfg_features", cfg_features)
    sampler = build_sampler("sde", SAMPLING["config"]["sde"]["num_steps"])
    field = method.velocity_field(model, SAMPLING["inputs"]["y"], Guidance(cfg), rg=rg)
    with torch.no_grad():
        out = sampler.sample(field, SAMPLING["inputs"]["z"], method.path)
    expected = run["final_kept_by_sample_ddp"] if "final_kept_by_sample_ddp" in run else run["final_full"][:4]
    assert_close(out, expected, tol=1e-5, what=case)


@pytest.mark.parametrize("preset", ["B", "XL"])
def test_the_paper_presets_are_the_official_recipe(preset):
    from zoo.config import load_config

    cfg = load_config("redi", [f"preset={preset}"])
    assert (cfg.redi.rank, cfg.redi.feature_weight, cfg.redi.feature_dropout, cfg.redi.dropped_features) == \
        (8, 1.0, 0.0, "noise")
    assert (cfg.model.time_scale, cfg.model.time_convention, cfg.optim.grad_clip, cfg.train.ema_decay) == \
        (1.0, "data", 0.0, 0.9999)
