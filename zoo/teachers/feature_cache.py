"""Teacher tokens precomputed once per (image, flip), so an aligning step does not run the teacher (and, laid
out the same way, a frozen VAE's posterior moments: zoo/latents/vae.py `latent_moments_cache`).

Batches carry `index` and `flip` (zoo/data), and the only augmentation is the horizontal flip, so
every input a teacher will ever see during training is one of 2 x len(dataset) images. The cache
holds their tokens, [N, 2, grid*grid, D] in float16 (half the disk and memory; the cosine loss on
cached tokens differs from the on-the-fly loss by about 1e-4), memory-mapped so that only the rows a
batch reads are paged in. It is keyed by a fingerprint of the encoder's identity (name, weights,
resolution, grid) and of the dataset, written atomically, and rebuilt only when the key changes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from zoo.cache import cache_dir, fingerprint
from zoo.training.checkpoint import atomic_write
from zoo.data import InMemoryImages, data_identity, gather
from zoo.errors import DataError


def dataset_identity(data_cfg, dataset) -> dict:
    return {**data_identity(data_cfg), "num_images": len(dataset)}


class FeatureCache:
    """Read side: `lookup(index, flip)` -> float32 tokens [B, grid*grid, D]."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.tokens = np.load(self.path, mmap_mode="r")
        except Exception as exc:
            raise DataError(f"feature cache {self.path} is corrupt ({type(exc).__name__}); delete it and it is "
                            "rebuilt on the next run") from None
        if self.tokens.ndim != 4 or self.tokens.shape[1] != 2:
            raise DataError(f"feature cache {self.path} has shape {self.tokens.shape}, expected [N, 2, tokens, dim]; "
                            "delete it and it is rebuilt on the next run")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def lookup(self, index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        rows = self.tokens[index.cpu().numpy(), flip.long().cpu().numpy()]
        return torch.from_numpy(np.ascontiguousarray(rows)).float()


def cache_path(encoder, data_cfg, dataset) -> Path:
    key = fingerprint({"encoder": encoder.identity(), "data": dataset_identity(data_cfg, dataset), "format": 1})
    return cache_dir("features") / f"{encoder.name.replace(':', '_')}-{key}.npy"


@torch.no_grad()
def compute_tokens(encoder, dataset, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Tokens of every image of `dataset`, unflipped and flipped: float16 [N, 2, tokens, D]."""
    from tqdm import tqdm

    device = next(encoder.parameters()).device
    n = len(dataset)
    out = None
    bar = tqdm(total=n, desc=f"caching {encoder.name} features", unit="img", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        for flip in (0, 1):
            images = gather(dataset, index, torch.full((len(index),), bool(flip)))["image"]
            tokens = encoder(images.to(device)).float().cpu().numpy()
            if out is None:
                out = np.empty((n, 2, *tokens.shape[1:]), dtype=np.float16)
            out[start:start + len(index), flip] = tokens
        bar.update(len(index))
    bar.close()
    return out


def load_or_build(encoder, data_cfg, dataset, progress: bool = True) -> FeatureCache:
    """The cached tokens of `encoder` on `dataset`, computed and written atomically first if absent."""
    path = cache_path(encoder, data_cfg, dataset)
    if not path.exists():
        print(f"precomputing {encoder.name} features of {len(dataset)} images x 2 flips once; cached at {path}",
              file=sys.stderr)
        tokens = compute_tokens(encoder, dataset, progress=progress)
        atomic_write(path, lambda f: np.save(f, tokens))
    cache = FeatureCache(path)
    if len(cache) != len(dataset):
        raise DataError(f"feature cache {path} holds {len(cache)} images but the dataset has {len(dataset)}; "
                        "delete it and it is rebuilt on the next run")
    return cache


def cacheable(dataset) -> bool:
    """In-memory data always; an image folder too (its only augmentation is the flip), but only on request."""
    return isinstance(dataset, InMemoryImages)
