"""The cluster teacher (`builtin-cluster`): SCAN's loss, the neighbour mining, the clustering, the cache and encoder."""
import math

import pytest
import torch

from zoo.config import load_config
from zoo.errors import ConfigError
from zoo.teachers import build_encoders, encoder_dims
from zoo.teachers.builtin import token_direction_statistics
from zoo.teachers.cluster import (ClusterNet, default_cluster_path, ensure_cluster_teacher, load_cluster_teacher,
                                  nearest_neighbours, purity, scan_clusters, scan_loss)

MICRO = ["preset=micro", "train.device=cpu", "cluster_teacher.steps=20", "cluster_teacher.head_steps=30",
         "cluster_teacher.heads=2", "cluster_teacher.num_images=256", "cluster_teacher.neighbours=5"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, MICRO)


def test_scan_loss_matches_a_transcription():
    """SCAN: -1/n sum_i log <p_i, q_i> - w * H(mean_i p_i), with p, q the softmax of anchors and neighbours."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    loss, consistency = scan_loss(a, b, entropy_weight=3.0)
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in a.tolist()]
    q = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in b.tolist()]
    expected_consistency = -sum(math.log(sum(pi * qi for pi, qi in zip(p[i], q[i]))) for i in range(5)) / 5
    mean = [sum(p[i][k] for i in range(5)) / 5 for k in range(4)]
    entropy = -sum(m * math.log(m) for m in mean)
    assert consistency.item() == pytest.approx(expected_consistency, rel=1e-5)
    assert loss.item() == pytest.approx(expected_consistency - 3.0 * entropy, rel=1e-5)


def test_nearest_neighbours_are_the_most_similar_other_rows():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    nn = nearest_neighbours(x, 1, chunk=2)  # chunked as for large sets: each row's own column must be excluded
    assert nn[:, 0].tolist() == [1, 0, 3, 2, 2]  # never itself; row 4's nearest by cosine is row 2 (angle 90 deg)


def test_scan_finds_well_separated_groups_without_labels():
    """Four tight blobs in 8 dimensions: the chosen head puts each blob in one cluster (purity 1), a random assignment
    does not."""
    torch.manual_seed(0)
    centres = torch.randn(4, 8) * 5
    labels = torch.arange(400) % 4
    features = centres[labels] + 0.3 * torch.randn(400, 8)
    recipe = {"neighbours": 5, "heads": 2, "head_steps": 200, "head_batch": 128, "entropy_weight": 5.0, "seed": 0}
    clusters, _ = scan_clusters(features, recipe, clusters=4)
    assert purity(clusters, labels) == 1.0
    assert len(clusters.unique()) == 4
    assert purity(torch.randint(4, (400,)), labels) < 0.5


def test_token_statistics_of_tokens_that_share_one_direction():
    tokens = torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.3], [1.0, -0.3]])
    stats = token_direction_statistics(tokens)
    torch.testing.assert_close(stats["token_mean"], torch.tensor([1.0, 0.0]))
    assert stats["token_mean_cosine"] > 0.95            # raw: all near the mean's direction
    assert stats["centred_constant_cosine"] < 1e-6      # centred: +-0.1 and +-0.3 along y cancel


def test_purity_counts_each_clusters_majority_class():
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([3, 3, 1, 2, 2, 0])
    assert purity(clusters, labels) == pytest.approx(5 / 6)


def test_cluster_net_maps_halve_per_stage():
    net = ClusterNet(7, 8, [16, 24, 32])
    x = torch.randn(2, 3, 16, 16)
    assert net.features(x, 2).shape == (2, 24, 4, 4) and net(x).shape == (2, 7)


def test_cluster_teacher_trains_once_caches_and_gives_centred_frozen_tokens(cfg):
    path = ensure_cluster_teacher(cfg, progress=False)
    assert path == default_cluster_path(cfg) and ensure_cluster_teacher(cfg, progress=False) == path
    net, record = load_cluster_teacher(path)
    assert record["clusters"] == cfg.data.num_classes  # clusters=0 means the data's class count
    assert 0 < record["purity"] <= 1 and 0 <= record["probe_accuracy"] <= 1
    assert 0 <= record["centred_constant_cosine"] <= 1 and -1 <= record["token_mean_cosine"] <= 1
    grid = cfg.data.image_size // 4
    (encoder,) = build_encoders("builtin-cluster", grid=grid, cfg=cfg)
    assert encoder_dims("builtin-cluster", cfg) == [cfg.cluster_teacher.widths[1]] == [encoder.dim]
    images = torch.rand(3, 3, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (3, grid * grid, encoder.dim) and tokens.grad_fn is None
    raw = net.features(images, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, raw - record["token_mean"])
    assert not any(p.requires_grad for p in encoder.parameters())
    other = load_config(None, [*MICRO, "cluster_teacher.seed=3"])
    assert default_cluster_path(other) != path
    retrained_vit = load_config(None, [*MICRO, "teacher.seed=3"])
    assert default_cluster_path(retrained_vit) != path  # the clusters come from the built-in teacher's features


def test_a_weights_file_with_other_widths_is_a_clear_error(cfg):
    path = ensure_cluster_teacher(cfg, progress=False)
    wide = load_config(None, [*MICRO, "cluster_teacher.widths=[32,48,64]"])
    with pytest.raises(ConfigError, match="cluster_teacher.widths=\\[32, 64, 128\\]"):
        build_encoders("builtin-cluster", str(path), grid=4, cfg=wide)


def test_prepare_teacher_cluster_reports_purity_and_probe(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zoo", "prepare", "teacher", "--cluster", "--preset", "micro",
                          "--out", str(tmp_path / "c.pt"), *MICRO[2:]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "10 clusters; they agree with the data's classes for" in out.stdout and (tmp_path / "c.pt").exists()


def test_a_missing_weights_file_names_it_and_how_to_make_it(cfg, tmp_path):
    from zoo.errors import CheckpointError

    with pytest.raises(CheckpointError, match="c.pt.*zoo prepare teacher --cluster"):
        build_encoders("builtin-cluster", str(tmp_path / "c.pt"), grid=4, cfg=cfg)


@pytest.mark.parametrize("override, message", [("cluster_teacher.stage=4", "cluster_teacher.stage=4: it must be 1 .. 3"),
                                               ("cluster_teacher.heads=0", "cluster_teacher.heads=0: it must be > 0")])
def test_out_of_range_recipe_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*MICRO, override])


def test_on_an_image_folder_it_uses_a_subset_of_every_class_and_probes_held_out_images(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("blue", (0, 0, 255)), ("green", (0, 255, 0)), ("red", (255, 0, 0))):
        (tmp_path / name).mkdir()
        for i in range(20):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    cfg = load_config(None, [*MICRO, "data.dataset=folder", f"data.root={tmp_path}", "data.num_classes=3",
                             "data.image_size=16", "cluster_teacher.num_images=45", "cluster_teacher.batch_size=16",
                             "teacher.batch_size=16", "teacher.probe_images=10"])
    _, record = load_cluster_teacher(ensure_cluster_teacher(cfg, progress=False))
    assert record["clusters"] == 3 and 0 <= record["probe_accuracy"] <= 1  # the folder's probe, not NaN
    assert record["purity"] > 0.5  # three solid colours: the clusters follow them on the 45-image subset
