"""RAE: its equations against direct transcriptions on hand-built tensors (the golden tests against the official
code are tests/official/test_golden_rae.py; the shared contract is tests/test_contract.py)."""
import math

import pytest
import torch

from methods.rae import shifted_field, time_shift, time_shift_rate, truncated_logit_normal
from zoo.backbones.ddt_head import DiTDH, EvaRoPE2D
from zoo.cli import main
from zoo.errors import ConfigError
from zoo.flow.samplers import build_sampler, time_grid
from zoo.latents.token_decoder import TokenDecoder, TokenLatents, latent_statistics, noise_augment
from zoo.training.contract import micro_config
from zoo.training.generate import build_method
from zoo.training.method import TrainContext


def test_the_time_shift_is_the_papers_formula_and_fixes_the_ends():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    alpha = math.sqrt(768 * 16 * 16 / 4096)                   # DINOv2-B on 16 x 16: sqrt(48) = 6.93
    assert alpha == pytest.approx(6.9282, abs=1e-4)
    expected = [alpha * v / (1 + (alpha - 1) * v) for v in t.tolist()]
    assert time_shift(t, alpha).tolist() == pytest.approx(expected, abs=1e-12)
    assert time_shift(t, alpha)[2] == pytest.approx(0.8739, abs=1e-4)   # moved towards noise (t = 1)
    assert time_shift(t, 1.0).tolist() == pytest.approx(t.tolist())
    eps = 1e-6
    assert time_shift_rate(t[2], alpha) == pytest.approx(
        float(time_shift(t[2] + eps, alpha) - time_shift(t[2] - eps, alpha)) / (2 * eps), rel=1e-6)


def test_the_method_shift_depends_on_the_latent_dimension():
    method = build_method(micro_config("rae"))
    assert method.state_shape() == (32, 8, 8)                  # the micro teacher's 32-wide tokens on its 8 x 8 grid
    assert method.shift() == pytest.approx(math.sqrt(32 * 64 / 1024))
    wider = build_method(micro_config("rae", ["teacher.width=64"]))
    assert wider.shift() == pytest.approx(2.0)


def test_training_times_are_the_truncated_logit_normal_shifted():
    method = build_method(micro_config("rae"))
    torch.manual_seed(3)
    t = method.sample_time(4000, "cpu")
    torch.manual_seed(3)
    u = torch.rand(4000)
    normal = torch.distributions.Normal(0.0, 1.0)
    top = normal.cdf(torch.logit(torch.tensor(0.999)))
    base = torch.sigmoid(normal.icdf(top * u))                 # the inverse CDF on [0, Phi(logit 0.999)]
    assert torch.allclose(t, time_shift(base, method.shift()), atol=1e-6)
    assert float(t.max()) <= float(time_shift(torch.tensor(0.999), method.shift())) + 1e-7
    assert float(t.median()) == pytest.approx(float(time_shift(torch.tensor(0.5), method.shift())), abs=0.02)


def test_uniform_training_times_stop_at_time_max():
    method = build_method(micro_config("rae", ["flow.time=uniform", "rae.time_max=0.5"]))
    torch.manual_seed(0)
    t = method.sample_time(1000, "cpu")
    torch.manual_seed(0)
    assert torch.allclose(t, time_shift(torch.rand(1000) * 0.5, method.shift()))


def test_the_truncation_keeps_every_draw_inside():
    t = truncated_logit_normal(2000, 0.0, 3.0, 0.0, 0.9)
    assert float(t.max()) <= 0.9 and float(t.min()) >= 0.0


def test_statistics_exact_and_running():
    batches = [torch.randn(5, 4, 3) * 2 + 1 for _ in range(4)]
    mean, var = latent_statistics(batches, momentum=0.0)
    everything = torch.cat(batches)
    assert torch.allclose(mean, everything.mean(0), atol=1e-6)
    assert torch.allclose(var, everything.var(0, unbiased=False), atol=1e-5)
    m, v = torch.zeros(4, 3), torch.ones(4, 3)
    for b in batches:                                          # RAE's LayerNormwStatistics, transcribed
        m = 0.9 * m + 0.1 * b.mean(0)
        v = 0.9 * v + 0.1 * b.var(0, unbiased=False)
    running = latent_statistics(batches, momentum=0.1)
    assert torch.allclose(running[0], m, atol=1e-6) and torch.allclose(running[1], v, atol=1e-6)
    with pytest.raises(ConfigError):
        latent_statistics([], momentum=0.0)


def test_the_latent_is_the_standardised_tokens_on_the_grid_and_decodes_back():
    torch.manual_seed(0)
    decoder = TokenDecoder(dim=3, grid=2, patch=2, width=8, depth=1, heads=2, mlp=16)
    mean, var = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    latents = TokenLatents(decoder, mean, var)
    tokens = torch.randn(2, 4, 3)
    state = latents.to_state(tokens)
    assert state.shape == (2, 3, 2, 2)
    z = (tokens - mean) / torch.sqrt(var + 1e-5)
    assert torch.allclose(state[1, :, 1, 0], z[1, 2])          # token n = row * g + col sits at [:, row, col]
    assert torch.allclose(latents.to_tokens(state), tokens, atol=1e-6)
    assert torch.allclose(latents.decode(state), decoder(tokens), atol=1e-6)


def test_the_decoder_noise_is_tau_times_a_uniform_per_image():
    tokens = torch.zeros(3, 5, 4)
    gen = torch.Generator().manual_seed(0)
    noisy = noise_augment(tokens, 0.8, gen)
    gen = torch.Generator().manual_seed(0)
    sigma = 0.8 * torch.rand(3, 1, 1, generator=gen)
    assert torch.allclose(noisy, sigma * torch.randn(3, 5, 4, generator=gen))
    assert noise_augment(tokens, 0.0) is tokens


def test_the_decoder_maps_each_token_to_its_pixel_block():
    decoder = TokenDecoder(dim=4, grid=2, patch=3, width=8, depth=1, heads=2, mlp=16)
    tokens = torch.randn(1, 4, 4)
    out = decoder(tokens)
    assert out.shape == (1, 3, 6, 6)
    with pytest.raises(ValueError):
        decoder(torch.randn(1, 9, 4))


def _euler_on_grid(v, x, ts):
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * v(x, ts[i])
    return x


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_the_shifted_field_steps_on_the_warped_grid(solver):
    alpha, t_min, steps = 3.0, 0.001, 6
    velocity = lambda x, t, guide_at=None: x * t.view(-1, 1).to(x.dtype) + 1   # noqa: E731  a hand-made field
    sampler = build_sampler("ode", steps, solver)
    x0 = torch.randn(2, 3, dtype=torch.float64)
    x = sampler.sample(shifted_field(velocity, sampler, alpha, t_min), x0, path=None)
    ts = time_shift(t_min + (1 - t_min) * time_grid(steps), alpha)
    full = lambda x, t: velocity(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))  # noqa: E731
    if solver == "euler":
        expected = _euler_on_grid(full, x0, ts)
    else:                                                       # REPA's Heun: trapezoid, plain Euler on the last step
        expected = x0
        for i in range(steps):
            dt = ts[i + 1] - ts[i]
            d1 = full(expected, ts[i])
            guess = expected + dt * d1
            expected = guess if i == steps - 1 else expected + dt * 0.5 * (d1 + full(guess, ts[i + 1]))
    assert torch.allclose(x, expected, atol=1e-10)


def test_the_shifted_field_under_dopri5_solves_the_same_ode():
    alpha, t_min = 2.0, 0.2                                     # the grid ends at t = shift(0.2) = 1/3, not 0
    sampler = build_sampler("ode", 1, "dopri5")
    x0 = torch.ones(1, 2, dtype=torch.float64)
    x = sampler.sample(shifted_field(lambda x, t, g=None: x, sampler, alpha, t_min), x0, path=None)
    end = float(time_shift(torch.tensor(t_min), alpha))
    assert end == pytest.approx(1 / 3)
    assert torch.allclose(x, x0 * math.exp(end - 1), rtol=2e-3)    # dx/dt = x from t = 1 down to shift(t_min)


def test_the_loss_is_flow_matching_on_the_normalised_tokens():
    method = build_method(micro_config("rae"))
    method.setup("cpu")
    model = method.build_model()
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, "label": torch.tensor([0, 1]),
             "index": torch.tensor([0, 1]), "flip": torch.tensor([False, True])}
    t, eps = torch.tensor([0.3, 0.8]), torch.randn(2, 32, 8, 8, generator=gen)
    noisy = method.noised(model, batch, t=t, eps=eps)
    tokens = method.teacher.tokens(batch)[0]
    z = method.latents.to_state(tokens)
    assert not noisy.x.requires_grad and torch.allclose(noisy.x, z)
    assert torch.allclose(noisy.x_t, (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * eps)
    terms = method.losses(model, noisy, TrainContext(0, model))
    v = model.backbone(noisy.x_t, t, noisy.y).velocity
    assert set(terms) == {"flow"}
    assert torch.allclose(terms["flow"].value, ((v - (eps - z)) ** 2).mean())


def test_the_backbone_returns_blocks_of_body_and_head_and_stops_early():
    net = DiTDH(input_size=2, in_channels=4, num_classes=3, hidden=8, depth=2, heads=2, head_hidden=16, head_depth=1,
                head_heads=2)
    x, t, y = torch.randn(2, 4, 2, 2), torch.tensor([0.2, 0.7]), torch.tensor([0, 3])
    out = net(x, t, y, hidden_layers=(1, 3))
    assert out.hidden[1].shape == (2, 4, 8) and out.hidden[3].shape == (2, 4, 16)
    assert net(x, t, y, stop_after=2).velocity is None
    with pytest.raises(ConfigError):
        net(x, t, y, hidden_layers=(4,))


def test_the_rope_layout_rotates_rows_with_the_first_half():
    rope = EvaRoPE2D(head_dim=8, grid=3)
    # token (row 2, col 1) = index 7; channels 0-3 rotate by the row, 4-7 by the column, pairs share a frequency
    angles = torch.atan2(rope.freqs_sin[7], rope.freqs_cos[7])
    assert torch.allclose(angles, torch.tensor([2.0, 2.0, 0.02, 0.02, 1.0, 1.0, 0.01, 0.01]), atol=1e-6)


@pytest.mark.parametrize("override, key", [("data.vae=builtin", "data.vae"), ("model.patch=2", "model.patch"),
                                           ("rae.head_width=16", "rae.head_width"), ("rae.shift_base=9999", "shift"),
                                           ("rae.grid=5", "rae.grid"), ("rae.encoder=builtin,builtin", "rae.encoder"),
                                           ("flow.time=cosine", "flow.time")])
def test_bad_settings_are_one_clear_line(override, key):
    with pytest.raises(ConfigError, match=key):
        build_method(micro_config("rae", [override]))


def test_its_prepare_target_is_read_from_the_source_as_the_class_declares_it():
    from zoo.training.registry import available_methods, prepare_target_summaries

    summaries = prepare_target_summaries()
    assert summaries["rae-decoder"] == ("rae", available_methods()["rae"].prepare_targets["rae-decoder"])
    assert summaries == {t: (n, h) for n, cls in available_methods().items() for t, h in cls.prepare_targets.items()}


def test_prepare_trains_the_decoder_once_and_a_run_reads_it(tmp_path, capsys):
    out = tmp_path / "decoder.pt"
    assert main(["prepare", "rae-decoder", "--preset", "micro", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "32x8x8" in printed and out.exists()
    method = build_method(micro_config("rae", [f"rae.decoder={out}"]))
    method.setup("cpu", training=False)
    assert method.latents.decoder.dim == 32
    other = build_method(micro_config("rae", [f"rae.decoder={out}", "data.seed=5"]))
    with pytest.raises(ConfigError, match="trained for"):
        other.setup("cpu", training=False)


def test_dit_dh_xl_on_dinov2_b_tokens_has_the_papers_839m_parameters():
    with torch.device("meta"):
        net = DiTDH(input_size=16, in_channels=768, num_classes=1000, hidden=1152, depth=28, heads=16,
                    head_hidden=2048, head_depth=2, head_heads=16)
    assert sum(p.numel() for p in net.parameters()) == 838_380_628
