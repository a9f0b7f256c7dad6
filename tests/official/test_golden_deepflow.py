"""DeepFlow (ByteDance-Seed/DeepFlow): the official model's weights in the zoo's branched SiT give the official
per-branch velocities, accelerations and post-VeRA projections; DFLoss's terms and gradients on the same draws;
and its Euler-Maruyama sampler with and without CFG. DeepFlow's convention is the zoo's (t = 1 noise)."""
import pytest
import torch

import methods.deepflow
import zoo.teachers.teacher
import zoo.flow.samplers
from golden import assert_close, assert_total_and_grads, fixture, loaded, official_method, sit_overrides
from zoo.config import load_config
from zoo.flow.guidance import Guidance
from zoo.training.method import DataInfo, TrainContext
from zoo.flow.samplers import build_sampler

FORWARD = fixture("deepflow_forward")
CFG = FORWARD["config"]
SPLITS = CFG["df_idxs"]
OPTIONS = [*sit_overrides(CFG), "model.time_scale=1", f"deepflow.splits=[{','.join(map(str, SPLITS))}]",
           f"deepflow.acc_mlp_dim={CFG['projector_dim']}", f"deepflow.projector_dim={CFG['projector_dim']}",
           "deepflow.repa=true", f"deepflow.legacy_scaling={str(CFG['legacy_scaling']).lower()}",
           "deepflow.weights=[0.2,0.2,1.0]", "deepflow.feature_cache=never"]


@pytest.fixture(scope="module")
def deepflow():
    real = zoo.teachers.teacher.encoder_dims
    zoo.teachers.teacher.encoder_dims = lambda names, cfg: CFG["z_dims"]
    try:
        method = official_method("deepflow", DataInfo(4, 8, 10), *OPTIONS)
        return method, loaded(method, FORWARD["state_dict"])
    finally:
        zoo.teachers.teacher.encoder_dims = real


def test_branch_velocities_accelerations_and_projections_equal_the_official_model(deepflow):
    method, model = deepflow
    inputs, out = FORWARD["inputs"], FORWARD["outputs"]
    times = inputs["t_list"]
    result = model.backbone(inputs["x"], times[0], inputs["train_effective_y"], hidden_layers=(1, 2, 3),
                            branch_times=times[1:])
    for i, v in enumerate(result.velocities):
        assert_close(v, out[f"train_velocity{i}"], what=f"velocity of branch {i + 1}")
    for i, a in enumerate(result.accelerations):
        assert_close(a, out[f"train_a_to_s{i}"], what=f"acceleration {i + 1}")
    for j, refined in enumerate(result.refined):
        assert_close(model.extras["projectors"][j][0](refined), out[f"train_zs_tilde{j}"], what=f"projection {j}")
    for k in range(3):
        assert_close(result.hidden[k + 1], out[f"train_block{k}"], what=f"block {k + 1}")
    # at sampling every branch sees the same t, and only the last velocity is used
    sampled = model.backbone(inputs["x"], inputs["eval_t"], inputs["eval_y"])
    assert_close(sampled.velocity, out["eval_velocity2"], what="sampling velocity")


def test_legacy_scaling_clamps_the_gap_modulation(deepflow):
    """The fixture's modulation scales exceed 5 (official legacy_scaling on): without the clamp the model differs."""
    method, model = deepflow
    inputs, out = FORWARD["inputs"], FORWARD["outputs"]
    for vera in model.backbone.vera:
        vera.clamp_scale = False
    try:
        result = model.backbone(inputs["x"], inputs["t_list"][0], inputs["train_effective_y"],
                                branch_times=inputs["t_list"][1:])
        assert (result.velocities[-1] - out["train_velocity2"]).abs().max() > 1e-3
    finally:
        for vera in model.backbone.vera:
            vera.clamp_scale = True


LOSS = fixture("deepflow_loss")


@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
def test_deep_supervision_acceleration_and_repa_losses_equal_dfloss(deepflow, monkeypatch, weighting):
    method, model = deepflow
    run = LOSS["outputs"][weighting]
    draws = list(run["draws"].values())
    t, noise = draws[0], draws[1]
    t = t.flatten() if weighting == "uniform" else (lambda s: s / (1 + s))(t.flatten().exp())
    times = [s.flatten() for s in run["time_input_list"]]
    label_u = draws[-1]
    labels = torch.where(label_u < 0.1, torch.full_like(LOSS["inputs"]["y"], 10), LOSS["inputs"]["y"])
    model.train()
    monkeypatch.setattr(method, "noise", lambda x: (times[0], noise))
    monkeypatch.setattr(methods.deepflow, "branch_times", lambda t, branches, gap: times)
    monkeypatch.setattr(method, "drop_labels", lambda model, y: labels)
    monkeypatch.setattr(method, "targets", lambda batch: {"tokens": LOSS["inputs"]["zs"]})
    terms = method.loss_terms(model, {"image": LOSS["inputs"]["images"], "label": LOSS["inputs"]["y"]},
                              TrainContext(0, None))
    deep = sum(term.weight * term.value for name, term in terms.items() if name.startswith("flow"))
    assert_close(deep, run["denoising_loss"].mean(), what="deep supervision")
    assert_close(terms["acc"].value, run["pred_a2s"].mean(), what="acceleration loss")
    assert_close(terms["repa"].value, run["proj_loss"], what="REPA on the post-VeRA states")
    assert_total_and_grads(method, model, terms, run["total_loss"], FORWARD["state_dict"], run["grads"])
    model.eval()


SAMPLER = fixture("deepflow_sampler")


@pytest.mark.parametrize("run", ["nocfg", "cfg"])
def test_sde_samples_equal_the_official_sampler(deepflow, monkeypatch, run):
    method, model = deepflow
    settings = SAMPLER["config"]["runs"][run]
    noises = iter(SAMPLER["outputs"][f"{run}_eps"])
    monkeypatch.setattr(zoo.flow.samplers, "_randn_like", lambda x, generator: next(noises))
    sampler = build_sampler("sde", SAMPLER["config"]["num_steps"])
    guidance = Guidance(settings["cfg_scale"], settings["guidance_low"], settings["guidance_high"])
    field = method.velocity_field(model, SAMPLER["inputs"]["y"], guidance, sampler=sampler)
    with torch.no_grad():
        out = sampler.sample(field, SAMPLER["inputs"]["latents"], method.path)
    assert_close(out.double(), SAMPLER["outputs"][f"{run}_samples"], what=run)


@pytest.mark.parametrize("preset, splits, weights, depth", [("B", [6], [0.2, 1.0], 0), ("XL", [8, 16], [0.2, 0.2, 1.0], 24)])
def test_the_paper_presets_are_the_official_scripts(preset, splits, weights, depth):
    cfg = load_config("deepflow", [f"preset={preset}"])
    assert (list(cfg.deepflow.splits), list(cfg.deepflow.weights), cfg.model.depth) == (splits, weights, depth)
    assert (cfg.model.time_scale, cfg.flow.time, cfg.deepflow.time_gap, cfg.optim.grad_clip) == \
        (1.0, "logit_normal", 0.01, 1.0)


@pytest.mark.parametrize("preset, official", [("B", 166_004_784), ("XL", 681_264_432)])
def test_parameter_counts_equal_the_official_models(preset, official):
    """DeepFlow-B/2-2T and XL/2-3T as the official scripts build them (166,201,392 and 681,559,344 with the frozen
    pos_embed parameter, which the zoo holds as a buffer)."""
    from zoo.backbones.sit import count_parameters

    cfg = load_config("deepflow", [f"preset={preset}", "data.num_classes=1000"])
    method = type(official_method("deepflow", DataInfo(4, 32, 1000)))(cfg, DataInfo(4, 32, 1000))
    with torch.device("meta"):
        assert count_parameters(method.build_backbone()) == official
