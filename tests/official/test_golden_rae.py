"""RAE (bytetriper/RAE): its DiT^DH forward, its shifted Euler sampler (plain and with CFG) and sampling grid, its
shifted training times, and its latent space -- the running statistics, the normalisation, the decoder's noise and
the ViT decoder -- on the official weights and draws.

RAE's transport has t = 1 as noise, as the zoo: the network is fed t unchanged.
"""
import math

import pytest
import torch

from golden import assert_close, fixture, loaded, official_method
from methods.rae import shifted_field, time_shift, truncated_logit_normal
from zoo.backbones.ddt_head import DiTDH
from zoo.flow.guidance import Guidance
from zoo.flow.samplers import build_sampler, time_grid
from zoo.latents.token_decoder import (TokenDecoder, TokenLatents, latent_statistics, noise_augment,
                                       official_decoder_state)
from zoo.training.method import DataInfo

HEAD = fixture("rae_ddt_head")
TIME = fixture("rae_time")
LATENT = fixture("rae_latent")
# the fixture's DiTwDDTHead: 8 x 4 x 4 latent, body 2 x 32 (2 heads), head 1 x 48 (3 heads), 5 classes; alpha =
# sqrt(8 * 16 / 32) = 2, the shift its sampler ran with
RAE = ["model.size=custom", "model.hidden=32", "model.depth=2", "model.heads=2", "rae.head_width=48",
       "rae.head_depth=1", "rae.head_heads=3", "rae.grid=4", "teacher.width=8", "rae.shift_base=32",
       "model.class_dropout=0"]


@pytest.fixture(scope="module")
def rae():
    method = official_method("rae", DataInfo(3, 32, 5), *RAE)
    assert method.shift() == HEAD["config"]["shift"]
    return method, loaded(method, HEAD["state_dict"])


def test_the_ddt_head_velocity_equals_the_official():
    net = DiTDH(input_size=4, in_channels=8, num_classes=5, hidden=32, depth=2, heads=2, head_hidden=48,
                head_depth=1, head_heads=3)
    official = HEAD["state_dict"]
    for name in ("pos_embed", "enc_feat_rope.freqs_cos", "enc_feat_rope.freqs_sin", "dec_feat_rope.freqs_cos",
                 "dec_feat_rope.freqs_sin"):   # the fixed tables the zoo recomputes instead of loading
        assert_close(dict(net.named_buffers())[name], official[name], 1e-7, what=name)


def test_the_method_model_gives_the_official_velocity(rae):
    _, model = rae
    i = HEAD["inputs"]
    with torch.no_grad():
        v = model.backbone(i["x"], i["t"], i["y"]).velocity
    assert_close(v, HEAD["outputs"]["velocity"], what="velocity")


def test_the_sampling_grid_is_the_official_shifted_grid():
    alpha, t_min = HEAD["config"]["shift"], 0.001
    warped = time_shift(t_min + (1 - t_min) * time_grid(4), alpha)        # 5 official grid points = 4 zoo steps
    assert_close(warped.float(), HEAD["outputs"]["grid"], 1e-7, what="grid")
    xl = time_shift(t_min + (1 - t_min) * time_grid(49), math.sqrt(768 * 16 * 16 / 4096))
    assert_close(xl.float(), HEAD["outputs"]["grid_xl"], 1e-6, what="XL grid")
    assert HEAD["outputs"]["shift_xl"] == pytest.approx(math.sqrt(48))


@pytest.mark.parametrize("cfg_scale, key", [(1.0, "euler_sample"), (2.0, "euler_sample_cfg")])
def test_the_euler_sample_equals_the_official(rae, cfg_scale, key):
    method, model = rae
    sampler = build_sampler("ode", 4, "euler")
    field = method.velocity_field(model, HEAD["inputs"]["labels"], Guidance(cfg_scale, 0.0, 1.0), sampler=sampler)
    with torch.no_grad():
        x = sampler.sample(field, HEAD["inputs"]["z0"], method.path)
    assert_close(x, HEAD["outputs"][key], what=key)


def test_the_shifted_training_times_equal_the_official_draws():
    torch.manual_seed(TIME["config"]["seed"])
    x0 = torch.randn(TIME["config"]["x1_shape"])             # the official draws the noise first, then t
    t = time_shift(truncated_logit_normal(6, 0.0, 1.0, 0.0, 0.999), TIME["config"]["shift_logit_normal"])
    assert_close(x0, TIME["outputs"]["x0"], 0.0, what="noise")
    assert_close(t, TIME["outputs"]["t_logit_normal"], 1e-6, what="logit-normal t")
    torch.manual_seed(TIME["config"]["seed"])
    torch.randn(TIME["config"]["x1_shape"])
    t = time_shift(torch.rand(6) * 0.999, TIME["config"]["shift_uniform"])
    assert_close(t, TIME["outputs"]["t_uniform"], 1e-6, what="uniform t")


def test_the_method_draws_its_training_times_as_the_official(rae):
    method, _ = rae
    torch.manual_seed(TIME["config"]["seed"])
    torch.randn(TIME["config"]["x1_shape"])
    t = method.sample_time(6, "cpu")
    expected = TIME["outputs"]["t_logit_normal"]   # drawn with shift sqrt(48); the same draws at the method's 2
    base = expected / (TIME["config"]["shift_logit_normal"] - (TIME["config"]["shift_logit_normal"] - 1) * expected)
    assert_close(t, time_shift(base, method.shift()), 1e-5, what="the method's t")


def _latents():
    decoder = TokenDecoder(8, 4, 2, 32, 2, 2, 64)
    state, unused = official_decoder_state(LATENT["state_dict"])
    assert unused == ["decoder_pos_embed"]
    decoder.load_state_dict(state, strict=True)
    assert_close(decoder.pos, LATENT["state_dict"]["decoder_pos_embed"], 1e-7, what="decoder position table")
    batches = [b.flatten(2).transpose(1, 2) for b in LATENT["inputs"]["batches"]]   # [B, C, H, W] -> tokens
    mean, var = latent_statistics(batches, momentum=0.1)
    return TokenLatents(decoder.eval(), mean, var)


def test_the_running_statistics_equal_the_official():
    latents, (c, h) = _latents(), LATENT["config"]["latent"][:2]
    assert_close(latents.mean.T.reshape(c, h, h), LATENT["outputs"]["running_mean"], what="mean")
    assert_close(latents.var.T.reshape(c, h, h), LATENT["outputs"]["running_var"], what="variance")


def test_the_normalised_latent_its_noise_and_its_decoding_equal_the_official():
    latents, tokens = _latents(), LATENT["inputs"]["tokens"]
    assert_close(latents.to_state(tokens), LATENT["outputs"]["latent"], what="latent")
    torch.manual_seed(LATENT["config"]["noise_seed"])
    noisy = latents.to_state(noise_augment(tokens, LATENT["config"]["noise_tau"]))
    assert_close(noisy, LATENT["outputs"]["noisy_latent"], what="noised latent")
    mean = torch.tensor(LATENT["config"]["encoder_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(LATENT["config"]["encoder_std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        images = latents.decode(latents.to_state(tokens))
    # the official decoder predicts ImageNet-normalised pixels and de-normalises them to [0, 1]; the zoo's network
    # is the same, its output read as the image itself
    assert_close(images * std + mean, LATENT["outputs"]["decoded"], what="decoded")
