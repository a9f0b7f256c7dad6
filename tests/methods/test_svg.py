"""SVG: the time shifts, the residual channels' matching and mask, the frozen latent and its round trip, the shifted
sampling grid and the config errors, each against a direct transcription."""
import pytest
import torch

from methods.svg import shift_rate, shift_time, shifted_field
from zoo.data import build_dataset, gather, subset_index
from zoo.errors import ConfigError
from zoo.flow.samplers import EulerMaruyamaSDE, build_sampler, time_grid
from zoo.latents.residual_autoencoder import match_distribution
from zoo.training.generate import build_method


def test_shift_is_the_official_rational_shift_of_data_time():
    """Official (t = 1 data): t_d' = s t_d / (1 + (s - 1) t_d); the zoo's t = 1 - t_d."""
    u = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.9, 1.0], dtype=torch.float64)
    for s in (0.4, 0.15, 1.0, 2.0):
        official = s * (1 - u) / (1 + (s - 1) * (1 - u))
        assert torch.allclose(shift_time(u, s), 1 - official, atol=1e-12)
    assert torch.equal(shift_time(u, 1.0), u)
    assert (shift_time(u, 0.4) >= u).all()  # s < 1 spends more time near noise
    assert shift_time(torch.tensor(0.5), 0.4).item() == pytest.approx(0.5 / 0.7)


def test_shift_rate_is_the_derivative_of_the_shift():
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    numeric = (shift_time(t + h, 0.15) - shift_time(t - h, 0.15)) / (2 * h)
    assert torch.allclose(shift_rate(t, 0.15), numeric, rtol=1e-6)


def test_match_distribution_gives_the_residual_the_teachers_scalar_mean_and_spread():
    h = torch.randn(3, 5, 7) * 2.0 + 1.5
    r = torch.randn(3, 2, 7, requires_grad=True)
    out = match_distribution(h, r)
    # transcription: scalars = mean over channels of the per-channel statistics over (batch, tokens)
    mh, sh = h.mean(dim=(0, 2)).mean(), h.std(dim=(0, 2)).mean()
    mr, sr = r.mean(dim=(0, 2)).mean(), r.std(dim=(0, 2)).mean()
    assert torch.allclose(out, (r - mr) / (sr + 1e-6) * sh + mh, atol=1e-6)
    out.sum().backward()  # every statistic is detached: d out / d r = std_h / (std_r + eps) everywhere
    assert torch.allclose(r.grad, (sh / (sr.detach() + 1e-6)).expand_as(r), atol=1e-6)


def test_shifted_euler_steps_on_the_shifted_grid():
    """Euler with the shifted field is x += (t_{i+1} - t_i) v(x, t_i) on t = shift(tau): for v = t, the sum."""
    sampler = build_sampler("ode", 5, "euler")
    seen = []

    def field(x, t, step, guide_at=None):
        seen.append(float(t[0]))
        return torch.ones_like(x) * t.view(-1, 1, 1, 1).to(x.dtype)

    x = sampler.sample(shifted_field(field, sampler, 0.15), torch.zeros(1, 1, 1, 1, dtype=torch.float64), None)
    ts = shift_time(time_grid(5), 0.15)
    assert seen == pytest.approx(ts[:-1].tolist(), abs=1e-12)
    assert x.item() == pytest.approx(float(((ts[1:] - ts[:-1]) * ts[:-1]).sum()), abs=1e-12)


def test_the_sde_and_no_shift_keep_the_field():
    field = lambda x, t, step, guide_at=None: x  # noqa: E731
    assert shifted_field(field, EulerMaruyamaSDE(4), 0.15) is field
    assert shifted_field(field, build_sampler("ode", 4), 1.0) is field


@pytest.fixture(scope="module")
def trained_micro():
    from zoo.config import load_config

    method = build_method(load_config("svg", ["preset=micro", "train.device=cpu", "model.class_dropout=0"]))
    method.setup("cpu")
    return method


def test_latent_is_the_teachers_tokens_then_the_residual_channels_standardised(trained_micro):
    method = trained_micro
    model = method.build_model()
    ds = build_dataset(method.cfg.data)
    batch = gather(ds, torch.arange(6), torch.zeros(6, dtype=torch.bool))
    state = method.encode(model, batch)
    c, g, _ = method.state_shape()
    assert state.shape == (6, c, g, g) and not state.requires_grad
    ae = method.autoencoder
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    z = ae.from_state(state)
    tokens = method.teacher.tokens(batch)[0]          # [B, g*g, D] row-major (the token cache's, as training reads)
    d = tokens.shape[-1]
    assert torch.allclose(z[:, :d], tokens.transpose(1, 2).reshape(6, d, g, g), atol=1e-5)
    assert torch.allclose(state, (z - ae.latent_mean) / ae.latent_std, atol=1e-5)
    # decode is the decoder of the de-standardised state
    assert torch.allclose(method.decode(model, state), ae.decode(z), atol=1e-5)
    assert method.decode(model, state).shape == (6, 3, method.data.image_size, method.data.image_size)


def test_latent_statistics_standardise_the_training_latents(trained_micro):
    """The stored mean and std are those of the training images' latents (eval mode) on a subset that holds every
    class (every len/n-th shape would be one class: class = index mod classes), so their states are ~N(0, 1)."""
    method = trained_micro
    ds = build_dataset(method.cfg.data)
    n = method.options.ae_stats_images
    index = subset_index(len(ds), n)
    assert len(set(ds.labels[index].tolist())) == method.data.num_classes
    batch = gather(ds, index, torch.zeros(n, dtype=torch.bool))
    state = method.encode(method.build_model(), batch)
    assert torch.allclose(state.mean(dim=(0, 2, 3)), torch.zeros(state.shape[1]), atol=1e-4)
    assert torch.allclose(state.std(dim=(0, 2, 3)), torch.ones(state.shape[1]), atol=1e-3)


def test_training_times_are_shifted(trained_micro, monkeypatch):
    method = trained_micro
    u = torch.tensor([0.1, 0.5, 0.9])
    monkeypatch.setattr(method.time_sampler, "sample", lambda n, device=None, generator=None: u)
    assert torch.allclose(method.sample_time(3, "cpu"), u / (0.4 + 0.6 * u))


def test_from_official_reads_the_linear_token_embedding(trained_micro):
    method = trained_micro
    model = method.build_model()
    state = {k: v.clone() for k, v in model.backbone.state_dict().items() if k != "pos_embed"}
    conv = state.pop("x_embedder.proj.weight")
    official = {**state, "ln1.weight": conv[:, :, 0, 0], "ln1.bias": state.pop("x_embedder.proj.bias")}
    mapped, unused = method.from_official(official)
    assert not unused
    assert torch.equal(mapped["backbone.x_embedder.proj.weight"], conv)


@pytest.mark.parametrize("overrides, key", [
    (["data.vae=builtin"], "data.vae"),
    (["svg.decoder_mult=[1,1]"], "svg.decoder_mult"),
    (["svg.encoder=builtin,builtin"], "svg.encoder"),
    (["svg.downsample=5"], "svg.downsample"),
    (["svg.train_shift=0"], "svg.train_shift"),
    (["svg.mask_ratio=1.5"], "svg.mask_ratio"),
    (["svg.decoder_groups=3"], "svg.decoder_groups"),
])
def test_bad_options_name_the_key(micro_cfg, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_method(micro_cfg("svg", *overrides))


def test_hinge_and_adaptive_gan_weight_against_transcriptions():
    from zoo.latents.discriminator import hinge_loss
    from zoo.latents.residual_autoencoder import adaptive_gan_weight

    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-2.0, 0.3, 1.0])
    expected = 0.5 * (torch.tensor([0.5, 0.0, 2.0]).mean() + torch.tensor([0.0, 1.3, 2.0]).mean())
    assert torch.allclose(hinge_loss(real, fake), expected)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    rec, g = (x @ w).abs().mean(), -(x @ w).pow(2).mean()
    gr, gg = torch.autograd.grad(rec, w, retain_graph=True)[0], torch.autograd.grad(g, w, retain_graph=True)[0]
    weight = adaptive_gan_weight(rec, g, w, 0.5)
    assert not weight.requires_grad
    assert torch.allclose(weight, 0.5 * (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4))


def test_the_gan_term_changes_the_trained_autoencoder(trained_micro, tmp_path):
    """gan_start=0 puts the generator term in from the first step: the trained decoder differs from the one without."""
    from types import SimpleNamespace

    from zoo.latents.residual_autoencoder import recipe_dict, train_residual_autoencoder

    method = trained_micro
    decoders = []
    for weight in (0.0, 0.5):
        recipe = SimpleNamespace(**{**recipe_dict(method.options), "gan_weight": weight, "gan_start": 0, "ae_steps": 2})
        path = train_residual_autoencoder(recipe, method.teacher.encoders[0], method.cfg.data, method.data.image_size,
                                          method.grid(), tmp_path / f"ae-{weight}.pt", {}, progress=False)
        decoders.append(torch.load(path, weights_only=True)["weights"]["decoder.conv_out.weight"])
    assert not torch.allclose(decoders[0], decoders[1])


def test_zoo_prepare_svg_autoencoder_trains_once_and_writes_the_file_a_run_reads(tmp_path, capsys):
    from zoo.cli import main
    from zoo.config import load_config
    from zoo.training.registry import prepare_target_summaries

    assert prepare_target_summaries()["svg-autoencoder"][0] == "svg"
    out = tmp_path / "ae.pt"
    assert main(["prepare", "svg-autoencoder", "--preset", "micro", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and out.exists()
    method = build_method(load_config("svg", ["preset=micro", f"svg.autoencoder={out}"]))
    method.device = torch.device("cpu")
    assert method.load_autoencoder().channels == method.state_shape()[0]
