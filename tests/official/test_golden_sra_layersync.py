"""SRA (vvvvvjdy/SRA, SiT-SRA) and LayerSync (vita-epfl/LayerSync): the official models' weights in the zoo give
the official losses and gradients on the same draws. SRA's convention is the zoo's (t = 1 noise); LayerSync is
a fork of willisma/SiT (t = 1 data, learn_sigma)."""
import pytest

from golden import assert_close, assert_total_and_grads, fixture, loaded, official_method, sit_overrides
from zoo.config import load_config
from zoo.training.method import DataInfo, TrainContext

SRA = fixture("sra_loss")
SRA_CFG = SRA["config"]["constructor_kwargs"]
SRA_OPTS = [*sit_overrides(SRA_CFG), f"model.mlp_ratio={SRA_CFG['mlp_ratio']}", "model.time_scale=1",
            f"sra.student_block={SRA['config']['loss']['block_out_s']}",
            f"sra.teacher_block={SRA['config']['loss']['block_out_t']}"]


@pytest.mark.parametrize("distance, official", [("cosine", "cos"), ("smooth_l1", "sml1")])
def test_sra_loss_and_gradients_equal_the_official_code(monkeypatch, distance, official):
    weight = SRA["config"]["align_weights"][official]
    method = official_method("sra", DataInfo(4, 8, 10), *SRA_OPTS, f"sra.distance={distance}", f"sra.weight={weight}")
    model = loaded(method, SRA["state_dict"]).train()
    ema = loaded(method, fixture("sra_loss_ema")["state_dict"])   # the official EMA teacher, in eval mode
    inputs, outputs = SRA["inputs"], SRA["outputs"]
    monkeypatch.setattr(method, "noise", lambda x: (inputs["t"], inputs["noise"]))
    monkeypatch.setattr(method, "drop_labels", lambda model, y: inputs["labels_train"])
    monkeypatch.setattr(method, "teacher_time", lambda t: inputs["t_teacher"])
    batch = {"image": inputs["images"], "label": inputs["labels"]}
    terms = method.loss_terms(model, batch, TrainContext(0, ema))
    assert_close(terms["flow"].value, outputs["gen_loss_mean"], what="flow loss")
    assert_close(terms["sra"].value, outputs["align_loss_mean"][official], what=f"SRA {distance}")
    assert_total_and_grads(method, model, terms, outputs["total"][official], SRA["state_dict"], outputs["grads"][official])


def test_sra_xl_and_b_presets_are_the_official_recipe():
    xl, b = load_config("sra", ["preset=XL"]), load_config("sra", ["preset=B"])
    assert (xl.sra.student_block, xl.sra.teacher_block, xl.sra.max_gap, xl.sra.weight) == (8, 20, 0.2, 0.5)
    assert (xl.sra.distance, xl.sra.projector, xl.model.time_scale) == ("cosine", "head", 1.0)
    assert (b.sra.student_block, b.sra.teacher_block) == (4, 8)


LAYERSYNC = fixture("layersync_loss")
LS_CFG = LAYERSYNC["config"]["constructor_kwargs"]
LS_OPTS = [*sit_overrides(LS_CFG), f"model.mlp_ratio={LS_CFG['mlp_ratio']}", "model.time_scale=1",
           "model.time_convention=data", f"layersync.shallow_block={LS_CFG['encoder_depth']}",
           f"layersync.deep_block={LS_CFG['gt_encoder_depth']}", f"layersync.weight={LAYERSYNC['config']['reg_weight']}"]


def test_layersync_loss_and_gradients_equal_the_official_transport(monkeypatch):
    method = official_method("layersync", DataInfo(4, 8, 10), *LS_OPTS)
    model = loaded(method, LAYERSYNC["state_dict"]).train()
    inputs, outputs = LAYERSYNC["inputs"], LAYERSYNC["outputs"]
    monkeypatch.setattr(method, "noise", lambda x: (1 - inputs["t"], inputs["x0"]))
    monkeypatch.setattr(method, "drop_labels", lambda model, y: inputs["labels_train"])
    terms = method.loss_terms(model, {"image": inputs["x1"], "label": inputs["y"]}, TrainContext(0, None))
    assert_close(terms["flow"].value, outputs["flow_loss_mean"], what="flow loss")
    assert_close(terms["layersync"].value, outputs["reg_mean"], what="LayerSync term")
    assert_total_and_grads(method, model, terms, outputs["total"], LAYERSYNC["state_dict"], outputs["grads"])


def test_layersync_xl_preset_is_the_official_recipe():
    cfg = load_config("layersync", ["preset=XL"])
    assert (cfg.layersync.shallow_block, cfg.layersync.deep_block, cfg.layersync.weight) == (8, 16, 0.2)
    assert (cfg.model.time_scale, cfg.model.time_convention, cfg.optim.grad_clip) == (1.0, "data", 0.0)
