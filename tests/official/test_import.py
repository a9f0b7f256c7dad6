"""`zoo import`: an official REPA checkpoint file (the golden fixture's weights, written in the official training
layout) becomes a run folder whose samples equal the official sampler's on the same weights and noise; bad files
and mismatched recipes are one clear line and exit code 2."""
import argparse

import pytest
import torch

import zoo.flow.samplers
from golden import assert_close, fixture, sit_overrides
from zoo.cli import main
from zoo.flow.guidance import Guidance
from zoo.flow.samplers import build_sampler
from zoo.training.checkpoint import load_checkpoint
from zoo.training.generate import load_for_sampling

GOLDEN = fixture("repa_samplers")
CFG = GOLDEN["config"]


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A small diffusers VAE with the fixture's 4 latent channels, 16 px images -> 8x8 latents."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(folder)
    return folder


def recipe(vae_folder, tmp_path, source, method="repa"):
    """`--preset`, the file, then the zoo's REPA config of the official run that wrote it (on data that is not
    on this machine)."""
    return ["--preset", "micro", str(source), *sit_overrides(CFG), "model.time_scale=1", f"{method}.encoder_depth={CFG['encoder_depth']}",
            f"{method}.projector_dim={CFG['projector_dim']}", f"teacher.width={CFG['z_dims'][0]}", "train.device=cpu",
            "data.dataset=folder", f"data.root={tmp_path / 'imagenet-not-here'}", "data.image_size=16",
            f"data.vae={vae_folder}"]


def official_file(tmp_path, ema, raw=None):
    """A checkpoint as REPA's train.py saves it: DDP-prefixed raw weights, the EMA, optimizer state, its args."""
    raw = ema if raw is None else raw
    path = tmp_path / "last.pt"
    torch.save({"model": {f"module.{k}": v for k, v in raw.items()}, "ema": dict(ema), "opt": {"state": {}},
                "args": argparse.Namespace(model="SiT-XL/2", proj_coeff=0.5), "steps": 400000}, path)
    return path


def perturbed(state):
    return {k: v if k == "pos_embed" else v + 0.01 for k, v in state.items()}  # the fixed table stays


def test_an_imported_official_checkpoint_samples_as_the_official_sampler(vae_folder, tmp_path, monkeypatch, capsys):
    source = official_file(tmp_path, GOLDEN["state_dict"], raw=perturbed(GOLDEN["state_dict"]))
    run = tmp_path / "run"
    assert main(["import", "--from", "repa", "--out", str(run), *recipe(vae_folder, tmp_path, source)]) == 0
    err = capsys.readouterr().err
    assert "model <- model, ema <- ema" in err and "not weights, not imported: args, opt, steps" in err
    state = load_checkpoint(run)
    assert state["step"] == 0 and state["data"] == {"channels": 3, "image_size": 16, "num_classes": 1000}
    method, model, _, _ = load_for_sampling(run, use_ema=True)   # builds the model without the data folder
    for name in ("euler_cfg1.8_low0.3_high0.7", "sde_cfg1.8_low0.0_high0.8"):
        spec = CFG["runs"][name]
        noises = iter(GOLDEN["inputs"]["sde_noises"])
        monkeypatch.setattr(zoo.flow.samplers, "_randn_like", lambda x, generator: next(noises))
        sampler = build_sampler("sde" if "sde" in name else "ode", GOLDEN["inputs"]["num_steps"])
        guidance = Guidance(spec["cfg_scale"], spec.get("guidance_low", 0.0), spec.get("guidance_high", 1.0))
        field = method.velocity_field(model, GOLDEN["inputs"]["y"], guidance, sampler=sampler)
        with torch.no_grad():
            out = sampler.sample(field, GOLDEN["inputs"]["latents"], method.path)
        assert_close(out.double(), GOLDEN["outputs"]["samples"][name], what=name)
    # the raw weights became the zoo's `model`, not its EMA
    raw = load_for_sampling(run, use_ema=False)[1]
    assert torch.allclose(raw.backbone.x_embedder.proj.weight, model.backbone.x_embedder.proj.weight + 0.01)


def test_the_imported_run_samples_and_fine_tunes_from_the_command_line(vae_folder, tmp_path):
    run = tmp_path / "run"
    bare = tmp_path / "ema.pt"
    torch.save(dict(GOLDEN["state_dict"]), bare)   # the released SiT and DDT files: a bare EMA state dict
    assert main(["import", "--from", "repa", "--out", str(run), *recipe(vae_folder, tmp_path, bare)]) == 0
    assert main(["sample", "--ckpt", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert main(["import", "--from", "repa", "--out", str(run), *recipe(vae_folder, tmp_path, bare)]) == 2


def test_bad_files_and_mismatched_recipes_are_one_clear_line(vae_folder, tmp_path, capsys):
    good = official_file(tmp_path, GOLDEN["state_dict"])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    cases = {
        str(truncated): ("repa", [], "corrupt or truncated"),
        str(tmp_path / "missing.pt"): ("repa", [], "does not exist"),
        str(good) + "#wrong-method": ("ddt", ["ddt.decoder_depth=1"], "does not fit the ddt recipe"),
        str(good) + "#wrong-width": ("repa", ["model.hidden=32"], "x_embedder.proj.weight is [16, 4, 2, 2] in the "
                                                                    "checkpoint but [32, 4, 2, 2]"),
    }
    for n, (path, (method, extra, message)) in enumerate(cases.items()):
        argv = ["import", "--from", method, "--out", str(tmp_path / f"run{n}"),
                *recipe(vae_folder, tmp_path, path.split("#")[0], method), *extra]
        assert main(argv) == 2, path
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (path, err)


def formats():
    """(method, the official state dict, the golden tests' recipe, the teacher's token widths) of every official
    format the golden fixtures hold."""
    import test_golden_ddt as ddt
    import test_golden_deepflow as deepflow
    import test_golden_redi as redi
    import test_golden_sit as sit
    import test_golden_sra_layersync as sra

    return {
        "sit": (sit.GOLDEN["state_dict"], sit.SIT, [32]),   # learn_sigma, t = 1 as data
        "ddt": ({**ddt.FORWARD["state_dict"], **fixture("ddt_repa_loss")["state_dict"]}, ddt.DDT, [32]),
        "deepflow": (deepflow.FORWARD["state_dict"], deepflow.OPTIONS, deepflow.CFG["z_dims"]),
        "sra": (sra.SRA["state_dict"], sra.SRA_OPTS, [32]),
        "layersync": (sra.LAYERSYNC["state_dict"], sra.LS_OPTS, [32]),
        "redi": (redi.LOSS["state_dict"], redi.REDI, [32]),
    }


@pytest.mark.parametrize("method", ["sit", "ddt", "deepflow", "sra", "layersync", "redi"])
def test_every_official_format_imports_to_the_model_its_golden_test_loads(method, vae_folder, tmp_path, monkeypatch):
    """The imported EMA is, tensor for tensor, the golden test's model on the same official weights."""
    import zoo.teachers.teacher
    from golden import loaded
    from zoo.config import load_config
    from zoo.training.method import DataInfo
    from zoo.training.official_import import import_official
    from zoo.training.registry import get_method_class

    state, overrides, dims = formats()[method]
    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: dims)
    source = official_file(tmp_path, state)
    data = ["data.dataset=folder", f"data.root={tmp_path / 'absent'}", "data.image_size=16", f"data.vae={vae_folder}"]
    cfg = load_config(method, ["preset=micro", "train.device=cpu", *overrides, *data])
    result = import_official(cfg, source, tmp_path / "run")
    imported = load_checkpoint(tmp_path / "run")
    golden = loaded(get_method_class(method)(cfg, DataInfo(3, 16, 10)), state).state_dict()
    assert imported["data"]["num_classes"] == 10 and result.mapped == len(golden)
    assert set(imported["ema"]) == set(golden)
    assert all(torch.equal(imported["ema"][k], golden[k]) for k in golden)


def test_a_lightning_checkpoint_imports_its_ema_and_raw_denoisers_with_the_trainers_projector(vae_folder, tmp_path,
                                                                                              monkeypatch):
    """DDT's released layout: state_dict with denoiser.*, ema_denoiser.* and diffusion_trainer.proj.*."""
    import zoo.teachers.teacher
    from golden import loaded
    from zoo.config import load_config
    from zoo.training.method import DataInfo
    from zoo.training.official_import import import_official
    from zoo.training.registry import get_method_class

    network, overrides, dims = formats()["ddt"]
    projector = {k: v for k, v in network.items() if k.startswith("proj.")}
    denoiser = {k: v for k, v in network.items() if not k.startswith("proj.")}
    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: dims)
    source = tmp_path / "ddt.ckpt"
    torch.save({"state_dict": {**{f"denoiser.{k}": v for k, v in perturbed(denoiser).items()},
                               **{f"ema_denoiser.{k}": v for k, v in denoiser.items()},
                               **{f"diffusion_trainer.{k}": v for k, v in projector.items()}},
                "optimizer_states": [{}], "epoch": 3}, source)
    data = ["data.dataset=folder", f"data.root={tmp_path / 'absent'}", "data.image_size=16", f"data.vae={vae_folder}"]
    cfg = load_config("ddt", ["preset=micro", "train.device=cpu", *overrides, *data])
    result = import_official(cfg, source, tmp_path / "run")
    assert result.layout.startswith("a Lightning state_dict") and result.ignored == ["epoch", "optimizer_states"]
    imported = load_checkpoint(tmp_path / "run")
    golden = loaded(get_method_class("ddt")(cfg, DataInfo(3, 16, 10)), network).state_dict()
    assert all(torch.equal(imported["ema"][k], golden[k]) for k in golden)
    moved = [k for k in golden if not k.startswith("extras.projectors.") and golden[k].is_floating_point()]
    assert moved and all(not torch.equal(imported["model"][k], golden[k]) for k in moved if "pos" not in k)


def test_repa_e_imports_sit_and_bn_from_its_file_and_the_tuned_vae_from_its_diffusers_folder(vae_folder, tmp_path,
                                                                                              monkeypatch):
    """REPA-E's training checkpoint holds model, ema (SiT, projectors, BN), its own-layout VAE and discriminator and
    three optimizers: the SiT side is imported, the VAE comes from repa_e.vae (a diffusers folder)."""
    import test_golden_repa_e as golden_repa_e
    import zoo.teachers.teacher
    from zoo.config import load_config
    from zoo.latents.vae import load_vae
    from zoo.training.official_import import import_official

    step = golden_repa_e.STEP
    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: step["config"]["z_dims"])
    source = tmp_path / "repae.pt"
    torch.save({"model": dict(step["state_dict"]), "ema": dict(step["state_dict"]), "vae": {"encoder.conv_in.weight":
                torch.zeros(1)}, "discriminator": {}, "opt": {}, "opt_vae": {}, "opt_disc": {},
                "args": argparse.Namespace(), "steps": 400000}, source)
    cfg = load_config("repa_e", ["preset=micro", "train.device=cpu", *sit_overrides(step["config"]), "model.time_scale=1",
                                 f"repa_e.encoder_depth={step['config']['encoder_depth']}",
                                 f"repa_e.projector_dim={step['config']['projector_dim']}", f"repa_e.vae={vae_folder}",
                                 "data.image_size=16"])
    result = import_official(cfg, source, tmp_path / "run")
    assert result.ignored == ["args", "discriminator", "opt", "opt_disc", "opt_vae", "steps", "vae"]
    ema = load_checkpoint(tmp_path / "run")["ema"]
    assert torch.equal(ema["extras.bn.running_var"], step["state_dict"]["bn.running_var"].float())
    assert torch.equal(ema["backbone.x_embedder.proj.weight"], step["state_dict"]["x_embedder.proj.weight"])
    vae = load_vae(cfg, str(vae_folder)).state_dict()
    assert all(torch.equal(ema[f"extras.vae.{k}"], v) for k, v in vae.items())
    method, model, _, _ = load_for_sampling(tmp_path / "run")
    with torch.no_grad():
        images = method.decode(model, torch.zeros(1, 4, 8, 8))
    assert images.shape == (1, 3, 16, 16)


def test_an_imported_run_fine_tunes_with_train_resume(tmp_path, micro_cfg):
    """A SiT in the official layout on the built-in data: imported at step 0, `zoo train --resume` continues it with
    fresh optimizers and writes its next checkpoint."""
    from zoo.training.generate import build_method

    method = build_method(micro_cfg("sit"))
    torch.manual_seed(0)
    backbone = {k[len("backbone."):]: v for k, v in method.build_model().state_dict().items()}
    source = tmp_path / "sit.pt"
    torch.save({"model": backbone, "ema": backbone, "opt": {}, "args": argparse.Namespace()}, source)
    run = tmp_path / "run"
    assert main(["import", "--from", "sit", "--out", str(run), "--preset", "micro", str(source), "train.device=cpu"]) == 0
    assert main(["train", "--resume", str(run), "train.steps=2", "train.sample_every=0"]) == 0
    state = load_checkpoint(run)
    assert state["step"] == 2 and state["optimizers"]["model"]["state"]
