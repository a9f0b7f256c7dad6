"""The prepared store (`zoo prepare dataset`, data.dataset=prepared) on a small ImageNet-like folder: JPEGs of
varied sizes and one corrupt file -> the store -> one training step of every method -> exact resume with
DataLoader workers."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.config import load_config
from zoo.data.folder import ImageFolder, center_crop_resize
from zoo.errors import ConfigError
from zoo.training import contract

SIZES = [(40, 56), (64, 48), (33, 90), (120, 80), (32, 32), (75, 41), (50, 50), (96, 128)]
CLASSES = ["n01440764", "n01443537", "n01484850"]


def write_imagenet_like(root, per_class=4, corrupt=True):
    """A folder in ImageNet's train/ layout: class folders of JPEG files of varied sizes, one unreadable."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = SIZES[(c * per_class + i) % len(SIZES)]
            base = rng.integers(0, 255, size=3)
            pixels = (base + rng.integers(0, 60, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=90)
    if corrupt:
        (root / CLASSES[1] / f"{CLASSES[1]}_9.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def write_small_vae(path, seed=0):
    """A random diffusers AutoencoderKL (32 px -> 4 x 8 x 8) saved as a folder, as SD-VAE is."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    net = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, mid_block_add_attention=False)
    net.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from zoo.data.store import prepare_store
    from zoo.latents.vae import load_vae

    root = tmp_path_factory.mktemp("store")
    images = write_imagenet_like(root / "train")
    vae_dir = write_small_vae(root / "vae")
    vae = load_vae(load_config(None, ["preset=micro", f"data.vae={vae_dir}"]))
    meta = prepare_store(vae, ImageFolder(root / "train", 32), root / "store", shard_size=5, batch_size=3,
                         progress=False)
    return {"root": root, "images": images, "vae": vae_dir, "out": root / "store", "meta": meta, "vae_net": vae}


def store_overrides(store, *extra):
    return ["data.dataset=prepared", f"data.root={store['out']}", f"data.vae={store['vae']}", "data.num_classes=3",
            "data.image_size=32", "train.batch_size=4", "teacher.batch_size=8", "teacher.probe_images=4", *extra]


def test_the_store_holds_crops_and_both_flips_posteriors_and_names_the_corrupt_file(store):
    from zoo.data.store import PreparedStore

    meta = store["meta"]
    assert meta["num_images"] == 12 and meta["num_shards"] == 3 and meta["latent_shape"] == [4, 8, 8]
    assert len(meta["skipped"]) == 1 and f"{CLASSES[1]}_9.JPEG" in meta["skipped"][0]
    data = PreparedStore(store["out"])
    folder = ImageFolder(store["images"], 32)
    readable = [i for i, (p, _) in enumerate(folder.samples) if not p.name.endswith("_9.JPEG")]
    index, flip = torch.tensor([0, 11, 5, 6]), torch.tensor([False, True, True, False])
    batch = data.batch(index, flip)
    assert batch["image"].dtype == torch.uint8 and batch["latent_mean"].dtype == torch.float16
    for row, (i, f) in enumerate(zip(index.tolist(), flip.tolist())):
        path, label = folder.samples[readable[i]]
        crop = torch.from_numpy(np.asarray(center_crop_resize(Image.open(path).convert("RGB"), 32)).copy())
        crop = crop.permute(2, 0, 1)
        assert torch.equal(batch["image"][row], crop.flip(-1) if f else crop)  # the ADM crop, mirrored on request
        assert int(batch["label"][row]) == label
    x = batch["image"].float() / 127.5 - 1
    with torch.no_grad():
        mean, std = store["vae_net"].posterior(x)
    assert torch.allclose(batch["latent_mean"].float(), mean, atol=3e-3, rtol=3e-3)
    assert torch.allclose(batch["latent_std"].float(), std, atol=3e-3, rtol=3e-3)
    # a DataLoader worker's whole-batch call gives the same batch
    items = data.__getitems__(list(zip(index.tolist(), flip.tolist())))
    assert all(torch.equal(items[k], batch[k]) for k in batch)


@pytest.mark.parametrize("name,extra", [("repa", []), ("ddt", []), ("urepa", []), ("redi", []), ("repa_e", []),
                                        ("deepflow", ["deepflow.repa=true"]), ("sra", []), ("sit", [])])
def test_every_method_trains_one_step_from_the_store(store, name, extra):
    overrides = store_overrides(store, "model.patch=1", *extra)
    if name == "repa_e":  # it encodes the store's images with the VAE it tunes, so data.vae stays empty
        overrides = [o for o in overrides if not o.startswith("data.vae=")] + [f"repa_e.vae={store['vae']}"]
    if name == "redi":
        overrides.append("redi.pca_images=12")
    contract.check_training_step(name, overrides)


def test_resume_is_exact_with_dataloader_workers(store, tmp_path):
    from zoo.training.trainer import Trainer

    overrides = ["preset=micro", "train.device=cpu", *store_overrides(store, "model.patch=1", "data.num_workers=2",
                                                                       "train.steps=4", "sample.num=0")]
    full = Trainer(load_config("repa", overrides), run_dir=tmp_path / "full", progress=False)
    full.fit()
    from zoo.training.checkpoint import load_checkpoint

    half = Trainer(load_config("repa", [*overrides, "train.steps=2"]), run_dir=tmp_path / "half", progress=False)
    half.fit()
    resumed = Trainer(load_config("repa", overrides), run_dir=tmp_path / "half", progress=False,
                      resume=load_checkpoint(tmp_path / "half"))
    assert resumed.step == 2
    resumed.fit()
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_store_is_read_only_with_the_vae_that_wrote_it(store, tmp_path):
    other = write_small_vae(tmp_path / "other-vae", seed=1)
    with pytest.raises(ConfigError, match="prepared with another VAE"):
        contract.check_training_step("sit", store_overrides(store, "model.patch=1", f"data.vae={other}"))
    with pytest.raises(ConfigError, match="needs data.vae"):
        contract.check_builds("sit", ["data.dataset=prepared", f"data.root={store['out']}"])


def test_a_latents_only_store_refuses_teachers_in_one_line(store, tmp_path):
    from zoo.data.store import prepare_store
    from zoo.latents.vae import load_vae

    vae = load_vae(load_config(None, ["preset=micro", f"data.vae={store['vae']}"]))
    out = tmp_path / "latents-only"
    meta = prepare_store(vae, ImageFolder(store["images"], 32), out, shard_size=6, keep_images=False, progress=False)
    assert not list(out.glob("*.image.npy")) and meta["num_images"] == 12
    overrides = [*store_overrides(store, "model.patch=1"), f"data.root={out}"]
    contract.check_training_step("sit", overrides)
    with pytest.raises(ConfigError, match="holds only latents"):
        contract.check_training_step("repa", overrides)


def zoo(*args):
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=600)


def test_prepare_continues_a_killed_run_and_names_a_corrupt_shard(store, tmp_path):
    import shutil

    out = tmp_path / "store"
    shutil.copytree(store["out"], out)
    # as a kill after the first shard leaves it: later shards' records gone, no meta.json
    for i in (1, 2):
        (out / f"shard_{i:05d}.json").unlink()
    (out / "meta.json").unlink()
    before = (out / "shard_00000.image.npy").stat().st_mtime_ns
    args = ["prepare", "dataset", "--images", str(store["images"]), "--vae", str(store["vae"]), "--out", str(out),
            "--size", "32", "--shard-size", "5", "--workers", "0", "--device", "cpu"]
    result = zoo(*args)
    assert result.returncode == 0, result.stderr
    assert "prepared 12 images (3 classes, skipped 1" in result.stdout and "data.dataset=prepared" in result.stdout
    assert (out / "shard_00000.image.npy").stat().st_mtime_ns == before  # finished shards are kept
    assert json.loads((out / "meta.json").read_text())["num_images"] == 12
    for part in ("image", "label"):
        assert np.array_equal(np.load(out / f"shard_00002.{part}.npy"), np.load(store["out"] / f"shard_00002.{part}.npy"))
    # the VAE's posterior means: the same to float16 rounding (the resumed run encodes shard 2 in batches other than
    # the fixture's, which may round differently: on one thread one value in 1,536 was one float16 step off; a wrong
    # image or flip would be off by far more)
    np.testing.assert_allclose(np.load(out / "shard_00002.mean.npy").astype(np.float32),
                               np.load(store["out"] / "shard_00002.mean.npy").astype(np.float32), rtol=0, atol=2e-3)

    with open(out / "shard_00001.mean.npy", "r+b") as f:
        f.truncate(100)
    result = zoo("train", "--method", "sit", "--preset", "micro", "train.steps=1", f"train.out_dir={tmp_path}",
                 "train.device=cpu", *store_overrides({**store, "out": out}))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "shard_00001.mean.npy is missing or truncated" in result.stderr

    result = zoo(*args[:-2], "--size", "48", "--device", "cpu")  # other settings into the same folder
    assert result.returncode != 0 and "prepared with other image_size" in result.stderr
