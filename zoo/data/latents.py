"""Prepared latents: VAE posterior moments of an image folder, written once in shards (`zoo prepare latents`).

At ImageNet scale the frozen VAE's encoder costs more than a training step, so latent diffusion reads
precomputed posteriors instead. Each image is stored unflipped and flipped, as the posterior mean and
standard deviation (float16), so every step still draws a fresh sample `mean + std * eps` of an image
the flip augmentation chose. Layout of the output folder:

  meta.json                      VAE source and latent scale, image size, classes, counts, shard size
  shard_00000.mean.npy, .std.npy [n, 2, C, h, w] float16   (axis 1: unflipped, flipped)
  shard_00000.label.npy          [n] int64
Train on it with `data.dataset=latents data.root=OUT data.vae=<the same VAE>` (the VAE decodes samples).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from zoo.errors import DataError

META = "meta.json"


def _shard(root: Path, i: int, part: str) -> Path:
    return root / f"shard_{i:05d}.{part}.npy"


def read_meta(root) -> dict:
    root = Path(root)
    path = root / META
    if not path.exists():
        raise DataError(f"{root} is not a prepared latent folder (no {META}); write one with `zoo prepare latents`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt: {exc}") from None


class LatentShards:
    """Batches of {latent_mean, latent_std, label, index, flip} gathered from memory-mapped shards."""

    def __init__(self, root):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.shard_size = self.meta["shard_size"]
        shape = (2, *self.meta["latent_shape"])
        self.shards = []
        for i in range(self.meta["num_shards"]):
            parts = {}
            for part in ("mean", "std", "label"):
                path = _shard(self.root, i, part)
                try:
                    parts[part] = np.load(path, mmap_mode="r")
                except Exception as exc:
                    raise DataError(f"latent shard {path} is missing or corrupt ({type(exc).__name__}); "
                                    "prepare the folder again with `zoo prepare latents`") from None
            n = len(parts["label"])
            if parts["mean"].shape != (n, *shape) or parts["std"].shape != (n, *shape):
                raise DataError(f"latent shard {_shard(self.root, i, 'mean')} has shape {parts['mean'].shape}, "
                                f"expected ({n}, {', '.join(map(str, shape))}); prepare the folder again")
            self.shards.append(parts)
        if sum(len(s["label"]) for s in self.shards) != self.meta["num_images"]:
            raise DataError(f"{self.root} holds fewer images than its {META} says; prepare the folder again")

    def __len__(self) -> int:
        return self.meta["num_images"]

    def batch(self, index: torch.Tensor, flip: torch.Tensor) -> dict:
        out = {"latent_mean": [], "latent_std": [], "label": []}
        for i, f in zip(index.tolist(), flip.long().tolist()):
            shard = self.shards[i // self.shard_size]
            j = i % self.shard_size
            out["latent_mean"].append(torch.from_numpy(np.array(shard["mean"][j, f])))
            out["latent_std"].append(torch.from_numpy(np.array(shard["std"][j, f])))
            out["label"].append(int(shard["label"][j]))
        return {"latent_mean": torch.stack(out["latent_mean"]).float(),
                "latent_std": torch.stack(out["latent_std"]).float(),
                "label": torch.tensor(out["label"]), "index": index, "flip": flip}


@torch.no_grad()
def prepare_latents(vae, images, out, shard_size: int = 10_000, batch_size: int = 64, device="cpu",
                    progress: bool = True) -> Path:
    """Write the posterior moments of every image of `images` (an ImageFolder), unflipped and flipped."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(images)
    vae = vae.to(device).eval()
    bar = tqdm(total=n, desc="latents", unit="img", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    latent_shape = None
    for s, start in enumerate(range(0, n, shard_size)):
        idx = range(start, min(n, start + shard_size))
        means, stds, labels = [], [], []
        for b in range(0, len(idx), batch_size):
            chunk = [images[(i, False)] for i in idx[b:b + batch_size]]
            x = torch.stack([c["image"] for c in chunk]).to(device)
            mean, std = zip(*(vae.posterior(v) for v in (x, x.flip(-1))))
            means.append(torch.stack(mean, 1).half().cpu())
            stds.append(torch.stack(std, 1).half().cpu())
            labels += [c["label"] for c in chunk]
            bar.update(len(chunk))
        mean, std = torch.cat(means), torch.cat(stds)
        latent_shape = list(mean.shape[2:])
        np.save(_shard(out, s, "mean"), mean.numpy())
        np.save(_shard(out, s, "std"), std.numpy())
        np.save(_shard(out, s, "label"), np.asarray(labels, dtype=np.int64))
    bar.close()
    meta = {"num_images": n, "num_shards": (n + shard_size - 1) // shard_size, "shard_size": shard_size,
            "latent_shape": latent_shape, "image_size": images.image_size, "classes": images.classes,
            "num_classes": len(images.classes), "vae": vae.source, "images": str(images.root)}
    (out / META).write_text(json.dumps(meta, indent=2))  # written last: a folder without it is unfinished
    return out
