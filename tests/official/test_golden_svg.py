"""SVG (shiml20/SVG): the zoo's residual ViT, latent (teacher tokens + matched residual channels, the mask token),
conv decoder, DiT at patch 1, shifted training times, loss and shifted Euler / Heun sampling equal the official
code's. The autoencoder's weights are re-drawn from the seeds the fixture records (the official residual ViT alone is
43 MB), after checking that the zoo's modules have exactly the official keys and shapes."""
import math

import pytest
import torch

from golden import assert_close, fixture, loaded, official_method, sit_overrides
from methods.svg import shift_time
from zoo.flow.guidance import Guidance
from zoo.flow.samplers import build_sampler
from zoo.latents.residual_autoencoder import ConvDecoder, ResidualAutoencoder, ResidualAutoencoderRecipe
from zoo.training.method import DataInfo, NoisyBatch, TrainContext

AE = fixture("svg_autoencoder")
DIT = fixture("svg_dit")


def redraw(shapes: dict, seed: int) -> dict:
    """The fixture's weights: sorted keys, one generator; dim >= 2: N(0, 1) / sqrt(prod(shape[1:])), norm weights
    (and torchvision's ln_* biases) 1 + 0.1 N, other vectors 0.1 N (the generator's rule, README)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        x = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            out[key] = x / math.sqrt(math.prod(shape[1:]))
        elif "norm" in key or ".ln" in key or key.startswith("ln") and key.endswith("weight"):
            out[key] = 1 + 0.1 * x
        else:
            out[key] = 0.1 * x
    return out


def shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def autoencoder():
    """The zoo's autoencoder at the fixture's residual config: a 16-wide stand-in teacher, 8 channels, 256 px."""
    recipe = ResidualAutoencoderRecipe(residual_channels=8, mask_ratio=0.5)
    ae = ResidualAutoencoder(recipe, image_size=256, grid=16, teacher_dim=16)
    assert shapes(ae.residual) == {k: tuple(v) for k, v in AE["shapes"]["residual"].items()}
    ae.residual.load_state_dict(redraw(AE["shapes"]["residual"], AE["weights"]["residual_seed"]))
    ae.mask_token.data.copy_(AE["inputs"]["mask_token"])
    return ae.eval()


def images():
    g = torch.Generator().manual_seed(AE["inputs"]["images_seed"])
    return torch.rand(2, 3, 256, 256, generator=g) * 2 - 1


def test_residual_vit_and_latent_equal_the_official_encode(autoencoder):
    x, tokens = images(), AE["inputs"]["teacher_tokens"]
    with torch.no_grad():
        from zoo.latents.residual_autoencoder import imagenet_pixels

        assert_close(imagenet_pixels(x)[0, :, :2, :2], AE["inputs"]["x_dino_sample"], what="ImageNet normalisation")
        assert_close(autoencoder.residual(imagenet_pixels(x)), AE["outputs"]["residual_raw"], what="residual ViT")
        assert_close(autoencoder.latent(tokens, x), AE["outputs"]["latent_eval"], what="latent (matched)")
        autoencoder.match_residual = False
        try:
            assert_close(autoencoder.latent(tokens, x), AE["outputs"]["latent_nomatch"], what="latent (unmatched)")
        finally:
            autoencoder.match_residual = True


def test_mask_token_replaces_the_residual_channels_of_the_drawn_images(autoencoder):
    """The official draw: torch.rand(B) < mask_ratio, the flagged images' residual channels become the mask token."""
    mask = AE["inputs"]["mask_u"] < 0.5
    assert mask.sum() == 1
    with torch.no_grad():
        z = autoencoder.latent(AE["inputs"]["teacher_tokens"], images(), mask=mask)
    assert_close(z, AE["outputs"]["latent_masked"], what="masked latent")


def test_conv_decoder_equals_the_latent_diffusion_decoder():
    c = AE["config"]["decoder"]
    decoder = ConvDecoder(c["z_channels"], c["resolution"] // 2 ** (len(c["ch_mult"]) - 1), c["ch"], c["ch_mult"],
                          c["num_res_blocks"], c["attn_resolutions"], 32)
    assert shapes(decoder) == {k: tuple(v) for k, v in AE["shapes"]["decoder"].items()}
    decoder.load_state_dict(redraw(AE["shapes"]["decoder"], AE["weights"]["decoder_seed"]))
    z = torch.randn(2, 24, 8, 8, generator=torch.Generator().manual_seed(AE["inputs"]["z_seed"]))
    with torch.no_grad():
        assert_close(decoder.eval()(z), AE["outputs"]["decoded"], what="decoded images")


# ---------------------------------------------------------------- the diffusion model
def to_zoo(tokens):
    """[B, 256, C] row-major tokens -> [B, C, 16, 16]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], 16, 16)


@pytest.fixture(scope="module")
def svg():
    c = DIT["config"]
    # a 4-wide built-in teacher + 2 residual channels = the official 6 channels; 64 px / 4 = the 16 x 16 grid
    method = official_method("svg", DataInfo(3, 64, c["num_classes"]), *sit_overrides(c), "model.time_scale=1",
                             "model.time_convention=data", "model.qk_norm=false", "teacher.width=4",
                             "svg.residual_channels=2", "svg.downsample=4")
    assert method.state_shape() == (c["in_channels"], 16, 16)
    return method, loaded(method, DIT["state_dict"])


def test_dit_forward_equals_the_official(svg):
    method, model = svg
    x, t, y = DIT["inputs"]["x"], DIT["inputs"]["t"], DIT["inputs"]["y"]
    with torch.no_grad():
        v = model.backbone(to_zoo(x), 1 - t, y).velocity
    # the official net predicts x - noise (t = 1 data); the zoo's eps - x; learn_sigma's half dropped
    assert_close(v, -to_zoo(DIT["outputs"]["forward"][..., :DIT["config"]["in_channels"]]), what="velocity")


def test_training_times_and_loss_equal_the_official_rectified_flow(svg, monkeypatch):
    method, model = svg
    i = DIT["inputs"]
    # the official t = s u / (1 + (s - 1) u) of data-time; the zoo's shift of 1 - u is its noise-time 1 - t
    assert_close(shift_time(1 - i["u"], i["train_shift"]), 1 - DIT["outputs"]["t_shifted"], tol=1e-6, what="shifted t")
    monkeypatch.setattr(method.time_sampler, "sample", lambda n, device=None, generator=None: 1 - i["u"])
    t = method.sample_time(3, "cpu")
    x, eps = to_zoo(i["data"]), to_zoo(i["z0"])
    noisy = NoisyBatch(x, eps, t, method.path.interpolate(x, eps, t), i["labels"], {}, {})
    with torch.no_grad():
        terms = method.losses(model, noisy, TrainContext(0, None))
    assert set(terms) == {"flow"}
    assert_close(terms["flow"].value, DIT["outputs"]["loss"], what="loss")


@pytest.mark.parametrize("run", ["euler_cfg1.0", "euler_cfg4.0", "heun_cfg1.0", "heun_cfg4.0"])
def test_shifted_sampling_equals_the_official_sampler(svg, run):
    """Official Euler / Heun (corrector at every step: the zoo's heun_trapezoid), 6 steps on the grid shifted by
    0.15, constant CFG."""
    method, model = svg
    i = DIT["inputs"]
    mode, cfg = run.split("_cfg")
    sampler = build_sampler("ode", i["steps"], "euler" if mode == "euler" else "heun_trapezoid")
    field = method.velocity_field(model, i["ys"], Guidance(float(cfg)), sampler=sampler)
    with torch.no_grad():
        out = sampler.sample(field, to_zoo(i["noise"]), method.path)
    assert_close(out, to_zoo(DIT["outputs"]["samples"][run]), what=run)
