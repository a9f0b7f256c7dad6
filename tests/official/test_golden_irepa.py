"""iREPA (End2End-Diffusion/iREPA ldm/: models/sit.py with conv projectors, utils.spatial_zscore, loss.SILoss): the
official weights in the zoo's iREPA give the official projector outputs, normalised targets, losses and gradients.
Its convention is REPA's (the code is REPA's): t = 1 is noise, t unscaled."""
import torch

from golden import assert_close, assert_total_and_grads, fixture, loaded, official_method, sit_overrides
from zoo.training.method import DataInfo, TrainContext

GOLDEN = fixture("irepa_loss")
CONFIG = GOLDEN["config"]
IREPA = [*sit_overrides(CONFIG), "model.time_scale=1", f"irepa.encoder_depth={CONFIG['encoder_depth']}",
         f"irepa.projector_kernel={CONFIG['proj_kwargs_kernel_size']}", f"irepa.zscore_alpha={CONFIG['zscore_alpha']}",
         "model.class_dropout=0"]


def irepa_method(monkeypatch):
    """The zoo's iREPA with two teachers of the fixture's widths, whose raw tokens are the fixture's."""
    import zoo.teachers.teacher

    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: CONFIG["z_dims"])
    method = official_method("irepa", DataInfo(4, 8, CONFIG["num_classes"]), *IREPA)
    monkeypatch.setattr(method.teacher, "tokens", lambda batch: GOLDEN["inputs"]["raw_tokens"])
    return method


def test_targets_are_the_official_spatial_zscore_and_projectors_the_official_convs(monkeypatch):
    method = irepa_method(monkeypatch)
    model = loaded(method, GOLDEN["state_dict"])
    for mine, expected in zip(method.targets({})["tokens"], GOLDEN["outputs"]["zs"]):
        assert_close(mine, expected, what="normalised targets")
    inputs = GOLDEN["inputs"]
    t = inputs["time_input"].flatten()
    x_t = (1 - inputs["time_input"]) * inputs["images"] + inputs["time_input"] * inputs["noises"]
    hidden = model.backbone(x_t, t, inputs["y"], hidden_layers=(CONFIG["encoder_depth"],)).hidden[CONFIG["encoder_depth"]]
    for proj, expected in zip(model.extras["projectors"], GOLDEN["outputs"]["projected"]):
        assert_close(proj(hidden), expected, what="conv projector")


def test_loss_terms_total_and_gradients_equal_the_official_loss(monkeypatch):
    method = irepa_method(monkeypatch)
    model = loaded(method, GOLDEN["state_dict"])
    inputs, expected = GOLDEN["inputs"], GOLDEN["outputs"]
    monkeypatch.setattr(method, "noise", lambda x: (inputs["time_input"].flatten(), inputs["noises"]))
    terms = method.loss_terms(model, {"image": inputs["images"], "label": inputs["y"]}, TrainContext(0, None))
    assert set(terms) == {"flow", "repa"} and terms["repa"].weight == CONFIG["proj_coeff"] == 1.0
    assert_close(terms["flow"].value, expected["denoising_loss_mean"], what="flow loss")
    assert_close(terms["repa"].value, expected["proj_loss"], what="iREPA loss")
    assert_total_and_grads(method, model, terms, expected["total"], GOLDEN["state_dict"], expected["grads"])


def test_the_official_linear_and_mlp_projectors_load_into_the_zoos(monkeypatch):
    """The official projection_layer_type linear / mlp: the same wrapper key, a Linear or REPA's MLP inside."""
    import zoo.teachers.teacher

    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: CONFIG["z_dims"])
    hidden, width = CONFIG["hidden_size"], CONFIG["projector_dim"]
    backbone = {k: v for k, v in GOLDEN["state_dict"].items() if not k.startswith("projectors.")}
    shapes = {"linear": lambda d: {"weight": (d, hidden), "bias": (d,)},
              "mlp": lambda d: {"0.weight": (width, hidden), "0.bias": (width,), "2.weight": (width, width),
                                "2.bias": (width,), "4.weight": (d, width), "4.bias": (d,)}}
    for kind, layout in shapes.items():
        official = dict(backbone)
        for e, dim in enumerate(CONFIG["z_dims"]):
            official.update({f"projectors.{e}.projection_layer.{k}": torch.randn(shape)
                             for k, shape in layout(dim).items()})
        method = official_method("irepa", DataInfo(4, 8, CONFIG["num_classes"]), *IREPA, f"irepa.projector={kind}",
                                 f"irepa.projector_dim={width}")
        model = loaded(method, official)   # strict: every key used, every parameter filled
        assert torch.equal(model.extras["projectors"][1].state_dict()["bias" if kind == "linear" else "4.bias"],
                           official["projectors.1.projection_layer." + ("bias" if kind == "linear" else "4.bias")])
