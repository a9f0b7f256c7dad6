"""REPA-E (End2End-Diffusion/REPA-E): the official discriminator (weights_init, train and eval mode), the
VAE-side losses (L1, LPIPS on x * 2 - 1, KL, the generator's GAN term with the discriminator in training mode,
the hinge loss) and the two SiT passes of a step (the VAE update's REPA term through the frozen SiT with the
BN's running statistics; the SiT update on the detached latent with the same t and noise) on the official
weights and tensors."""
import math

import pytest
import torch

from golden import assert_close, assert_total_and_grads, fixture, loaded, official_method, sit_overrides
from methods.repa_e import PatchDiscriminator, hinge_loss
from zoo.config import load_config
from zoo.latents.lpips import LPIPS, SLICES
from zoo.training.method import DataInfo, Method, TrainContext

DISC = fixture("repa_e_discriminator")
LOSSES = fixture("repa_e_vae_losses")
STEP = fixture("repa_e_sit_step")


def official_discriminator() -> PatchDiscriminator:
    disc = PatchDiscriminator(DISC["config"]["ndf"], DISC["config"]["n_layers"])
    disc.load_state_dict({k[len("main."):]: v for k, v in DISC["state_dict"].items()})
    return disc


def test_the_discriminator_equals_the_official_one_in_train_and_eval_mode():
    disc = official_discriminator()
    x = DISC["inputs"]["x"]
    assert_close(disc.eval()(x), DISC["outputs"]["out_eval"], what="eval mode")
    out = disc.train()(x)
    assert_close(out, DISC["outputs"]["out_train"], what="train mode (batch statistics)")
    out.sum().backward()
    for key, grad in DISC["outputs"]["param_grads_train_of_sum"].items():
        assert_close(dict(disc.named_parameters())[key[len("main."):]].grad, grad, tol=1e-4, what=key)
    for key, value in DISC["outputs"]["bn_buffers_after_train_forward"].items():
        assert_close(disc.state_dict()[key[len("main."):]].float(), value.float(), what=key)


def test_the_discriminator_starts_from_weights_init():
    torch.manual_seed(0)
    fresh = PatchDiscriminator(DISC["config"]["ndf"], DISC["config"]["n_layers"]).state_dict()
    for key, st in DISC["outputs"]["fresh_init_stats"].items():
        if "std" not in st:     # num_batches_tracked
            continue
        value = fresh[key[len("main."):]].float()
        if st["std"] == 0 and value.numel() > 1:   # zeros (BN shifts, running means) and ones
            assert torch.allclose(value, torch.full_like(value, st["mean"])), key
        elif value.numel() >= 16:
            assert value.std().item() == pytest.approx(st["std"], rel=0.35), key
            assert value.mean().item() == pytest.approx(st["mean"], abs=0.02), key


def lpips_from_recipe() -> LPIPS:
    """The fixture's LPIPS: VGG16 weights from the seeded recipe written in it (VGG16 is too large to store) and
    the official lin heads; torchvision's `features.<n>` are the zoo's `<slice>.<n>`."""
    net = LPIPS()
    g = torch.Generator().manual_seed(1234)
    state = net.state_dict()
    for idx in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28):
        s = next(i for i, end in enumerate(SLICES) if idx < end)
        out, inp = state[f"slices.{s}.{idx}.weight"].shape[:2]
        state[f"slices.{s}.{idx}.weight"] = torch.randn((out, inp, 3, 3), generator=g) * math.sqrt(2 / (inp * 9))
        state[f"slices.{s}.{idx}.bias"] = torch.randn((out,), generator=g) * 0.05
    small = LOSSES["inputs"]["lpips_state_dict_small"]
    for i in range(5):
        state[f"lins.{i}.weight"] = small[f"lin{i}.model.1.weight"]
    net.load_state_dict(state)
    assert_close(net.shift, small["scaling_layer.shift"], tol=1e-7, what="LPIPS shift")
    assert_close(net.scale, small["scaling_layer.scale"], tol=1e-7, what="LPIPS scale")
    checks = LOSSES["outputs"]["lpips_vgg_checksums"]
    first = checks["net.slice1.0.weight"]
    assert net.slices[0][0].weight.double().sum().item() == pytest.approx(float(first["sum"]), rel=1e-6)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def repa_e():
    import zoo.teachers.teacher

    cfg = STEP["config"]
    real = zoo.teachers.teacher.encoder_dims
    zoo.teachers.teacher.encoder_dims = lambda names, config: cfg["z_dims"]
    try:
        method = official_method("repa_e", DataInfo(3, 32, 10), *sit_overrides(cfg), "model.time_scale=1",
                                 f"repa_e.encoder_depth={cfg['encoder_depth']}",
                                 f"repa_e.projector_dim={cfg['projector_dim']}", "repa_e.lpips_rescale=true")
        model = method.build_model()
        state, unused = method.from_official(STEP["state_dict"])
        assert not unused
        missing, _ = model.load_state_dict(state, strict=False)
        assert all(k.startswith(("extras.vae.", "extras.discriminator.")) for k in missing)  # separate official files
        model.extras["discriminator"].load_state_dict(official_discriminator().state_dict())
        return method, model
    finally:
        zoo.teachers.teacher.encoder_dims = real


def test_vae_side_losses_equal_the_official_reconstruction_loss(repa_e):
    method, model = repa_e
    method.lpips = lpips_from_recipe()
    inputs, gen = LOSSES["inputs"], LOSSES["outputs"]["generator"]
    recon = inputs["reconstructions"].clone().requires_grad_(True)
    mean, logvar = inputs["posterior_mean"], inputs["posterior_logvar"].clamp(-30, 20)
    terms = method.reconstruction_terms(model, inputs["images"], recon, mean, (0.5 * logvar).exp())
    assert_close(terms["l1"].value, gen["reconstruction_loss"], what="L1")
    assert_close(terms["lpips"].value, gen["perceptual_loss"], what="LPIPS of x * 2 - 1")
    assert_close(terms["kl"].weight * terms["kl"].value, gen["kl_loss_weighted"], what="weighted KL")
    assert_close(terms["gan"].value, gen["gan_loss"], what="GAN (discriminator in training mode)")
    assert terms["gan"].weight == pytest.approx(float(gen["d_weight"]))
    total = sum(term.weight * term.value for term in terms.values())
    assert_close(total, gen["total_loss"], what="total")
    total.backward()
    assert_close(recon.grad, LOSSES["outputs"]["grad_total_wrt_reconstructions"], tol=1e-7, what="d total / d recon")
    disc_state = model.extras["discriminator"].state_dict()
    for key, value in LOSSES["outputs"]["disc_bn_buffers_after_generator_step"].items():
        assert_close(disc_state[key[len("main."):]].float(), value.float(), what=f"{key} after the generator step")
    # the discriminator update: hinge 0.5 (relu(1 - D(x)) + relu(1 + D(x_rec)))
    disc = model.extras["discriminator"]
    d_loss = hinge_loss(disc(inputs["images"]), disc(inputs["reconstructions"]))
    assert_close(d_loss, LOSSES["outputs"]["d_loss"], what="hinge loss")
    d_loss.backward()
    for key, grad in LOSSES["outputs"]["d_loss_param_grads"].items():
        assert_close(dict(disc.named_parameters())[key[len("main."):]].grad, grad, tol=1e-6, what=key)
    method.lpips = None


def test_the_vae_updates_repa_term_and_the_sit_update_equal_the_official_step(repa_e, monkeypatch):
    method, model = repa_e
    inputs, out = STEP["inputs"], STEP["outputs"]
    t, noise = inputs["time_input"].flatten(), inputs["noises"]
    monkeypatch.setattr(Method, "noise", lambda self, x: (t, noise))
    monkeypatch.setattr(method, "targets", lambda batch: {"tokens": [inputs["zs0"]]})
    batch = {"label": inputs["y"]}
    x = inputs["x"].clone().requires_grad_(True)
    model.train()
    align, *_ = method.latent_alignment(model, x, batch)
    assert_close(align, out["vae_pass_proj_loss"], what="REPA term of the VAE update")
    (method.options.vae_proj_coeff * align).backward()
    assert_close(x.grad, out["vae_pass_grad_x_of_1p5_proj"], tol=1e-6, what="its gradient to the latent")
    model.zero_grad(set_to_none=True)
    # the SiT update: BN in training mode on the detached latent, the same t and noise, label dropout
    ctx = TrainContext(0, None, carry={"vae": {"z": inputs["x"], "t": t, "eps": noise,
                                               "targets": {"tokens": [inputs["zs0"]]}}})
    monkeypatch.undo()
    monkeypatch.setattr(method, "targets", lambda batch: {"tokens": [inputs["zs0"]]})
    labels = torch.where(inputs["label_drop_rand"] < 0.1, torch.full_like(inputs["y"], 10), inputs["y"])
    monkeypatch.setattr(method, "drop_labels", lambda model, y: labels)
    terms = method.loss_terms(model, batch, ctx)
    assert_close(terms["flow"].value, out["sit_denoising_loss_per_sample"].mean(), what="flow loss")
    assert_close(terms["repa"].value, out["sit_proj_loss"], what="REPA loss")
    assert_total_and_grads(method, model, terms, out["sit_loss"], STEP["state_dict"], out["sit_grads"])
    bn = model.extras["bn"].state_dict()
    for key, value in out["bn_buffers_after_train_pass"].items():
        assert_close(bn[key[len("bn."):]].float(), value.float(), what=key)
    model.eval()


@pytest.mark.parametrize("preset", ["B", "XL"])
def test_the_paper_presets_are_the_official_recipe(preset):
    o = load_config("repa_e", [f"preset={preset}"]).repa_e
    assert (o.vae_proj_coeff, o.proj_coeff, o.l1_weight, o.lpips_weight, o.kl_weight, o.gan_weight) == \
        (1.5, 0.5, 1.0, 1.0, 1e-6, 0.1)
    assert (o.vae_lr, o.disc_lr, o.disc_channels, o.disc_layers, o.bn_eps, o.bn_momentum, o.lpips_rescale) == \
        (1e-4, 1e-4, 64, 3, 1e-4, 0.1, True)
