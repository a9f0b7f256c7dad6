"""The VAE layer: the built-in VAE, diffusers folders, latent diffusion for any method, the prepare dataset command,
`zoo export-vae`, and LPIPS from local files."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from zoo.training import contract
from zoo.config import load_config
from zoo.errors import MissingWeightsError
from zoo.latents.vae import ensure_builtin_vae, kl_to_standard_normal, latent_shape, load_vae

MICRO = ["preset=micro", "train.device=cpu"]


@pytest.fixture(scope="module")
def vae_cfg():
    return load_config(None, [*MICRO, "data.vae=builtin"])


@pytest.fixture(scope="module")
def vae(vae_cfg):
    return load_vae(vae_cfg).eval()


def test_builtin_vae_is_a_diffusers_folder_with_its_latent_scale(vae_cfg, vae):
    path = ensure_builtin_vae(vae_cfg, progress=False)
    config = json.loads((path / "config.json").read_text())
    record = json.loads((path / "zoo_vae.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and record["reconstruction_l1"] > 0
    assert latent_shape(vae_cfg) == (4, 8, 8) and (vae.latent_channels, vae.factor) == (4, 4)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, std = vae.posterior(images)
        state = vae.to_state(mean)
        # the state is (z - shift) * scale, and decode undoes exactly that before the decoder
        assert torch.allclose(state, (mean - config["shift_factor"]) * config["scaling_factor"], atol=1e-6)
        assert torch.allclose(vae.decode(state), vae.decode_latent(mean), atol=1e-5)
        assert vae.decode(state).shape == images.shape


def test_kl_matches_the_closed_form():
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3) + 0.5
    p, q = torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)
    expected = torch.distributions.kl_divergence(p, q).flatten(1).sum(1).mean()
    assert torch.allclose(kl_to_standard_normal(mean, std), expected, atol=1e-5)


def test_a_missing_vae_folder_names_it_and_the_fetch_command(tmp_path):
    cfg = load_config(None, [*MICRO, f"data.vae={tmp_path / 'sd-vae'}"])
    with pytest.raises(MissingWeightsError, match="(?s)sd-vae.*huggingface-cli download stabilityai/sd-vae-ft-ema"):
        latent_shape(cfg)


@pytest.mark.parametrize("name", ["sit", "repa"])
def test_any_method_trains_and_samples_on_vae_latents(name):
    overrides = ["data.vae=builtin", "model.patch=1"]
    contract.check_training_step(name, overrides)
    contract.check_sampling_shape(name, overrides)


def test_training_draws_latents_from_the_cached_posterior_moments_without_running_the_encoder(monkeypatch):
    """In-memory data: the VAE's posterior (mean, std) of every image and flip is cached once (float16, as a prepared
    store keeps it), and a step samples mean + std * eps from it: the same draw as encoding, without the encoder."""
    from zoo.data import build_dataset, gather
    from zoo.training.generate import build_method

    method = build_method(load_config("sit", [*MICRO, "data.vae=builtin", "model.patch=1"]))
    method.setup("cpu")
    assert method.latent_cache is not None
    batch = gather(build_dataset(method.cfg.data), torch.tensor([3, 5, 7]), torch.tensor([False, True, False]))
    with torch.no_grad():
        mean, std = method.vae.posterior(batch["image"])
    cached_mean, cached_std = method.latent_cache.moments(batch["index"], batch["flip"], "cpu")
    assert torch.allclose(cached_mean, mean, rtol=2e-3, atol=2e-3) and torch.allclose(cached_std, std, rtol=2e-3, atol=1e-4)
    monkeypatch.setattr(method.vae, "posterior", lambda images: pytest.fail("the encoder ran"))
    torch.manual_seed(0)
    state = method.encode(None, batch)
    torch.manual_seed(0)
    assert torch.allclose(state, method.vae.to_state(cached_mean + cached_std * torch.randn_like(cached_std)))
    sampling_only = build_method(load_config("sit", [*MICRO, "data.vae=builtin", "model.patch=1"]))
    sampling_only.setup("cpu", training=False)
    assert sampling_only.latent_cache is None


def write_image_folder(root, n=6):
    from zoo.data import shapes_split

    split = shapes_split(load_config(None, MICRO).data, num_images=n)
    for i, (image, label) in enumerate(zip(split.images, split.labels)):
        folder = root / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def zoo(*args):
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=600)


def test_prepare_dataset_and_export_vae_commands(tmp_path):
    from zoo.training.trainer import Trainer

    images = write_image_folder(tmp_path / "images", n=4)
    out = zoo("prepare", "dataset", "--vae", "builtin", "--preset", "micro", "--images", str(images), "--out",
              str(tmp_path / "latents"), "--size", "32", "--no-images", "--workers", "0")
    assert out.returncode == 0, out.stderr
    assert "data.dataset=prepared" in out.stdout and (tmp_path / "latents" / "meta.json").exists()

    run = tmp_path / "run"
    Trainer(load_config("repa_e", [*MICRO, "train.steps=2", "sample.num=0"]), run_dir=run, progress=False).fit()
    out = zoo("export-vae", "--ckpt", str(run), "--out", str(tmp_path / "tuned"))
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert len(config["latents_mean"]) == len(config["latents_std"]) == 4
    sit_run = tmp_path / "sit"
    Trainer(load_config("sit", [*MICRO, "train.steps=1", "sample.num=0"]), run_dir=sit_run, progress=False).fit()
    out = zoo("export-vae", "--ckpt", str(sit_run), "--out", str(tmp_path / "none"))
    assert out.returncode == 2 and "does not tune a VAE" in out.stderr


def test_lpips_from_local_files_is_zero_on_equal_images_and_grows_with_noise(tmp_path):
    from torchvision.models import vgg16

    from zoo.latents.lpips import CHANNELS, load_lpips

    with pytest.raises(MissingWeightsError, match="(?s)vgg16-397923af.pth.*curl"):
        load_lpips(tmp_path)
    torch.manual_seed(0)
    torch.save(vgg16(weights=None).state_dict(), tmp_path / "vgg16-397923af.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}, tmp_path / "vgg.pth")
    lpips = load_lpips(tmp_path)
    assert not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    near, far = x + 0.05 * torch.randn_like(x), x + 0.5 * torch.randn_like(x)
    d0, d1, d2 = lpips(x, x), lpips(near, x), lpips(far, x)
    assert d0.shape == (2,) and torch.allclose(d0, torch.zeros(2)) and (d1 > 0).all() and (d2 > d1).all()
    vgg = torch.load(tmp_path / "vgg16-397923af.pth")
    assert torch.equal(lpips.slices[2][1].weight, vgg["features.10.weight"])  # slice 2: pool 9, conv 10, ...


def test_a_vae_folder_with_per_channel_latent_statistics_decodes_as_diffusers_does(tmp_path, micro_cfg):
    """REPA-E's released end-to-end VAE keeps its latent normalisation as latents_mean / latents_std: any method's
    data.vae reads it, and the state decodes exactly as diffusers decodes the de-normalised latent."""
    from diffusers import AutoencoderKL

    from zoo.training.generate import build_method

    mean, std = [0.5, -0.25, 0.1, 0.0], [2.0, 0.5, 1.5, 1.0]
    net = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, latents_mean=mean, latents_std=std,
                        scaling_factor=1.0)
    net.save_pretrained(tmp_path / "vae")
    method = build_method(micro_cfg("sit", f"data.vae={tmp_path / 'vae'}", "data.image_size=16"))
    method.setup("cpu", training=False)
    assert method.state_shape() == (4, 8, 8)
    state = torch.randn(2, 4, 8, 8)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = net.eval().decode(state * s + m).sample
        assert torch.allclose(method.decode(None, state), expected, atol=1e-5)
        z = torch.randn(2, 4, 8, 8)
        assert torch.allclose(method.vae.to_state(z), (z - m) / s, atol=1e-6)
