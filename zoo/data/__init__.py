"""Datasets and the deterministic, resumable batch stream the trainer reads.

Every batch is a dict: `image` ([B, 3, H, W]: float in [-1, 1], or uint8 from a prepared store, which
`as_model_inputs` turns into floats on the device), `label`, `index` (position in the dataset) and
`flip` (whether it was mirrored); a prepared store adds the VAE posterior's `latent_mean` and `latent_std`. Batch contents depend only on (seed, step, rank),
so resuming at step s reads exactly the batches an uninterrupted run would have read, and a
feature cache can be keyed by (index, flip).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from zoo.data.folder import ImageFolder, list_classes
from zoo.data.store import collate_batch
from zoo.data.shapes import CLASSES as SHAPE_CLASSES, generate_shapes, placement as shape_placement
from zoo.errors import ConfigError, DataError
from zoo.training.method import DataInfo

DATASETS = ("shapes", "folder", "prepared")
REFERENCE_SEED_OFFSET = 1_000_003  # the held-out/reference split of the shapes data uses seed + this


def data_info(data_cfg) -> DataInfo:
    """Channels, size and classes without reading any image."""
    if data_cfg.dataset == "shapes":
        if not 1 <= data_cfg.num_classes <= len(SHAPE_CLASSES):
            raise ConfigError(f"data.num_classes must be 1..{len(SHAPE_CLASSES)} for the shapes data")
        try:
            shape_placement(data_cfg.shape_scale)
        except ValueError as err:
            raise ConfigError(f"data.shape_scale={data_cfg.shape_scale}: {err}") from None
        return DataInfo(3, data_cfg.image_size, data_cfg.num_classes)
    if data_cfg.dataset == "folder":
        classes = list_classes(data_cfg.root)
        return DataInfo(3, data_cfg.image_size, len(classes))
    if data_cfg.dataset == "prepared":
        from zoo.data.store import read_meta

        if not str(data_cfg.root):
            raise ConfigError("data.dataset=prepared needs data.root: a store written by `zoo prepare dataset`")
        meta = read_meta(data_cfg.root)  # data.vae is checked by the method: REPA-E reads the images only
        if meta["image_size"] != data_cfg.image_size:
            raise ConfigError(f"the store {data_cfg.root} holds {meta['image_size']} px images; "
                              f"set data.image_size={meta['image_size']}")
        return DataInfo(3, data_cfg.image_size, meta["num_classes"])
    raise ConfigError(f"unknown data.dataset {data_cfg.dataset!r}; valid: {', '.join(DATASETS)}")


@functools.lru_cache(maxsize=4)
def _shapes(num_images: int, seed: int, num_classes: int, size: int, scale: float):
    return generate_shapes(num_images, seed, num_classes, size, scale)


class InMemoryImages:
    """A uint8 image tensor with labels; batches are gathered by index without a DataLoader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def batch(self, index: torch.Tensor, flip: torch.Tensor) -> dict:
        images = self.images[index].float() / 127.5 - 1
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return {"image": images, "label": self.labels[index], "index": index, "flip": flip}


def shapes_split(data_cfg, reference: bool = False, num_images: int | None = None) -> InMemoryImages:
    seed = data_cfg.seed + (REFERENCE_SEED_OFFSET if reference else 0)
    images, labels = _shapes(num_images or data_cfg.num_images, seed, data_cfg.num_classes, data_cfg.image_size,
                             data_cfg.shape_scale)
    return InMemoryImages(images, labels)


def data_identity(data_cfg) -> dict:
    """What defines the data distribution (not the size of one training subset): a cache key for models
    trained on it (the judge, the built-in teacher)."""
    if data_cfg.dataset == "shapes":
        identity = {"dataset": "shapes", "seed": data_cfg.seed, "num_classes": data_cfg.num_classes,
                    "image_size": data_cfg.image_size}
        if data_cfg.shape_scale != 1.0:  # only when set, so the judges and teachers cached before it stay valid
            identity["shape_scale"] = data_cfg.shape_scale
        return identity
    return {"dataset": data_cfg.dataset, "root": str(Path(data_cfg.root).resolve()),
            "num_classes": data_cfg.num_classes, "image_size": data_cfg.image_size}


def training_images(data_cfg, num_images: int):
    """The training distribution for a helper network: `num_images` generated shapes, or the whole folder."""
    if data_cfg.dataset == "shapes":
        return shapes_split(data_cfg, num_images=num_images)
    return build_dataset(data_cfg)


def as_model_inputs(batch: dict) -> dict:
    """uint8 images to floats in [-1, 1] and float16 latents to float32 (done after the copy to the device:
    a quarter of the bytes cross the bus)."""
    out = dict(batch)
    if "image" in out and out["image"].dtype == torch.uint8:
        out["image"] = out["image"].float() / 127.5 - 1
    for key in ("latent_mean", "latent_std"):
        if key in out:
            out[key] = out[key].float()
    return out


def subset_index(total: int, num: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of `num` of `total` training images, drawn without replacement with a fixed seed, for the
    statistics measured once on a subset (a token mean, a PCA, a latent's per-channel mean and std). Every class
    shows up in proportion however the set is ordered: an image folder is sorted by class, so its leading images
    are a few classes, and the built-in shapes interleave them (class = index mod classes), so evenly spaced
    indices can all be one class."""
    if num >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num].sort().values


def gather(dataset, index: torch.Tensor, flip: torch.Tensor | None = None) -> dict:
    """A batch of (image, label) at `index`, mirrored where `flip` (None: none mirrored), from in-memory data, a
    prepared store or an image folder; images as floats in [-1, 1]."""
    if flip is None:
        flip = torch.zeros(len(index), dtype=torch.bool)
    if hasattr(dataset, "batch"):
        return as_model_inputs(dataset.batch(index, flip))
    items = [dataset[(int(i), bool(f))] for i, f in zip(index, flip)]
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.tensor([it["label"] for it in items]),
            "index": index, "flip": flip}


def build_dataset(data_cfg):
    if data_cfg.dataset == "shapes":
        return shapes_split(data_cfg)
    if data_cfg.dataset == "folder":
        dataset = ImageFolder(data_cfg.root, data_cfg.image_size)
        if data_cfg.verify:
            from zoo.data.folder import verify_images

            verify_images(dataset, data_cfg.num_workers)
        if len(dataset.classes) != data_cfg.num_classes:
            raise ConfigError(f"data.num_classes={data_cfg.num_classes} but {data_cfg.root} has "
                              f"{len(dataset.classes)} class folders; set data.num_classes={len(dataset.classes)}")
        return dataset
    if data_cfg.dataset == "prepared":
        from zoo.data.store import PreparedStore

        dataset = PreparedStore(data_cfg.root)
        if dataset.meta["num_classes"] != data_cfg.num_classes:
            raise ConfigError(f"data.num_classes={data_cfg.num_classes} but the store {data_cfg.root} has "
                              f"{dataset.meta['num_classes']} classes; set data.num_classes={dataset.meta['num_classes']}")
        return dataset
    raise ConfigError(f"unknown data.dataset {data_cfg.dataset!r}; valid: {', '.join(DATASETS)}")


class StepBatches:
    """Which (index, flip) pairs each step reads: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, size: int, batch_size: int, seed: int, hflip: bool, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size={batch_size} is not divisible by {world_size} processes")
        if size < batch_size:
            raise DataError(f"the dataset has {size} images, fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.seed, self.hflip = size, batch_size, seed, hflip
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = size // batch_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_033 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return self._perm

    def __call__(self, step: int):
        epoch, j = divmod(step, self.steps_per_epoch)
        index = self._permutation(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
        g = torch.Generator().manual_seed(self.seed * 7_919 + step + 1)
        flip = (torch.rand(self.batch_size, generator=g) < 0.5) & self.hflip
        return index[self.rank::self.world_size], flip[self.rank::self.world_size]


class BatchLoader:
    """Iterates batches from a given step on. In-memory data is gathered in this process; an image folder,
    and a prepared store when data.num_workers > 0, in DataLoader workers (a store's whole batch per call).
    Either way the batches depend only on (seed, step, rank), so a resumed run reads the same ones."""

    def __init__(self, dataset, data_cfg, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.plan = StepBatches(len(dataset), batch_size, seed, data_cfg.hflip, rank, world_size)
        self.num_workers = data_cfg.num_workers

    def iterate(self, start_step: int):
        batched = hasattr(self.dataset, "__getitems__")
        if hasattr(self.dataset, "batch") and (not batched or not self.num_workers):
            step = start_step
            while True:
                yield self.dataset.batch(*self.plan(step))
                step += 1
        plan = self.plan

        class Plan(torch.utils.data.Sampler):
            def __iter__(self):
                step = start_step
                while True:
                    index, flip = plan(step)
                    yield list(zip(index.tolist(), flip.tolist()))
                    step += 1

        workers = self.num_workers
        collate = {"collate_fn": collate_batch} if batched else {}
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, one draw that
        # a resumed run would make at another point of the RNG stream than the uninterrupted run.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=Plan(), num_workers=workers, **collate,
                                             generator=torch.Generator().manual_seed(self.plan.seed),
                                             persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                             pin_memory=torch.cuda.is_available())  # pinned: async host-to-GPU copies
        yield from loader
