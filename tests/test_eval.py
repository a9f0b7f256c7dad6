"""Evaluation: the metrics behave as metrics must, the judge plugs into torch-fidelity, errors are clear."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from zoo.config import load_config
from zoo.data import shapes_split
from zoo.errors import CheckpointError, DataError, MissingWeightsError
from zoo.eval.evaluate import EvalSettings, Evaluator, load_samples, to_uint8_nchw
from zoo.eval.extractors import build_extractor
from zoo.eval.metrics import feature_metrics

MICRO = ["preset=micro", "train.device=cpu"]


@pytest.fixture(scope="module")
def data_cfg():
    return load_config("sit", MICRO).data


@pytest.fixture(scope="module")
def judge(tiny_judge):
    return build_extractor("judge", tiny_judge)


@pytest.fixture(scope="module")
def reference(data_cfg, judge):
    return judge.extract(shapes_split(data_cfg, reference=True, num_images=300).images)["features"]


@pytest.fixture(scope="module")
def real(data_cfg):
    return shapes_split(data_cfg, num_images=300).images  # the training split: other images, same distribution


def noisy(images, sigma, seed=0):
    x = images.float() / 127.5 - 1
    return to_uint8_nchw(x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))


def test_judge_features_are_unit_vectors_and_logits_cover_the_classes(judge, real):
    out = judge.extract(real[:20])
    assert torch.allclose(out["features"].norm(dim=1), torch.ones(20), atol=1e-5)
    assert out["logits"].shape == (20, 10)


def test_a_set_against_itself_scores_perfectly(reference):
    m = feature_metrics(reference, reference)
    assert abs(m["fid"]) < 1e-6
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_two_real_sets_score_close_to_perfect(judge, real, reference):
    m = feature_metrics(judge.extract(real)["features"], reference)
    assert 0 <= m["fid"] < 0.05
    assert m["precision"] > 0.8 and m["recall"] > 0.8


def test_fid_grows_monotonically_with_noise(judge, real, reference):
    fids = [feature_metrics(judge.extract(noisy(real, s))["features"], reference)["fid"]
            for s in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_precision_and_recall_drop_for_a_shifted_set(reference):
    # shift every feature by twice the typical 3-nearest-neighbour radius along one direction
    radius = torch.cdist(reference, reference).kthvalue(4, dim=1).values.median()
    direction = torch.nn.functional.normalize(torch.randn(reference.shape[1], generator=torch.Generator().manual_seed(1)), dim=0)
    m = feature_metrics(reference + 2 * radius * direction, reference)
    assert m["precision"] < 0.5 and m["recall"] < 0.5
    assert m["fid"] > 0.9 * (2 * radius) ** 2  # FID >= |mean shift|^2 for a pure shift


def test_heavy_noise_loses_recall(judge, real, reference):
    clean = feature_metrics(judge.extract(real)["features"], reference)
    m = feature_metrics(judge.extract(noisy(real, 0.8))["features"], reference)
    assert m["recall"] < clean["recall"] - 0.5


def test_fid_equals_torch_fidelity_with_the_registered_judge(tiny_judge, judge, real, data_cfg):
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    ref_images = shapes_split(data_cfg, reference=True, num_images=300).images
    theirs = torch_fidelity.calculate_metrics(input1=Images(real), input2=Images(ref_images), fid=True, cuda=False,
                                              feature_extractor="zoo-judge", cache=False, verbose=False,
                                              feature_extractor_weights_path=str(tiny_judge), save_cpu_ram=True)
    ours = feature_metrics(judge.extract(real)["features"], judge.extract(ref_images)["features"])
    assert theirs["frechet_inception_distance"] == pytest.approx(ours["fid"], rel=1e-3, abs=1e-6)


def test_missing_weights_name_the_file_and_the_fetch_command(tmp_path):
    for name, fetched in (("inception", "weights-inception-2015-12-05-6726825d.pth"),
                          ("dinov2", "dinov2_vitb14_pretrain.pth")):
        missing = tmp_path / f"{name}.pth"
        with pytest.raises(MissingWeightsError) as err:
            build_extractor(name, missing)
        assert str(missing) in str(err.value) and fetched in str(err.value) and "curl" in str(err.value)
    with pytest.raises(MissingWeightsError, match="zoo prepare judge"):
        build_extractor("judge", tmp_path / "judge.pt")


def test_corrupt_judge_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "judge.pt"
    bad.write_bytes(b"not a judge")
    with pytest.raises(CheckpointError, match="corrupt"):
        build_extractor("judge", bad)


def test_empty_or_missing_samples_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="has no images"):
        load_samples(tmp_path)
    with pytest.raises(DataError, match="do not exist"):
        load_samples(tmp_path / "nope")
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="no samples"):
        load_samples(tmp_path / "empty.npz")


def test_a_folder_of_pngs_loads_as_uint8_images(tmp_path, real):
    from PIL import Image

    for i in range(3):
        Image.fromarray(real[i].permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    images, labels = load_samples(tmp_path)
    assert images.dtype == torch.uint8 and torch.equal(images, real[:3]) and labels is None


def test_reference_features_are_computed_once(tiny_judge, data_cfg, zoo_cache, monkeypatch):
    evaluator = Evaluator(EvalSettings(weights=str(tiny_judge), reference_num=50), device="cpu", progress=False)
    first = evaluator.reference(data_cfg)
    assert len(first["features"]) == 50 and (zoo_cache / "reference").exists()
    again = Evaluator(EvalSettings(weights=str(tiny_judge), reference_num=50), device="cpu", progress=False)
    monkeypatch.setattr(type(again.extractor(data_cfg)), "extract", lambda *a, **k: pytest.fail("recomputed"))
    assert torch.equal(again.reference(data_cfg)["features"], first["features"])


def zoo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zoo", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_eval_and_export_npz_end_to_end(tmp_path, tiny_judge, zoo_cache):
    from zoo.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(load_config("sit", [*MICRO, "train.steps=2", "sample.num=0"]), run_dir=run, progress=False).fit()
    out = zoo("eval", "--ckpt", str(run), "--num-samples", "20", "--steps", "2", "--weights", str(tiny_judge),
              "--reference-num", "40")
    assert out.returncode == 0, out.stderr
    assert "FID" in out.stdout and "class accuracy" in out.stdout
    [saved] = (run / "eval").glob("step_0000002-judge-*.json")
    record = json.loads(saved.read_text())
    assert (record["num_samples"], record["sampler"], record["solver"], record["steps"]) == (20, "ode", "euler", 2)
    assert record["cfg_scale"] == 1.0 and record["seed"] == 0 and record["extractor"] == "judge"
    assert set(record["metrics"]) == {"fid", "kid_mean", "kid_std", "precision", "recall", "class_accuracy"}
    assert (run / "eval" / f"{saved.stem}-grid.png").exists()

    npz = tmp_path / "samples.npz"
    out = zoo("export-npz", "--ckpt", str(run), "--num", "12", "--steps", "2", "--batch-size", "5", "--out", str(npz))
    assert out.returncode == 0, out.stderr
    with np.load(npz) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (12, 32, 32, 3)
        assert data["arr_1"].tolist() == [i % 10 for i in range(12)]
    out = zoo("eval", "--samples", str(npz), "--weights", str(tiny_judge), "--reference-num", "40", *MICRO[:1])
    assert out.returncode == 0, out.stderr
    assert "class accuracy" in out.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    out = zoo("eval", "--samples", str(empty), "--weights", str(tiny_judge))
    assert out.returncode == 2 and "has no images" in out.stderr
    out = zoo("eval", "--ckpt", str(run), "--extractor", "inception", "--weights", str(tmp_path / "inception.pth"))
    assert out.returncode == 2 and "inception.pth" in out.stderr and "curl" in out.stderr


def test_prepare_lists_the_judge():
    out = zoo("prepare", "--help")
    assert out.returncode == 0 and "judge" in out.stdout


def test_the_final_grid_is_scored_by_the_judge_when_asked(tmp_path, tiny_judge, monkeypatch):
    """sample.judge=true: the run's last grid gets the judge's class accuracy, the same number as scoring those
    samples again; real images with their labels score as the judge's own held-out accuracy does, shuffled ones low."""
    import zoo.eval.judge as judge
    from zoo.eval.reference import reference_images
    from zoo.training.generate import class_grid_labels, generate_from_config
    from zoo.eval.judge import judge_accuracy
    from zoo.training.trainer import Trainer

    monkeypatch.setattr(judge, "ensure_judge", lambda data_cfg: tiny_judge)
    cfg = load_config("sit", [*MICRO, "train.steps=2", "sample.num=20", "sample.judge=true"])
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False)
    trainer.fit()
    labels = class_grid_labels(20, 10)
    again = generate_from_config(trainer.method, trainer.ema.module, labels, cfg.sample, device="cpu")
    assert trainer.grid_accuracy == judge_accuracy(cfg.data, again, labels)
    images, real = reference_images(cfg.data, 200)
    pixels = images.float() / 127.5 - 1
    own = judge.load_judge(tiny_judge)[1]["reference_accuracy"]
    assert judge_accuracy(cfg.data, pixels, real) == pytest.approx(own, abs=0.05) and own > 0.25  # chance 0.10
    assert judge_accuracy(cfg.data, pixels, (real + 1) % 10) < 0.2
    assert Trainer(load_config("sit", [*MICRO, "train.steps=1", "sample.num=10"]), progress=False).grid_accuracy is None
