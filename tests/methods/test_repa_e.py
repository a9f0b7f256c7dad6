"""REPA-E: which loss updates which parameters, the BatchNorm between VAE and SiT, and the exported VAE."""
import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.method import TrainContext
from zoo.sampling import build_method


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
    assert set(vae_terms) == {"l1", "kl", "gan", "repa_vae"}
    assert [vae_terms[k].weight for k in ("l1", "kl", "gan", "repa_vae")] == [1.0, 1e-6, 0.1, 1.5]
    assert sit_terms["repa"].weight == 0.5


def test_the_discriminator_update_touches_neither_the_vae_nor_sit(built):
    method, model, batch = built
    method.vae_losses(model, batch, TrainContext(0, None))
    model.zero_grad(set_to_none=True)
    terms = method.discriminator_losses(model, batch, TrainContext(0, None))
    terms["disc"].value.backward()
    for part in (model.extras["vae"], model.backbone, model.extras["projectors"]):
        assert all(g is None for g in grads(part))
    assert all(g is not None for g in grads(model.extras["discriminator"]))
    # hinge loss: relu(1 - D(x)) + relu(1 + D(G(z)))
    disc = model.extras["discriminator"]
    expected = F.relu(1 - disc(batch["image"])).mean() + F.relu(1 + disc(method.latents["recon"])).mean()
    assert torch.allclose(terms["disc"].value, expected)


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
    method.vae_losses(model, batch, TrainContext(0, None))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    method.loss_terms(model, batch, TrainContext(0, None))
    assert not torch.equal(bn.running_mean, before[0]) and not torch.equal(bn.running_var, before[1])
    # decode(BN_eval(z)) == VAE.decode(z): the de-normalisation is BN's exact inverse
    z = method.latents["z"]
    state = F.batch_norm(z, bn.running_mean, bn.running_var, training=False, eps=bn.eps)
    with torch.no_grad():
        assert torch.allclose(method.decode(model, state), vae.decode_latent(z), atol=1e-5)


def test_a_training_step_moves_every_part(micro_cfg):
    from zoo.trainer import Trainer

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
    from zoo.vae import load_vae

    method, model, batch = built
    for _ in range(2):
        method.vae_losses(model, batch, TrainContext(0, None))
        method.loss_terms(model, batch, TrainContext(0, None))  # moves the BN statistics
    method.export_vae(model).save_pretrained(tmp_path / "vae")
    vae = load_vae(micro_cfg("sit"), str(tmp_path / "vae")).eval()
    bn = model.extras["bn"]
    z = torch.randn(2, vae.latent_channels, 8, 8)
    expected = F.batch_norm(z, bn.running_mean, bn.running_var, training=False, eps=bn.eps)
    assert torch.allclose(vae.to_state(z), expected, atol=1e-5)


def test_repa_e_refuses_a_frozen_data_vae(micro_cfg):
    with pytest.raises(ConfigError, match="repa_e.vae"):
        build_method(micro_cfg("repa_e", "data.vae=builtin"))
