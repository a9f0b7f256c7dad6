"""The papers' evaluation (`zoo eval --ref`): ADM's five numbers against a transcription of its evaluator, on
an Inception network of torch-fidelity's class with random weights (the real file cannot be downloaded here),
bad reference batches in one line, and sampling shared by two gloo processes giving one process's numbers."""
import json
import os
import socket
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg

from zoo.errors import DataError
from zoo.eval import adm

MICRO = ["preset=micro", "train.device=cpu"]


# ---------------------------------------------------------------- a transcription of ADM's evaluator (numpy)
def adm_fid(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1.dot(s2)).real
    return (mu1 - mu2).dot(mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def adm_is(logits, split=5000):
    z = logits - logits.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split):
        part = preds[i:i + split]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_distances(u, v):
    u, v = u.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    d = np.maximum((u ** 2).sum(1)[:, None] - 2 * u @ v.T + (v ** 2).sum(1)[None], 0.0)
    return d.astype(np.float16).astype(np.float32)


def adm_pr(ref, smp, k=3):
    r1 = np.partition(adm_distances(ref, ref), k, axis=1)[:, k]
    r2 = np.partition(adm_distances(smp, smp), k, axis=1)[:, k]
    d = adm_distances(ref, smp)
    precision = np.mean(np.any(d <= r1[:, None], axis=0))
    recall = np.mean(np.any(d <= r2[None, :], axis=1))
    return precision, recall


def test_the_five_numbers_equal_a_transcription_of_adms_evaluator():
    g = torch.Generator().manual_seed(0)  # small widths (the formulas do not depend on them): sqrtm stays fast
    ref_feats = {"pool": torch.randn(50, 64, generator=g).relu(), "spatial": torch.randn(50, 48, generator=g)}
    near = ref_feats["pool"][:30] + 0.05 * torch.randn(30, 64, generator=g)  # 30 samples close to real points
    feats = {"pool": torch.cat([near, torch.randn(30, 64, generator=g).relu() + 2]),
             "spatial": torch.randn(60, 48, generator=g), "logits": torch.randn(60, 1008, generator=g) * 3}
    ref = {"images": None}
    out = adm.adm_metrics(feats, ref, ref_feats)
    x, r = feats["pool"].double().numpy(), ref_feats["pool"].double().numpy()
    fid = adm_fid(x.mean(0), np.cov(x, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    xs, rs = feats["spatial"].double().numpy(), ref_feats["spatial"].double().numpy()
    sfid = adm_fid(xs.mean(0), np.cov(xs, rowvar=False), rs.mean(0), np.cov(rs, rowvar=False))
    precision, recall = adm_pr(ref_feats["pool"].numpy(), feats["pool"].numpy())
    assert out["fid"] == pytest.approx(fid, rel=1e-6) and out["sfid"] == pytest.approx(sfid, rel=1e-6)
    assert out["inception_score"] == pytest.approx(adm_is(feats["logits"].double().numpy()), rel=1e-9)
    assert (out["precision"], out["recall"]) == (precision, recall)
    assert 0.4 < out["precision"] < 0.6 and 0 < out["recall"] < 1  # half the samples are near real points

    # the npz's own statistics replace those of arr_0's features when present, as ADM reads them
    with_stats = {"mu": r.mean(0) + 1.0, "sigma": np.cov(r, rowvar=False), "mu_s": rs.mean(0),
                  "sigma_s": np.cov(rs, rowvar=False)}
    shifted = adm.adm_metrics(feats, with_stats, ref_feats)
    assert shifted["fid"] == pytest.approx(adm_fid(x.mean(0), np.cov(x, rowvar=False), r.mean(0) + 1.0,
                                                   np.cov(r, rowvar=False)), rel=1e-6)


def test_the_manifold_radius_is_the_third_other_neighbour():
    points = torch.tensor([[0.0], [1.0], [2.0], [4.0], [8.0]])
    # squared distances from 0: 1, 4, 16, 64 -> the 3rd neighbour other than itself is at 16
    assert adm.manifold_radii(points)[0] == 16
    assert adm.precision_recall(points, points) == (1.0, 1.0)
    far = points + 100
    assert adm.precision_recall(points, far) == (0.0, 0.0)
    # IS of identical one-hot predictions is 1, of N equally used confident classes N
    assert adm.inception_score(torch.zeros(10, 1008)) == pytest.approx(1.0)
    assert adm.inception_score(torch.eye(4) * 100) == pytest.approx(4.0, rel=1e-6)


# ---------------------------------------------------------------- the Inception network and the command
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, saved in its weights-file format."""
    from torch_fidelity import feature_extractor_inceptionv3 as fi

    torch.manual_seed(0)
    with mock.patch.object(fi.torch, "load", return_value={}), \
            mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def images(n, seed, size=32):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, 1, 1, 3))
    return (base + rng.integers(0, 56, size=(n, size, size, 3))).astype(np.uint8)


def test_the_features_are_adms_layers(inception_file):
    from zoo.eval.extractors import build_extractor

    net = adm.AdmInception(inception_file)
    x = torch.from_numpy(images(4, 0)).permute(0, 3, 1, 2).contiguous()
    out = net.extract(x)
    assert out["pool"].shape == (4, 2048) and out["spatial"].shape == (4, 2023) and out["logits"].shape == (4, 1008)
    plain = build_extractor("inception", inception_file).extract(x)["features"]
    assert torch.allclose(out["pool"], plain, atol=1e-6)  # pool3: the standard FID features
    maps = {}
    net.module.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: maps.setdefault("map", o))
    net.extract(x)
    assert maps["map"].shape[1:] == (192, 17, 17)
    assert torch.equal(out["spatial"][:, :7], maps["map"][:, :7, 0, 0])  # (h, w, c) order: channels fastest
    assert torch.equal(out["spatial"][:, 7:14], maps["map"][:, :7, 0, 1])


def zoo(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=600, **kwargs)


def test_zoo_eval_ref_prints_the_five_numbers_and_bad_references_get_one_line(inception_file, tmp_path, zoo_cache):
    ref, samples = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref, arr_0=images(12, 1))
    np.savez(samples, arr_0=images(10, 2), arr_1=np.arange(10) % 4)
    env = {**os.environ, "REPA_ZOO_CACHE": str(zoo_cache)}
    out = zoo("eval", "--samples", str(samples), "--ref", str(ref), "--weights", str(inception_file),
              "--out-dir", str(tmp_path / "eval"), "--batch-size", "5", env=env)
    assert out.returncode == 0, out.stderr
    assert "sFID" in out.stdout and "Inception Score" in out.stdout and "ADM's evaluation" in out.stdout
    record = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    net = adm.AdmInception(inception_file)
    as_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    smp = {k: torch.cat([net.extract(c)[k] for c in as_nchw(images(10, 2)).split(5)]) for k in ("pool", "spatial", "logits")}
    expected = adm.adm_metrics(smp, adm.read_reference(ref), net.extract(as_nchw(images(12, 1))))
    for key, value in expected.items():
        assert record["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    bad = {"missing": tmp_path / "nope.npz", "float": tmp_path / "float.npz", "keys": tmp_path / "keys.npz",
           "partial": tmp_path / "partial.npz", "text": tmp_path / "text.npz"}
    np.savez(bad["float"], arr_0=images(12, 1).astype(np.float32))
    np.savez(bad["keys"], images=images(12, 1))
    np.savez(bad["partial"], arr_0=images(12, 1), mu=np.zeros(2048))
    bad["text"].write_text("not a zip")
    expect = {"missing": "does not exist; ADM's ImageNet 256 batch is", "float": "arr_0 must be uint8",
              "keys": "has no arr_0", "partial": "not all of mu, sigma, mu_s, sigma_s", "text": "is not an .npz file"}
    for name, path in bad.items():
        out = zoo("eval", "--samples", str(samples), "--ref", str(path), "--weights", str(inception_file), env=env)
        assert out.returncode != 0 and "Traceback" not in out.stderr, (name, out.stderr)
        assert expect[name] in out.stderr and len(out.stderr.strip().splitlines()) == 1, (name, out.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_one_process_numbers_and_npz(tmp_path, tiny_judge, zoo_cache):
    from zoo.config import load_config
    from zoo.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(load_config("sit", [*MICRO, "train.steps=2", "sample.num=0"]), run_dir=run, progress=False).fit()
    env = {**os.environ, "REPA_ZOO_CACHE": str(zoo_cache), "OMP_NUM_THREADS": "1"}
    common = ["--ckpt", str(run), "--num-samples", "30", "--batch-size", "4", "--steps", "2",
              "--weights", str(tiny_judge), "--reference-num", "40", "--threads", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "zoo"]
    one = zoo("eval", *common, "--out-dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*torchrun, "eval", *common, "--out-dir", str(tmp_path / "two")], capture_output=True,
                         text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr
    r1, r2 = (json.loads(next((tmp_path / d).glob("*.json")).read_text()) for d in ("one", "two"))
    assert r1["metrics"] == r2["metrics"]  # the same samples, features of the same batches: the same numbers
    assert two.stdout.count("FID") == 1  # one process reports

    npz = ["export-npz", "--ckpt", str(run), "--num-samples", "10", "--batch-size", "3", "--steps", "2"]
    assert zoo(*npz, "--out", str(tmp_path / "one.npz"), env=env).returncode == 0
    out = subprocess.run([*torchrun, *npz, "--out", str(tmp_path / "two.npz")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["arr_0"].shape == (10, 32, 32, 3) and np.array_equal(a["arr_0"], b["arr_0"])
    assert np.array_equal(a["arr_1"], b["arr_1"])


def test_a_reference_batch_is_checked_before_use(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images(12, 0), mu=np.zeros(2048), sigma=np.zeros((2048, 2048)), mu_s=np.zeros(2023),
             sigma_s=np.zeros((2023, 5)))
    with pytest.raises(DataError, match="sigma_s has shape"):
        adm.read_reference(path)
