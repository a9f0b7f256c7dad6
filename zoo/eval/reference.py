"""The real images that samples are compared against, and their features, computed once and cached.

For the built-in shapes the reference is the held-out split (`zoo.data.shapes_split(reference=True)`,
generated from another seed than the training images); for an image folder it is a fixed, seeded
subset of the folder. Reference features depend on the data, the number of images and the feature
extractor (its name and the identity of its weights), and are cached under
`zoo.cache.cache_dir("reference")` keyed by a fingerprint of exactly those.
"""
from __future__ import annotations

import sys

import torch

from zoo.cache import cache_dir, fingerprint
from zoo.training.checkpoint import atomic_save
from zoo.errors import DataError

REFERENCE_FORMAT = "repa-zoo-reference/1"


def reference_images(data_cfg, num: int) -> tuple:
    """(uint8 images [num, 3, H, W], labels [num]) of the reference split, classes balanced where possible."""
    from zoo.data import ImageFolder, shapes_split, subset_index

    if data_cfg.dataset == "shapes":
        split = shapes_split(data_cfg, reference=True, num_images=num)
        return split.images, split.labels
    if data_cfg.dataset == "prepared":
        from zoo.data.store import PreparedStore

        folder = PreparedStore(data_cfg.root)
        if not folder.has_images:
            raise DataError(f"the store {data_cfg.root} holds only latents (--no-images): its reference images are "
                            "not there; prepare it again without --no-images")
    else:
        folder = ImageFolder(data_cfg.root, data_cfg.image_size)
    if len(folder) < num:
        raise DataError(f"the reference needs {num} images but {data_cfg.root} has {len(folder)}; "
                        f"lower the number of reference images")
    order = subset_index(len(folder), num, seed=1_000_003)
    if data_cfg.dataset == "prepared":
        return (torch.from_numpy(folder.gather("image", order.numpy())),
                torch.from_numpy(folder.gather("label", order.numpy())))
    images = torch.stack([folder.load(int(i)) for i in order])
    labels = torch.tensor([folder.samples[int(i)][1] for i in order])
    return images, labels


def reference_description(data_cfg, num: int) -> dict:
    from zoo.data import REFERENCE_SEED_OFFSET
    from zoo.data import data_identity

    desc = {**data_identity(data_cfg), "num": num}
    if data_cfg.dataset == "shapes":
        desc["split"] = f"held-out shapes, generator seed {data_cfg.seed + REFERENCE_SEED_OFFSET}"
    else:
        desc["split"] = f"seeded subset of the {'store' if data_cfg.dataset == 'prepared' else 'image folder'}"
    return desc


def reference_features(data_cfg, num: int, extractor, batch_size: int = 250, progress: bool = True) -> dict:
    """{"features", "logits" (judge only), "labels", "key"} of the reference split, from the cache if there."""
    key = fingerprint({"format": REFERENCE_FORMAT, "data": reference_description(data_cfg, num),
                       "extractor": extractor.identity})
    path = cache_dir("reference") / f"{extractor.short_name}-{key}.pt"
    if path.exists():
        try:
            return {**torch.load(path, map_location="cpu", weights_only=True), "key": key, "path": str(path)}
        except Exception:  # a corrupt cache entry is recomputed
            path.unlink(missing_ok=True)
    if progress:
        print(f"computing reference features of {num} real images with {extractor.short_name} (cached at {path})",
              file=sys.stderr)
    images, labels = reference_images(data_cfg, num)
    out = extractor.extract(images, batch_size=batch_size, progress=progress, desc="reference features")
    out["labels"] = labels
    atomic_save(out, path)
    return {**out, "key": key, "path": str(path)}


def data_config(preset: str = "tiny", overrides=()):
    """The data section of a preset with `data.*` overrides, for commands that need data but no method."""
    from omegaconf import OmegaConf

    from zoo.config import PRESET_DIR, DataConfig, _load_yaml, _merge, available_presets, parse_overrides
    from zoo.errors import ConfigError

    cli = parse_overrides(list(overrides))
    preset = cli.pop("preset", None) or preset
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(available_presets())}")
    extra = sorted(k for k in cli if k != "data")
    if extra:
        raise ConfigError(f"only data.* overrides apply here, got {', '.join(extra)}")
    cfg = OmegaConf.create({"data": OmegaConf.structured(DataConfig)})
    cfg = _merge(cfg, {"data": _load_yaml(path).get("data", {})}, str(path))
    return _merge(cfg, cli, "the command line").data
