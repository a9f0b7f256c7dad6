"""PCA of a frozen encoder's standardised patch tokens, fitted once per (encoder, training set) and cached.

Methods that diffuse encoder features next to the image (ReDi) cannot afford the encoder's full width
(768 for DINOv2-B): they keep the first `r` principal components of the tokens, each dimension first
standardised over the training set (ReDi's `calc_pca.py`: `(z - mean) / std`, then a full-rank PCA
without whitening):

    z_std = (z - mu) / s,   r-channel features = z_std @ U[:r].T

where `mu`, `s` are the per-dimension mean and standard deviation of the tokens and the rows of `U`
are the eigenvectors of their correlation matrix, by decreasing eigenvalue. The fit streams the
tokens once, accumulating sums and the D x D second moment in float64, so any number of tokens fits
in memory; a dimension with zero variance keeps s = 1 (as sklearn's StandardScaler does).

A fitted PCA is tied to what produced its tokens: it stores the encoder's identity (name, weights,
resolution, token grid) and the training set's, and `load_pca` refuses a file fitted on another
encoder or other data. Files live in the cache (`REPA_ZOO_CACHE`/pca), keyed like the feature cache
(zoo/teachers/feature_cache.py) by a fingerprint of both identities.

A method that uses one exposes `fit_feature_pca(device, refit=False) -> (FeaturePCA, rank)`, which
`zoo prepare pca --method NAME` calls (zoo/cli/commands/pca.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

from zoo.cache import cache_dir, fingerprint
from zoo.training.checkpoint import atomic_save, load_artifact
from zoo.errors import ConfigError

PCA_FORMAT = "repa-zoo-pca/1"


@dataclass
class FeaturePCA:
    mean: Tensor           # [D] per-dimension mean of the tokens
    std: Tensor            # [D] per-dimension standard deviation (1 where a dimension is constant)
    components: Tensor     # [D, D] rows: principal directions of the standardised tokens, by decreasing variance
    variances: Tensor      # [D] the variance of the standardised tokens along each component (eigenvalues)
    identity: dict         # {"encoder": ..., "data": ...}: what the tokens came from
    num_tokens: int = 0
    num_images: int = 0
    path: str = ""         # the file it was loaded from

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def check_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.dim:
            raise ConfigError(f"{rank} PCA components requested, but the encoder's tokens have {self.dim} dimensions; "
                              f"choose 1..{self.dim}")

    def kept_variance(self, rank: int) -> float:
        """Fraction of the standardised tokens' total variance that the first `rank` components keep."""
        self.check_rank(rank)
        return float(self.variances[:rank].sum() / self.variances.sum())

    def project(self, tokens: Tensor, rank: int, whiten: bool = False) -> Tensor:
        """[..., D] tokens -> [..., rank]: standardise, then the first `rank` principal coordinates (each of unit
        variance with `whiten`, as sklearn's PCA(whiten=True); ReDi's default leaves them unscaled)."""
        self.check_rank(rank)
        if tokens.shape[-1] != self.dim:
            raise ConfigError(f"tokens of width {tokens.shape[-1]} given to a PCA fitted on width {self.dim}")
        mean, std, comps = (a.to(tokens.device, torch.float32) for a in (self.mean, self.std, self.components[:rank]))
        coords = ((tokens.float() - mean) / std) @ comps.T
        return coords / self._scale(rank, coords.device) if whiten else coords

    def reconstruct(self, coords: Tensor, whiten: bool = False) -> Tensor:
        """[..., rank] principal coordinates -> [..., D] tokens (exact when the tokens lie in that subspace)."""
        rank = coords.shape[-1]
        mean, std, comps = (a.to(coords.device, torch.float32) for a in (self.mean, self.std, self.components[:rank]))
        coords = coords.float() * self._scale(rank, coords.device) if whiten else coords.float()
        return (coords @ comps) * std + mean

    def _scale(self, rank: int, device) -> Tensor:
        return self.variances[:rank].to(device, torch.float32).clamp_min(1e-12).sqrt()

    def to_state(self) -> dict:
        return {"format": PCA_FORMAT, "identity": self.identity, "mean": self.mean, "std": self.std,
                "components": self.components, "variances": self.variances, "num_tokens": self.num_tokens,
                "num_images": self.num_images}


def fit_pca(batches: Iterable[Tensor], identity: Optional[dict] = None, num_images: int = 0) -> FeaturePCA:
    """Standardise-then-PCA of every token in `batches` ([..., D] tensors), in one streaming pass."""
    n, total, second = 0, None, None
    for tokens in batches:
        flat = tokens.reshape(-1, tokens.shape[-1]).double().cpu()
        if total is None:
            total, second = torch.zeros(flat.shape[1], dtype=torch.float64), torch.zeros(flat.shape[1], flat.shape[1],
                                                                                        dtype=torch.float64)
        n += flat.shape[0]
        total += flat.sum(0)
        second += flat.T @ flat
    if n < 2:
        raise ConfigError(f"a PCA needs at least 2 tokens, got {n}")
    mean = total / n
    cov = second / n - torch.outer(mean, mean)       # population covariance, as numpy's std (ddof=0)
    std = cov.diagonal().clamp_min(0).sqrt()
    std = torch.where(std > 1e-6 * std.max(), std, torch.ones_like(std))  # rounding leaves constant dims ~1e-9
    corr = cov / torch.outer(std, std)               # the covariance of the standardised tokens
    variances, vectors = torch.linalg.eigh(corr)     # ascending
    variances, components = variances.flip(0).clamp_min(0), vectors.flip(1).T.contiguous()
    # eigenvectors have no sign: fix it (largest-magnitude entry positive, like sklearn's svd_flip)
    # so that two fits of the same tokens give the same features on any machine
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs
    return FeaturePCA(mean.float(), std.float(), components.float(), variances.float(), identity or {}, n, num_images)


def pca_identity(encoder_identity: dict, data_identity: dict) -> dict:
    return {"encoder": encoder_identity, "data": data_identity}


def pca_cache_path(identity: dict, num_images: int) -> Path:
    key = fingerprint({**identity, "images": num_images, "format": PCA_FORMAT})
    name = str(identity.get("encoder", {}).get("name", "encoder")).replace(":", "_").replace("/", "_")
    return cache_dir("pca") / f"{name}-{key}.pt"


def save_pca(pca: FeaturePCA, path) -> Path:
    atomic_save(pca.to_state(), Path(path))
    return Path(path)


def load_pca(path, expected: Optional[dict] = None, make: str = "zoo prepare pca --method METHOD") -> FeaturePCA:
    """A saved PCA; with `expected` (a `pca_identity`), refused unless it was fitted on that encoder and data."""
    state = load_artifact(path, PCA_FORMAT, "feature PCA statistics", make)
    if expected is not None:
        for part, what in (("encoder", "encoder"), ("data", "training data")):
            if state["identity"].get(part) != expected.get(part):
                raise ConfigError(f"the feature PCA in {path} was fitted on another {what} "
                                  f"({state['identity'].get(part)}) than this run's ({expected.get(part)}); "
                                  f"fit one for this run with `{make}` or leave the PCA path empty to use the cache")
    return FeaturePCA(state["mean"], state["std"], state["components"], state["variances"], state["identity"],
                      state["num_tokens"], state["num_images"], str(path))


def load_or_fit(identity: dict, num_images: int, batches, refit: bool = False, progress: bool = True) -> tuple:
    """(the cached PCA for `identity`, its path), fitted from `batches()` (a callable giving the token batches of
    `num_images` images) and saved first if it is not cached yet or `refit`."""
    path = pca_cache_path(identity, num_images)
    if refit or not path.exists():
        if progress:
            print(f"fitting the feature PCA on the {identity['encoder'].get('name')} tokens of {num_images} training "
                  f"images once; cached at {path}", file=sys.stderr)
        save_pca(fit_pca(batches(), identity, num_images), path)
    return load_pca(path, identity), path
