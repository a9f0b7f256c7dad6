"""REPA-E: which loss updates which parameters, the BatchNorm between VAE and SiT, and the exported VAE."""
import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.training.method import TrainContext
from zoo.training.generate import build_method


@pytest.fixture
def built(micro_cfg):
    method = build_method(micro_cfg("repa_e", "repa_e.feature_cache=never"))
    method.setup("cpu")
    torch.manual_seed(0)
    model = method.build_model().train()
    for p in model.backbone.parameters():  # leave the zero-initialised state so every path carries gradient
        p.data.add_(0.02 * torch.randn_like(p))
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    batch = {"image": images, "label": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4),
             "flip": torch.zeros(4, dtype=torch.bool)}
    return method, model, batch


def grads(module):
    return [p.grad for p in module.parameters()]


def test_the_diffusion_loss_gives_the_vae_exactly_zero_gradient_and_the_repa_loss_does_not(built):
    method, model, batch = built
    ctx = TrainContext(0, None)
    vae_terms = method.vae_losses(model, batch, ctx)
    model.zero_grad(set_to_none=True)
    sit_terms = method.loss_terms(model, batch, ctx)
    sit_terms["flow"].value.backward(retain_graph=True)
    assert all(g is None or not g.any() for g in grads(model.extras["vae"]))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(model.backbone))
    model.zero_grad(set_to_none=True)
    vae_terms["repa_vae"].value.backward()
    vae_grads = [g for g in grads(model.extras["vae"]) if g is not None]
    assert vae_grads and any(g.abs().sum() > 0 for g in vae_grads)
    # the VAE update's REPA term leaves the SiT, its projectors and the discriminator alone
    for part in (model.backbone, model.extras["projectors"], model.extras["discriminator"]):
        assert all(g is None for g in grads(part))
    assert set(vae_terms) == {"l1", "lpips", "kl", "gan", "repa_vae"}  # lpips: the built-in teacher's (no weights)
    assert [vae_terms[k].weight for k in ("l1", "lpips", "kl", "gan", "repa_vae")] == [1.0, 1.0, 1e-6, 0.1, 1.5]
    assert sit_terms["repa"].weight == 0.5


def test_the_discriminator_update_touches_neither_the_vae_nor_sit(built):
    method, model, batch = built
    ctx = TrainContext(0, None)  # one step: its phases share the context
    method.vae_losses(model, batch, ctx)
    model.zero_grad(set_to_none=True)
    terms = method.discriminator_losses(model, batch, ctx)
    terms["disc"].value.backward()
    for part in (model.extras["vae"], model.backbone, model.extras["projectors"]):
        assert all(g is None for g in grads(part))
    assert all(g is not None for g in grads(model.extras["discriminator"]))
    # hinge loss: 0.5 (relu(1 - D(x)) + relu(1 + D(G(z))))
    disc = model.extras["discriminator"]
    expected = 0.5 * (F.relu(1 - disc(batch["image"])).mean() + F.relu(1 + disc(ctx.carry["vae"]["recon"])).mean())
    assert torch.allclose(terms["disc"].value, expected)


def test_the_sit_update_reuses_the_vae_updates_t_and_noise(built):
    method, model, batch = built
    ctx = TrainContext(0, None)
    method.vae_losses(model, batch, ctx)
    t, eps = ctx.carry["vae"]["t"], ctx.carry["vae"]["eps"]
    torch.manual_seed(123)  # whatever the RNG says now, update 3 noises with update 1's draws
    seen = {}
    real = method.path.interpolate
    method.path.interpolate = lambda x, e, tt: seen.update(x=x, eps=e, t=tt) or real(x, e, tt)
    method.loss_terms(model, batch, ctx)
    assert seen["eps"] is eps and seen["t"] is t
    # ... on BN (training mode) of update 1's latent
    bn = model.extras["bn"]
    expected = F.batch_norm(ctx.carry["vae"]["z"], None, None, training=True, eps=bn.eps)
    assert torch.allclose(seen["x"], expected, atol=1e-5)


def test_the_gan_term_sees_the_discriminator_in_training_mode_without_training_it(built):
    method, model, batch = built
    disc = model.extras["discriminator"]
    bn = next(m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    terms = method.vae_losses(model, batch, TrainContext(0, None))
    assert not torch.equal(bn.running_mean, before)   # batch statistics: BN in training mode, as officially
    assert disc.training and all(p.requires_grad for p in disc.parameters())  # restored afterwards
    model.zero_grad(set_to_none=True)
    terms["gan"].value.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.extras["vae"].parameters())


def test_the_discriminator_starts_from_taming_weights_init(micro_cfg):
    from methods.repa_e import PatchDiscriminator

    torch.manual_seed(0)
    disc = PatchDiscriminator(64, 3)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([c.weight.detach().flatten() for c in convs])
    assert abs(weights.mean().item()) < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.02)
    gammas = torch.cat([n.weight.detach() for n in norms])
    assert gammas.mean().item() == pytest.approx(1.0, abs=0.01) and gammas.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(not n.bias.any() for n in norms)


def test_the_ema_copies_the_vae_and_averages_the_rest(micro_cfg):
    from zoo.training.trainer import Trainer

    trainer = Trainer(micro_cfg("repa_e", "train.ema_decay=0.5"), run_dir=None, progress=False)
    trainer.train_step(next(trainer.loader.iterate(0)))
    live, ema = trainer.model.state_dict(), trainer.ema.module.state_dict()
    vae_keys = [k for k in live if k.startswith("extras.vae.")]
    assert vae_keys and all(torch.equal(live[k], ema[k]) for k in vae_keys)
    moved = [k for k in live if k.startswith("backbone.") and not torch.equal(live[k], ema[k])]
    assert moved  # averaged with decay 0.5: between the initial and the live weights


def test_lpips_rescale_feeds_x_times_2_minus_1(built):
    method, model, batch = built
    seen = []
    method.lpips = lambda a, b: seen.append((a, b)) or (a - b).abs().flatten(1).mean(1)
    method.options.lpips_rescale = True
    method.vae_losses(model, batch, TrainContext(0, None))
    assert torch.allclose(seen[0][1], batch["image"] * 2 - 1)
    method.options.lpips_rescale = False
    method.vae_losses(model, batch, TrainContext(0, None))
    assert torch.equal(seen[1][1], batch["image"])


def test_three_phases_with_their_own_parameters_and_learning_rates(built):
    method, model, _ = built
    phases = method.phases(model)
    assert [p.name for p in phases] == ["vae", "discriminator", "sit"]
    ids = [{id(p) for p in phase.parameters} for phase in phases]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] == {id(p) for p in model.extras["vae"].parameters()}
    assert len(list(model.extras["bn"].parameters())) == 0  # affine off


def test_bn_statistics_move_in_the_sit_update_only_and_sampling_inverts_bn_exactly(built):
    method, model, batch = built
    bn = model.extras["bn"]
    assert (bn.eps, bn.momentum, bn.affine) == (1e-4, 0.1, False)
    vae = model.extras["vae"]  # seeded from the VAE's own latent shift and scale
    assert torch.allclose(bn.running_mean, vae.shift.flatten().expand_as(bn.running_mean))
    assert torch.allclose(bn.running_var, (1 / vae.scale.flatten() ** 2).expand_as(bn.running_var))
    before = (bn.running_mean.clone(), bn.running_var.clone())
    ctx = TrainContext(0, None)
    method.vae_losses(model, batch, ctx)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    method.loss_terms(model, batch, ctx)
    assert not torch.equal(bn.running_mean, before[0]) and not torch.equal(bn.running_var, before[1])
    # decode(BN_eval(z)) == VAE.decode(z): the de-normalisation is BN's exact inverse
    z = ctx.carry["vae"]["z"]
    state = F.batch_norm(z, bn.running_mean, bn.running_var, training=False, eps=bn.eps)
    with torch.no_grad():
        assert torch.allclose(method.decode(model, state), vae.decode_latent(z), atol=1e-5)


def test_a_training_step_moves_every_part(micro_cfg):
    from zoo.training.trainer import Trainer

    trainer = Trainer(micro_cfg("repa_e"), run_dir=None, progress=False)
    ex = trainer.model.extras
    parts = {"vae": ex["vae"], "discriminator": ex["discriminator"], "sit": trainer.model.backbone,
             "projectors": ex["projectors"]}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in parts.items()}
    logs = trainer.train_step(next(trainer.loader.iterate(0)))
    for k, m in parts.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], m.parameters())), f"{k} did not move"
    assert {"l1", "kl", "gan", "repa_vae", "disc", "flow", "repa", "loss/vae", "loss/sit"} <= set(logs)


def test_exported_vae_loads_as_a_frozen_vae_whose_states_match_the_bn(built, tmp_path, micro_cfg):
    from zoo.latents.vae import load_vae

    method, model, batch = built
    for step in range(2):
        ctx = TrainContext(step, None)
        method.vae_losses(model, batch, ctx)
        method.loss_terms(model, batch, ctx)  # moves the BN statistics
    method.export_vae(model).save_pretrained(tmp_path / "vae")
    vae = load_vae(micro_cfg("sit"), str(tmp_path / "vae")).eval()
    bn = model.extras["bn"]
    z = torch.randn(2, vae.latent_channels, 8, 8)
    expected = F.batch_norm(z, bn.running_mean, bn.running_var, training=False, eps=bn.eps)
    assert torch.allclose(vae.to_state(z), expected, atol=1e-5)


def test_the_vae_update_samples_the_posterior_and_normalises_with_bn_running_statistics(built, monkeypatch):
    method, model, batch = built
    bn = model.extras["bn"]
    bn.running_var.fill_(1e-3)   # small: BN's eps (1e-4) then matters
    seen = {}
    real = method.path.interpolate
    monkeypatch.setattr(method.path, "interpolate", lambda x, e, t: seen.update(state=x) or real(x, e, t))
    mean, std = model.extras["vae"].posterior(batch["image"])
    torch.manual_seed(7)
    ctx = TrainContext(0, None)
    method.vae_losses(model, batch, ctx)
    torch.manual_seed(7)
    z = mean + std * torch.randn_like(std)                   # the reparametrised posterior sample
    assert torch.allclose(ctx.carry["vae"]["z"], z, atol=1e-6)
    expected = (z - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)
    assert torch.allclose(seen["state"], expected, atol=1e-5)


def test_the_reconstruction_weights_come_from_the_config(micro_cfg):
    method = build_method(micro_cfg("repa_e", "repa_e.feature_cache=never", "repa_e.l1_weight=0.5",
                                    "repa_e.lpips_weight=0.3", "repa_e.kl_weight=2e-6", "repa_e.gan_weight=0.2"))
    method.setup("cpu")
    model = method.build_model()
    method.lpips = lambda a, b: (a - b).abs().flatten(1).mean(1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    terms = method.reconstruction_terms(model, images, images * 0.5, torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8))
    assert {k: t.weight for k, t in terms.items()} == {"l1": 0.5, "kl": 2e-6, "gan": 0.2, "lpips": 0.3}


def test_the_teacher_runs_once_per_step_for_both_repa_terms(micro_cfg):
    """The VAE update's tokens are the SiT update's too (the same images): one teacher pass per step."""
    from zoo.training.trainer import Trainer

    trainer = Trainer(micro_cfg("repa_e", "repa_e.feature_cache=never"), run_dir=None, progress=False)
    teacher, calls = trainer.method.teacher, []
    real = teacher.tokens
    teacher.tokens = lambda batch: calls.append(len(batch["label"])) or real(batch)
    logs = trainer.train_step(next(trainer.loader.iterate(0)))
    assert len(calls) == 1 and {"repa_vae", "repa"} <= set(logs)


def test_the_perceptual_term_without_weights_is_the_built_in_teachers_and_reads_images_as_they_are(micro_cfg):
    """No LPIPS weights (the CPU presets): the perceptual term is the built-in teacher's distance, and LPIPS's
    official x * 2 - 1 quirk (lpips_rescale) is not applied to it: the teacher reads [-1, 1] images."""
    from zoo.latents.perceptual import TeacherPerceptual

    method = build_method(micro_cfg("repa_e", "repa_e.feature_cache=never", "repa_e.lpips_rescale=true"))
    method.setup("cpu")
    assert isinstance(method.lpips, TeacherPerceptual)
    model = method.build_model()
    torch.manual_seed(0)
    images, recon = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    terms = method.reconstruction_terms(model, images, recon, torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8))
    assert torch.allclose(terms["lpips"].value, method.lpips(recon, images).mean())
    off = build_method(micro_cfg("repa_e", "repa_e.feature_cache=never", "repa_e.perceptual=none"))
    off.setup("cpu")
    assert off.lpips is None
    with pytest.raises(ConfigError, match="repa_e.perceptual='vgg'; valid: auto, builtin, lpips, none"):
        build_method(micro_cfg("repa_e", "repa_e.perceptual=vgg"))


def test_with_data_vae_set_repa_e_tunes_that_vae_and_loads_no_frozen_copy(micro_cfg):
    """`zoo compare ... data.vae=builtin`: REPA-E's row starts from the latent space the other rows diffuse in."""
    from zoo.latents.vae import latent_shape

    method = build_method(micro_cfg("repa_e", "repa_e.feature_cache=never", "data.vae=builtin", "model.patch=1",
                                    "repa_e.vae=/nowhere"))
    assert method.tuned_vae == "builtin" and method.state_shape() == latent_shape(method.cfg) == (4, 8, 8)
    assert method.used()["space"] == "latents (data.vae=builtin), tuned end to end"
    method.setup("cpu")
    assert method.vae is None and method.initial_vae is not None
    model = method.build_model()
    assert torch.equal(model.extras["vae"].shift, method.initial_vae.shift)
