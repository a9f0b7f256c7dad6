"""The prepared store: an image folder decoded, cropped and VAE-encoded once (`zoo prepare dataset`).

At ImageNet scale, decoding JPEGs with PIL and running the SD-VAE encoder every step costs more than
the training step itself. The store does both once. Per image it keeps the uint8 ADM centre crop (what
teachers such as DINOv2 see) and the VAE posterior moments of the crop and of its mirror image (what the
diffusion state is sampled from: a fresh `mean + std * eps` every step, as the papers train). Layout:

  plan.json                        what is being prepared: source images, crop size, VAE identity, shard size
  shard_00000.image.npy            [n, 3, H, W] uint8     (absent when prepared with --no-images)
  shard_00000.mean.npy, .std.npy   [n, 2, C, h, w] float16 (axis 1: unflipped, flipped)
  shard_00000.label.npy            [n] int64
  shard_00000.json                 the shard's record, written after its parts: rows, skipped files, part sizes
  meta.json                        written last: a folder without it is unfinished

Shard s covers source images [s * shard_size, (s + 1) * shard_size) of the sorted folder, so a killed
prepare continues at the first shard without a record, and an image PIL cannot read is skipped (and
named in the record) without moving any other image to another shard. Train with
`data.dataset=prepared data.root=OUT data.vae=<the same VAE>` (the VAE decodes samples).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from zoo.errors import ConfigError, DataError
from zoo.training.checkpoint import atomic_write, atomic_write_text

FORMAT = "repa-zoo-store/1"
META, PLAN = "meta.json", "plan.json"
PARTS = ("image", "mean", "std", "label")


def shard_path(root: Path, i: int, part: str) -> Path:
    return root / (f"shard_{i:05d}.json" if part == "record" else f"shard_{i:05d}.{part}.npy")


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's weights and latent scale: a store is only read with the VAE that wrote it."""
    import hashlib

    h = hashlib.sha1()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for buffer in (vae.shift, vae.scale):
        h.update(buffer.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def read_meta(root) -> dict:
    root = Path(root)
    path = root / META
    if not path.exists():
        unfinished = " (it is unfinished: run the same `zoo prepare dataset` again to continue)" \
            if (root / PLAN).exists() else ""
        raise DataError(f"{root} is not a prepared store (no {META}){unfinished}; write one with `zoo prepare dataset`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{root} was prepared in another format ({meta.get('format', 'none')}, this zoo reads "
                        f"{FORMAT}); prepare it again with `zoo prepare dataset`")
    return meta


def check_store_vae(root, vae) -> None:
    """One line when `vae` is not the VAE whose posteriors the store holds."""
    meta = read_meta(root)
    if vae_fingerprint(vae) != meta["vae_id"]:
        raise ConfigError(f"the store {root} was prepared with another VAE ({meta['vae']}, weights {meta['vae_id']}) "
                          f"than data.vae={vae.source} (weights {vae_fingerprint(vae)}); use that VAE or prepare "
                          "the store again with this one")


def open_shard(root: Path, i: int, record: dict, parts) -> dict:
    """The shard's parts memory-mapped, after checking they are the files its record describes."""
    out = {}
    for part in parts:
        path = shard_path(root, i, part)
        if not path.exists() or path.stat().st_size != record["bytes"][part]:
            raise DataError(f"store shard {path} is missing or truncated (its record says {record['bytes'][part]} "
                            "bytes); run `zoo prepare dataset` again with the same arguments to rewrite it")
        try:
            out[part] = np.load(path, mmap_mode="r")
        except Exception as exc:
            raise DataError(f"store shard {path} is corrupt ({type(exc).__name__}); delete it and its "
                            f"{shard_path(root, i, 'record').name}, then run `zoo prepare dataset` again") from None
        if len(out[part]) != record["rows"]:
            raise DataError(f"store shard {path} holds {len(out[part])} rows, its record says {record['rows']}")
    return out


def collate_batch(batch: dict) -> dict:
    """A DataLoader's collate_fn for datasets that return whole batches (their `__getitems__`)."""
    return batch


class PreparedStore(torch.utils.data.Dataset):
    """Batches {image uint8 (when stored), latent_mean, latent_std (float16), label, index, flip}, gathered
    from memory-mapped shards; `__getitems__` lets DataLoader workers gather whole batches."""

    def __init__(self, root):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.has_images = self.meta["images_stored"]
        parts = [p for p in PARTS if p != "image" or self.has_images]
        self.shards, counts = [], []
        for i in range(self.meta["num_shards"]):
            record = read_record(self.root, i)
            if record is None:
                raise DataError(f"store shard record {shard_path(self.root, i, 'record')} is missing or corrupt; "
                                "run `zoo prepare dataset` again with the same arguments")
            self.shards.append(open_shard(self.root, i, record, parts))
            counts.append(record["rows"])
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        if self.starts[-1] != self.meta["num_images"]:
            raise DataError(f"{self.root} holds {self.starts[-1]} images, its {META} says {self.meta['num_images']}")
        self.image_size, self.classes = self.meta["image_size"], self.meta["classes"]

    def __len__(self) -> int:
        return self.meta["num_images"]

    def gather(self, part: str, index: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
        """Rows `index` of one part, read shard by shard in ascending order (sequential reads of the maps)."""
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        first = self.shards[0][part]
        shape = first.shape[2:] if flip is not None else first.shape[1:]
        out = np.empty((len(index), *shape), dtype=first.dtype)
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            rows = index[where] - self.starts[s]
            order = np.argsort(rows, kind="stable")
            where, rows = where[order], rows[order]
            data = self.shards[s][part]
            out[where] = data[rows, flip[where].astype(np.int64)] if flip is not None else data[rows]
        return out

    def batch(self, index: torch.Tensor, flip: torch.Tensor) -> dict:
        idx, flp = index.numpy().astype(np.int64), flip.numpy().astype(bool)
        out = {"latent_mean": torch.from_numpy(self.gather("mean", idx, flp)),
               "latent_std": torch.from_numpy(self.gather("std", idx, flp)),
               "label": torch.from_numpy(self.gather("label", idx)), "index": index, "flip": flip}
        if self.has_images:
            images = torch.from_numpy(self.gather("image", idx))
            images[flip] = images[flip].flip(-1)
            out["image"] = images
        return out

    def __getitems__(self, items: list) -> dict:
        index, flip = zip(*items)
        return self.batch(torch.tensor(index, dtype=torch.long), torch.tensor(flip, dtype=torch.bool))

    def __getitem__(self, item):
        return self.__getitems__([item])


def read_record(root: Path, i: int) -> dict | None:
    path = shard_path(root, i, "record")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- writing
class CropsOf(torch.utils.data.Dataset):
    """uint8 ADM crops of an ImageFolder's images by position; an unreadable image gives its error instead."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        try:
            return i, self.folder.load(i), None
        except DataError as exc:
            return i, None, str(exc)


def _first(items):
    return items


def plan_of(images, vae, shard_size: int, keep_images: bool) -> dict:
    import hashlib

    listing = hashlib.sha1("\n".join(f"{p.relative_to(images.root)}\t{label}" for p, label in images.samples)
                           .encode()).hexdigest()[:16]
    return {"format": FORMAT, "images": str(images.root.resolve()), "num_files": len(images.samples),
            "listing": listing, "image_size": images.image_size, "classes": images.classes,
            "vae": vae.source, "vae_id": vae_fingerprint(vae), "shard_size": shard_size, "images_stored": keep_images}


@torch.no_grad()
def prepare_store(vae, images, out, shard_size: int = 10_000, batch_size: int = 64, device="cpu", workers: int = 0,
                  keep_images: bool = True, progress: bool = True) -> dict:
    """Write the store of `images` (an ImageFolder) to `out`, continuing an unfinished one; returns its meta."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae = vae.to(device).eval()
    plan = plan_of(images, vae, shard_size, keep_images)
    if (out / PLAN).exists():
        before = json.loads((out / PLAN).read_text())
        changed = sorted(k for k in plan if before.get(k) != plan[k])
        if changed:
            raise DataError(f"{out} holds a store prepared with other {', '.join(changed)}; give another --out "
                            "or delete it")
    else:
        write_json(out / PLAN, plan)
    n = len(images)
    num_shards = (n + shard_size - 1) // shard_size
    done = {i for i in range(num_shards) if (r := read_record(out, i)) is not None and _parts_intact(out, i, r)}
    todo = [i for i in range(num_shards) if i not in done]
    bar = tqdm(total=n, desc="prepare", unit="img", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    bar.update(sum(min(n, (i + 1) * shard_size) - i * shard_size for i in done))
    crops = CropsOf(images)
    for s in todo:
        rows = list(range(s * shard_size, min(n, (s + 1) * shard_size)))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(crops, rows), batch_size=batch_size,
                                             num_workers=workers, collate_fn=_first)
        kept, means, stds, labels, skipped = [], [], [], [], []
        for items in loader:
            good = [(i, crop) for i, crop, error in items if error is None]
            skipped += [error for _, _, error in items if error is not None]
            bar.update(len(items))
            if not good:
                continue
            crop = torch.stack([c for _, c in good])
            x = (crop.float() / 127.5 - 1).to(device)
            mean, std = zip(*(vae.posterior(v) for v in (x, x.flip(-1))))
            means.append(torch.stack(mean, 1).half().cpu())
            stds.append(torch.stack(std, 1).half().cpu())
            labels += [images.samples[i][1] for i, _ in good]
            kept.append(crop)
        if not kept:
            raise DataError(f"none of the images {rows[0]}..{rows[-1]} of {images.root} can be read, e.g. {skipped[0]}")
        arrays = {"mean": torch.cat(means).numpy(), "std": torch.cat(stds).numpy(),
                  "label": np.asarray(labels, dtype=np.int64)}
        if keep_images:
            arrays["image"] = torch.cat(kept).numpy()
        for part, array in arrays.items():
            save_npy(shard_path(out, s, part), array)
        for error in skipped:
            print(f"skipped: {error}", file=sys.stderr)
        write_json(shard_path(out, s, "record"), {
            "rows": len(labels), "first_file": rows[0], "skipped": skipped,
            "latent_shape": list(arrays["mean"].shape[2:]),
            "bytes": {part: shard_path(out, s, part).stat().st_size for part in arrays}})
    bar.close()
    records = [read_record(out, i) for i in range(num_shards)]
    meta = {**plan, "num_images": sum(r["rows"] for r in records), "num_shards": num_shards,
            "num_classes": len(images.classes), "latent_shape": records[0]["latent_shape"],
            "skipped": [e for r in records for e in r["skipped"]]}
    write_json(out / META, meta)
    return meta


def _parts_intact(out: Path, i: int, record: dict) -> bool:
    return all(shard_path(out, i, part).exists() and shard_path(out, i, part).stat().st_size == size
               for part, size in record["bytes"].items())
