"""The papers' evaluation: FID, sFID, Inception Score, precision and recall as ADM's evaluator computes them.

Every paper of the family reports ImageNet numbers from ADM's suite (guided-diffusion's
`evaluations/evaluator.py`) against a reference batch such as `VIRTUAL_imagenet256_labeled.npz`.
This module computes the same five numbers in torch, on torch-fidelity's port of the same
Inception network (`inception-v3-compat`: the 2015 TensorFlow graph's weights, with TF1's bilinear
resize to 299 px reimplemented):

- features: pool3 (2048, for FID, precision and recall), the first 7 channels of the 17x17 map
  `mixed_6/conv` (torch-fidelity's `Mixed_6d.branch1x1` after its ReLU; flattened in TensorFlow's
  height-width-channel order, 2023 values, for sFID), and the 1008 logits without the bias (for IS);
- reference statistics: the npz's `mu`, `sigma`, `mu_s`, `sigma_s` when present (as ADM reads them),
  else computed from its `arr_0`; precision and recall always use features of `arr_0`;
- FID and sFID: the Frechet distance of the (mean, covariance with N - 1) pairs, scipy's sqrtm;
- IS: exp(mean KL(p(y|x) || p(y))) per split of 5000 samples, averaged over the splits;
- precision / recall: k-NN manifolds with k = 3 on squared Euclidean distances (Kynkaanniemi et
  al.); as ADM's TensorFlow code, the features are rounded to float16 and the distances kept as
  float16 (ADM falls back to float32 only when a float16 distance overflows; so does this code).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zoo.errors import DataError

POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 7 * 17 * 17, 1008
IS_SPLIT = 5000
PR_NEIGHBOURS = 3
PR_BLOCK = 10_000


# ---------------------------------------------------------------- features
class AdmInception:
    """uint8 images -> {"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]} with ADM's layers."""

    def __init__(self, weights, device="cpu"):
        from torch_fidelity.utils import create_feature_extractor

        self.weights, self.device = Path(weights), torch.device(device)
        self.module = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"],
                                               cuda=self.device.type == "cuda",
                                               feature_extractor_weights_path=str(weights), verbose=False)
        self.module.to(self.device).eval()
        self._spatial = None
        self.module.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # TensorFlow's layout is NHWC: ADM takes [..., :7] of it and flattens (h, w, c)
        self._spatial = output[:, :7].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 100) -> dict:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"the Inception features take uint8 images N x 3 x H x W, got {images.dtype} "
                            f"{tuple(images.shape)}")
        out = {"pool": [], "spatial": [], "logits": []}
        for chunk in images.split(batch_size):
            pool, logits = self.module(chunk.to(self.device))
            out["pool"].append(pool.float().cpu())
            out["spatial"].append(self._spatial.cpu())
            out["logits"].append(logits.float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------- the reference batch
def read_reference(path) -> dict:
    """{"images": uint8 [N, 3, H, W], and "mu", "sigma", "mu_s", "sigma_s" when the npz has them}, checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference batch {path} does not exist; ADM's ImageNet 256 batch is "
                        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                        "VIRTUAL_imagenet256_labeled.npz (download it on a machine with internet)")
    try:
        data = np.load(path)
        keys = set(data.keys())
    except Exception as exc:
        raise DataError(f"reference batch {path} is not an .npz file ({type(exc).__name__})") from None
    if "arr_0" not in keys:
        raise DataError(f"reference batch {path} has no arr_0 (ADM's layout: arr_0 uint8 N x H x W x 3, optionally "
                        f"mu, sigma, mu_s, sigma_s); it holds {', '.join(sorted(keys)) or 'nothing'}")
    arr = data["arr_0"]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) < PR_NEIGHBOURS + 1:
        raise DataError(f"reference batch {path}: arr_0 must be uint8 N x H x W x 3 with N > {PR_NEIGHBOURS}, "
                        f"got {arr.dtype} {arr.shape}")
    out = {"images": torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()}
    stats = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
             "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    present = [k for k in stats if k in keys]
    if present and len(present) != len(stats):
        raise DataError(f"reference batch {path} has {', '.join(present)} but not all of mu, sigma, mu_s, sigma_s")
    for key, shape in stats.items():
        if key in keys:
            if data[key].shape != shape:
                raise DataError(f"reference batch {path}: {key} has shape {data[key].shape}, expected {shape}")
            out[key] = data[key].astype(np.float64)
    return out


# ---------------------------------------------------------------- metrics
def statistics(features: torch.Tensor) -> tuple:
    x = features.double().numpy()
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); a singular product is retried with eps on the diagonal."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DataError(f"the Frechet distance has an imaginary part {np.max(np.abs(covmean.imag)):.3g}: the "
                            "feature sets are too small or degenerate")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT) -> float:
    scores = []
    for part in logits.double().softmax(dim=1).split(split_size):
        kl = (part * (part.log() - part.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ADM's distances: float16 inputs, ||a||^2 - 2 a.b + ||b||^2 clamped at 0, kept as float16 where finite."""
    def block(x, y):
        d = (x.pow(2).sum(1, keepdim=True) - 2 * x @ y.t() + y.pow(2).sum(1)[None]).clamp_min(0)
        return d

    half = block(a.half().float(), b.half().float()).half()
    return half.float() if torch.isfinite(half).all() else block(a.float(), b.float())


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS) -> torch.Tensor:
    """Each point's squared distance to its k-th nearest neighbour (itself, at distance 0, is the 0-th)."""
    radii = []
    for rows in features.split(PR_BLOCK):
        d = torch.cat([_squared_distances(rows, cols) for cols in features.split(PR_BLOCK)], dim=1)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = PR_NEIGHBOURS) -> tuple:
    """(the fraction of samples inside the reference's manifold, the fraction of reference points inside the samples')."""
    r_ref, r_smp = manifold_radii(reference, k), manifold_radii(samples, k)
    ref_in = torch.zeros(len(reference), dtype=torch.bool)
    smp_in = torch.zeros(len(samples), dtype=torch.bool)
    for i, rows in enumerate(reference.split(PR_BLOCK)):
        ri = slice(i * PR_BLOCK, i * PR_BLOCK + len(rows))
        for j, cols in enumerate(samples.split(PR_BLOCK)):
            sj = slice(j * PR_BLOCK, j * PR_BLOCK + len(cols))
            d = _squared_distances(rows, cols)
            ref_in[ri] |= (d <= r_smp[sj][None]).any(1)
            smp_in[sj] |= (d <= r_ref[ri][:, None]).any(0)
    return float(smp_in.double().mean()), float(ref_in.double().mean())


def adm_metrics(samples: dict, reference: dict, reference_features: dict) -> dict:
    """The five numbers of ADM's evaluator from sample features, the reference batch and its features."""
    if len(samples["pool"]) <= PR_NEIGHBOURS:
        raise DataError(f"ADM's metrics need more than {PR_NEIGHBOURS} samples, got {len(samples['pool'])}")
    if "mu" in reference:
        ref_pool, ref_spatial = (reference["mu"], reference["sigma"]), (reference["mu_s"], reference["sigma_s"])
    else:
        ref_pool, ref_spatial = statistics(reference_features["pool"]), statistics(reference_features["spatial"])
    precision, recall = precision_recall(reference_features["pool"], samples["pool"])
    return {"fid": frechet_distance(*statistics(samples["pool"]), *ref_pool),
            "sfid": frechet_distance(*statistics(samples["spatial"]), *ref_spatial),
            "inception_score": inception_score(samples["logits"]),
            "precision": precision, "recall": recall}
