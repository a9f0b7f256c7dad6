"""The built-in data and the deterministic batch stream."""
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.config import load_config
from zoo.data import BatchLoader, StepBatches, build_dataset, data_identity, data_info, shapes_split
from zoo.data.folder import ImageFolder
from zoo.data.shapes import CLASSES, generate_shapes
from zoo.errors import ConfigError, DataError


def test_shapes_are_deterministic_balanced_and_seeded():
    a, la = generate_shapes(200, seed=3)
    b, lb = generate_shapes(200, seed=3)
    c, _ = generate_shapes(200, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (200, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.bincount(la).tolist() == [20] * len(CLASSES)


def test_classes_differ_in_structure_not_in_colour():
    images, labels = generate_shapes(1000, seed=0)
    mean_colour = torch.stack([images[labels == k].float().mean((0, 2, 3)) for k in range(10)])
    # colours are random nuisances: every class has about the same average colour
    assert (mean_colour.max(0).values - mean_colour.min(0).values).max() < 25


def test_shape_scale_grows_the_shapes_and_keeps_them_in_the_frame():
    small, labels = generate_shapes(200, seed=0, size=32)
    large, _ = generate_shapes(200, seed=0, size=32, scale=1.5)
    assert torch.equal(small, generate_shapes(200, seed=0, size=32, scale=1.0)[0])  # the default is scale 1

    def shape_pixels(images):  # pixels far from the image's background colour (its corner pixel)
        return ((images.float() - images[:, :, :1, :1].float()).abs().amax(1) > 60).float()

    discs = labels == 0  # filled, one colour: their area grows with the square of the scale
    ratio = shape_pixels(large[discs]).sum() / shape_pixels(small[discs]).sum()
    assert 1.9 < ratio < 2.6, ratio  # 1.5^2 = 2.25
    border = shape_pixels(large).clone()
    border[:, 1:-1, 1:-1] = 0
    assert border.sum() / shape_pixels(large).sum() < 0.01  # the larger shapes move less: still inside the image


def test_shape_scale_is_checked_and_keys_the_caches():
    with pytest.raises(ConfigError, match="do not fit"):
        data_info(load_config("sit", ["data.shape_scale=1.7"]).data)
    with pytest.raises(ConfigError, match="positive"):
        data_info(load_config("sit", ["data.shape_scale=0"]).data)
    plain, scaled = (load_config("sit", o).data for o in ([], ["data.shape_scale=1.5"]))
    assert "shape_scale" not in data_identity(plain)  # caches written before the option keep their keys
    assert data_identity(scaled)["shape_scale"] == 1.5


def test_reference_split_differs_from_training_split():
    cfg = load_config("sit", ["data.num_images=100"]).data
    assert not torch.equal(shapes_split(cfg).images, shapes_split(cfg, reference=True).images)


def test_step_batches_are_a_function_of_the_step():
    plan = StepBatches(100, 10, seed=0, hflip=True)
    first = [plan(s) for s in range(12)]
    again = StepBatches(100, 10, seed=0, hflip=True)
    assert all(torch.equal(first[s][0], again(s)[0]) and torch.equal(first[s][1], again(s)[1]) for s in (11, 3, 0))
    epoch = torch.cat([first[s][0] for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))  # one epoch visits every image once
    assert not StepBatches(100, 10, seed=0, hflip=False)(0)[1].any()


def test_ranks_split_the_global_batch():
    full = StepBatches(100, 8, seed=1, hflip=True)(5)[0]
    parts = [StepBatches(100, 8, seed=1, hflip=True, rank=r, world_size=2)(5)[0] for r in range(2)]
    assert sorted(torch.cat(parts).tolist()) == sorted(full.tolist())


def test_batches_are_images_in_range_with_flips_applied():
    cfg = load_config("sit", ["data.num_images=64"])
    loader = BatchLoader(build_dataset(cfg.data), cfg.data, 16, seed=0)
    batch = next(loader.iterate(0))
    assert batch["image"].shape == (16, 3, 32, 32)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    raw = loader.dataset.images[batch["index"]].float() / 127.5 - 1
    for i in range(16):
        expected = raw[i].flip(-1) if batch["flip"][i] else raw[i]
        assert torch.equal(batch["image"][i], expected)


def make_folder(root, classes=("cat", "dog"), per_class=3):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")


def test_image_folder(tmp_path):
    make_folder(tmp_path)
    ds = ImageFolder(tmp_path, 32)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    item = ds[(4, True)]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 1
    cfg = load_config("sit", ["data.dataset=folder", f"data.root={tmp_path}", "data.num_classes=2"]).data
    assert data_info(cfg).num_classes == 2
    loader = BatchLoader(build_dataset(cfg), cfg, 4, seed=0)
    assert next(loader.iterate(0))["image"].shape == (4, 3, 32, 32)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty", 32)
    make_folder(tmp_path / "bad", classes=("a",), per_class=1)
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolder(tmp_path / "bad", 32)
    with pytest.raises(DataError, match="broken.png"):
        ds.load([p for p, _ in ds.samples].index(tmp_path / "bad" / "a" / "broken.png"))
    cfg = load_config("sit", ["data.dataset=folder", f"data.root={tmp_path / 'bad'}"]).data
    with pytest.raises(ConfigError, match="num_classes=1"):
        build_dataset(cfg)


def test_an_image_folder_without_a_root_is_one_line():
    from zoo.data.folder import list_classes
    from zoo.errors import DataError

    with pytest.raises(DataError, match="data.dataset=folder needs data.root"):
        list_classes("")


def test_a_subset_for_statistics_holds_every_class_in_proportion_however_the_set_is_ordered():
    """The built-in shapes interleave classes (class = index mod 10) and an image folder sorts them: every 10th
    shape, or a folder's first images, would be one class. The statistics measured on a subset (the SVG latent's
    mean and std, ReDi's PCA, the VAE's scale, the teacher's mean token) use subset_index instead."""
    from zoo.data import subset_index

    total, classes, num = 20000, 10, 2000
    interleaved = torch.arange(total) % classes
    by_class = torch.arange(total) // (total // classes)
    assert torch.bincount(interleaved[torch.arange(num) * total // num], minlength=classes).tolist()[1:] == [0] * 9
    for labels in (interleaved, by_class):
        index = subset_index(total, num)
        counts = torch.bincount(labels[index], minlength=classes)
        assert counts.min() >= 150 and counts.max() <= 250, counts.tolist()  # 200 each, binomial spread
    assert len(set(index.tolist())) == num and index.tolist() == sorted(index.tolist())
    assert torch.equal(subset_index(total, num), index)  # fixed seed: the same subset every time
    assert torch.equal(subset_index(50, 80), torch.arange(50))  # more asked than there are: all of them
