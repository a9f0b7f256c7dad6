"""The built-in perceptual distance (LPIPS's form on the built-in teacher) and how the VAE recipes pick a network."""
import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.latents.perceptual import TeacherPerceptual, perceptual_network
from zoo.teachers.builtin import TeacherViT


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    net = TeacherViT(image_size=16, patch=4, width=32, depth=2, heads=2)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as a trained teacher's are
        for m in net.embed:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def transcribed(net, x, x0):
    """d(x, x0) written out: the stem's two ReLU maps and the two layers' tokens, unit vectors per position."""
    def maps(images):
        e = net.embed
        a = e[2](e[1](e[0](images)))                    # conv, BN, ReLU at 16x16
        b = e[5](e[4](e[3](a)))                         # stride-2 conv, BN, ReLU at 8x8
        tokens = e[6](b).flatten(2).transpose(1, 2) + net.pos
        t1 = net.blocks.layers[0](tokens)
        t2 = net.blocks.layers[1](t1)
        return [(a, 1), (b, 1), (t1, 2), (t2, 2)]

    total = 0
    for (f, dim), (f0, _) in zip(maps(x), maps(x0)):
        u = f / (f.norm(dim=dim, keepdim=True) + 1e-10)
        u0 = f0 / (f0.norm(dim=dim, keepdim=True) + 1e-10)
        total = total + ((u - u0) ** 2).sum(dim).flatten(1).mean(1)
    return total / 4


def test_the_distance_is_lpips_form_on_the_teachers_feature_maps(teacher):
    torch.manual_seed(1)
    x, x0 = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1
    d = TeacherPerceptual(teacher)(x, x0)
    assert d.shape == (3,) and torch.allclose(d, transcribed(teacher, x, x0), atol=1e-6)


def test_it_is_zero_on_equal_images_grows_with_noise_and_trains_only_the_images(teacher):
    torch.manual_seed(2)
    distance = TeacherPerceptual(teacher).train()  # an owner in training mode does not unfreeze BatchNorm
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert distance(x, x).abs().max() < 1e-6
    small, large = (distance((x + s * torch.randn_like(x)).clamp(-1, 1), x).mean() for s in (0.05, 0.5))
    assert 0 < small < large
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    distance(y, x).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_the_network_choice(micro_cfg, tmp_path):
    cfg = micro_cfg("sit")
    assert perceptual_network("none", "", cfg, "repa_e") is None
    assert isinstance(perceptual_network("builtin", "", cfg, "repa_e"), TeacherPerceptual)
    assert isinstance(perceptual_network("auto", "", cfg, "repa_e"), TeacherPerceptual)  # no weights: the built-in one
    with pytest.raises(ConfigError, match="repa_e.perceptual=lpips needs repa_e.lpips_weights"):
        perceptual_network("lpips", "", cfg, "repa_e")
    from zoo.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):  # auto with weights: LPIPS-VGG, from them
        perceptual_network("auto", str(tmp_path), cfg, "repa_e")


def test_the_built_in_vae_recipe_keys_its_cache_on_the_term_and_its_teacher(micro_cfg):
    from zoo.config import load_config
    from zoo.latents.vae import builtin_vae_dir

    plain = load_config(None, ["preset=micro"])
    explicit_zero = load_config(None, ["preset=micro", "autoencoder.perceptual_weight=0"])
    on = load_config(None, ["preset=micro", "autoencoder.perceptual_weight=0.5"])
    other_teacher = load_config(None, ["preset=micro", "autoencoder.perceptual_weight=0.5", "teacher.steps=7"])
    assert builtin_vae_dir(plain) == builtin_vae_dir(explicit_zero)
    assert len({builtin_vae_dir(plain), builtin_vae_dir(on), builtin_vae_dir(other_teacher)}) == 3
    with pytest.raises(ConfigError, match="autoencoder.perceptual_weight=-1"):
        load_config(None, ["preset=micro", "autoencoder.perceptual_weight=-1"])


def test_the_vae_records_its_reconstruction_of_held_out_images(micro_cfg):
    import json

    from zoo.data import shapes_split
    from zoo.latents.vae import ensure_builtin_vae, load_vae

    cfg = micro_cfg("sit", "data.vae=builtin")
    record = json.loads((ensure_builtin_vae(cfg, progress=False) / "zoo_vae.json").read_text())
    vae = load_vae(cfg).eval()
    held_out = shapes_split(cfg.data, reference=True, num_images=record["reconstruction_images"]).images
    x = held_out.float() / 127.5 - 1
    with torch.no_grad():
        recon = vae.decode_latent(vae.posterior(x)[0])
    assert record["reconstruction_images"] == min(1000, cfg.autoencoder.num_images)
    assert record["reconstruction_psnr"] == pytest.approx(float(10 * torch.log10(4 / F.mse_loss(recon, x))), abs=1e-3)
