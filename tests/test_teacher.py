"""The built-in teacher: its objective, augmentations, probe, cache file and encoder wrapper."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zoo.config import load_config
from zoo.teachers import build_encoders, encoder_dims
from zoo.teachers.builtin import (BuiltinTeacher, augment, default_teacher_path, ensure_teacher, linear_probe,
                                  load_teacher, train_teacher, vicreg)
from zoo.errors import CheckpointError, ConfigError

MICRO = ["preset=micro", "train.device=cpu"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, MICRO)


def reference_vicreg(z1, z2, lam=25.0, mu=25.0, nu=1.0):
    """VICReg's loss written out: lam * s(Z, Z') + mu * (v(Z) + v(Z')) / 2 + nu * (c(Z) + c(Z')), with
    s the mean squared distance, v(Z) = mean_j max(0, 1 - sqrt(Var(z_j) + 1e-4)) and
    c(Z) = sum_{i != j} Cov(Z)_ij^2 / d."""
    n, d = z1.shape

    def v(z):
        return sum(max(0.0, 1 - (z[:, j].var() + 1e-4).sqrt().item()) for j in range(d)) / d

    def c(z):
        zc = z - z.mean(0)
        return sum((sum(zc[k, i] * zc[k, j] for k in range(n)) / (n - 1)) ** 2
                   for i in range(d) for j in range(d) if i != j) / d

    s = sum(((z1[k] - z2[k]) ** 2).sum() for k in range(n)) / (n * d)
    return lam * s + mu * (v(z1) + v(z2)) / 2 + nu * (c(z1) + c(z2))


def test_vicreg_matches_a_transcription():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.allclose(vicreg(z1, z2), torch.as_tensor(reference_vicreg(z1, z2)), atol=1e-4)
    z1, z2 = 0.1 * z1, 0.3 * z2  # low variance: the hinge is active
    assert torch.allclose(vicreg(z1, z2, 2.0, 3.0, 0.5), torch.as_tensor(reference_vicreg(z1, z2, 2.0, 3.0, 0.5)),
                          atol=1e-4)
    # identical, spread out, decorrelated views: no loss; collapsed views: the variance term
    basis = torch.cat([torch.eye(4), -torch.eye(4)]) * 10
    assert vicreg(basis, basis) < 1e-3
    assert torch.isclose(vicreg(torch.ones(8, 4), torch.ones(8, 4)), torch.tensor(25 * (1 - 1e-2)), atol=1e-4)


def test_augment_keeps_shape_and_range_is_seeded_and_changes_the_image():
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    c = augment(images, torch.Generator().manual_seed(2))
    assert a.shape == images.shape and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, images, atol=0.1)


def test_linear_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    x = F.one_hot(y, 4).float() * 3 + 0.3 * torch.randn(400, 4, generator=g)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) == 1.0
    noise = torch.randn(400, 16, generator=g)
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.45  # chance: 0.25


def test_teacher_trains_saves_and_loads_as_a_frozen_encoder(cfg, tmp_path):
    path = train_teacher(cfg.data, cfg.teacher, tmp_path / "t.pt", progress=False)
    net, record = load_teacher(path)
    assert record["shape"]["width"] == cfg.teacher.width == encoder_dims("builtin", cfg)[0]
    assert 0 <= record["probe_accuracy"] <= 1 and 0 <= record["random_init_probe_accuracy"] <= 1
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for grid in (8, 16):  # its own 8x8 grid, and resized to a finer backbone grid
        encoder = build_encoders("builtin", str(path), grid=grid, cfg=cfg)[0]
        assert isinstance(encoder, BuiltinTeacher)
        tokens = encoder(images.requires_grad_())
        assert tokens.shape == (2, grid * grid, cfg.teacher.width) and tokens.grad_fn is None
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():  # (the no_grad path of nn.TransformerEncoder is a fused kernel: equal to ~1e-6)
        assert torch.allclose(build_encoders("builtin", str(path), grid=8, cfg=cfg)[0](images), net(images), atol=1e-5)


def test_the_cached_teacher_is_trained_once_per_recipe_and_data(cfg):
    path = ensure_teacher(cfg, progress=False)
    assert path == default_teacher_path(cfg.data, cfg.teacher) and path.exists()
    mtime = path.stat().st_mtime_ns
    assert ensure_teacher(cfg, progress=False) == path and path.stat().st_mtime_ns == mtime
    other = load_config(None, [*MICRO, "teacher.seed=5"])
    assert default_teacher_path(other.data, other.teacher) != path
    other_data = load_config(None, [*MICRO, "data.seed=5"])
    assert default_teacher_path(other_data.data, other_data.teacher) != path


def test_corrupt_or_mismatched_teacher_files_are_clear_errors(cfg, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt are corrupt"):
        load_teacher(bad)
    with pytest.raises(CheckpointError, match="do not exist.*zoo prepare teacher"):
        load_teacher(tmp_path / "missing.pt")
    path = train_teacher(cfg.data, cfg.teacher, tmp_path / "t.pt", progress=False)
    wide = load_config(None, [*MICRO, "teacher.width=48"])
    with pytest.raises(ConfigError, match="teacher.width=32"):
        build_encoders("builtin", str(path), grid=8, cfg=wide)


def test_prepare_teacher_command_reports_the_probe(tmp_path):
    out = subprocess.run([sys.executable, "-m", "zoo", "prepare", "teacher", "--preset", "micro", "--out",
                          str(tmp_path / "t.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "linear-probe accuracy on 100 held-out images" in out.stdout and (tmp_path / "t.pt").exists()


def test_centred_tokens_remove_the_shared_direction_without_retraining(cfg):
    """teacher.center_tokens subtracts the mean token of the training images (stored with the teacher): the centred
    tokens no longer share one direction, the teacher is the same file, and the feature cache tells them apart."""
    from zoo.data import shapes_split

    path = ensure_teacher(cfg, progress=False)
    _, record = load_teacher(path)
    assert record["token_mean"].shape == (cfg.teacher.width,) and 0 <= record["token_mean_cosine"] <= 1
    centred_cfg = load_config(None, [*MICRO, "teacher.center_tokens=true"])
    assert default_teacher_path(centred_cfg.data, centred_cfg.teacher) == path  # no retraining
    plain, centred = (build_encoders("builtin", "", grid=8, cfg=c, device="cpu")[0] for c in (cfg, centred_cfg))
    images = shapes_split(cfg.data, num_images=64).images.float() / 127.5 - 1
    with torch.no_grad():
        a, b = plain(images), centred(images)
    assert torch.allclose(b, a - record["token_mean"], atol=1e-5)
    assert plain.identity() != centred.identity() and centred.identity()["centred"] is True
    mean = a.flatten(0, 1).mean(0, keepdim=True)
    shared = F.cosine_similarity(a.flatten(0, 1), mean).mean()
    left = F.cosine_similarity(b.flatten(0, 1), mean).mean()
    assert left.abs() < 0.5 * shared.abs()


def test_constant_prediction_cosine_is_the_best_mean_cosine_one_vector_reaches():
    """The statistic equals the mean cosine of the tokens to the direction of their mean unit vector, and no other
    constant does better (checked against random directions); one shared direction gives 1, opposite pairs 0."""
    from zoo.teachers.builtin import constant_prediction_cosine

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(500, 6, generator=gen) + torch.tensor([2.0, 0, 0, 0, 0, 0])
    best = torch.nn.functional.normalize(tokens, dim=1).mean(0)
    direct = torch.nn.functional.cosine_similarity(tokens, best[None], dim=1).mean()
    assert abs(constant_prediction_cosine(tokens) - direct.item()) < 1e-6
    others = torch.randn(200, 6, generator=gen)
    cos = torch.nn.functional.cosine_similarity(tokens[:, None], others[None], dim=2).mean(0)
    assert cos.max() < direct
    assert abs(constant_prediction_cosine(torch.ones(4, 3) * torch.arange(1, 5.)[:, None]) - 1) < 1e-6
    assert constant_prediction_cosine(torch.tensor([[1.0, 0], [-1.0, 0]])) < 1e-6


def test_the_probe_on_an_image_folder_trains_and_tests_on_every_class(tmp_path, monkeypatch):
    """A folder's subset comes in folder order (sorted by class): split in halves, the probe would train on the
    first classes and be tested on the others."""
    import numpy as np
    from PIL import Image

    from zoo.teachers import builtin

    for name, colour in (("blue", (0, 0, 255)), ("green", (0, 255, 0)), ("red", (255, 0, 0))):
        (tmp_path / name).mkdir()
        for i in range(14):
            Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_config(None, MICRO + ["data.dataset=folder", f"data.root={tmp_path}", "data.num_classes=3",
                                      "data.image_size=16"]).data
    seen = {}
    monkeypatch.setattr(builtin, "linear_probe", lambda train_x, train_y, test_x, test_y: seen.update(
        train=set(train_y.tolist()), test=set(test_y.tolist())) or 1.0)
    builtin.probe_accuracy(lambda images: images.float().mean(dim=(2, 3)), data, 20)
    assert seen == {"train": {0, 1, 2}, "test": {0, 1, 2}}
