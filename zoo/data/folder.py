"""Real images from a folder with one subfolder per class (ImageNet's layout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zoo.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG"}


def list_classes(root: str | Path) -> list[str]:
    if not str(root):
        raise DataError("data.dataset=folder needs data.root: the image folder, one subfolder per class")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (data.root); it should hold one subfolder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class subfolders")
    return classes


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM's preprocessing: halve with box filter while large, bicubic resize, then centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolder(torch.utils.data.Dataset):
    """Items are addressed as (index, flip) so that augmentation is reproducible and cacheable."""

    def __init__(self, root: str | Path, image_size: int):
        self.root, self.image_size = Path(root), image_size
        self.classes = list_classes(root)
        self.samples = [(p, label) for label, name in enumerate(self.classes)
                        for p in sorted((self.root / name).rglob("*")) if p.suffix in IMAGE_SUFFIXES]
        if not self.samples:
            raise DataError(f"image folder {root} has class subfolders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def __len__(self):
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        path, _ = self.samples[index]
        try:
            with Image.open(path) as img:
                img = center_crop_resize(img.convert("RGB"), self.image_size)
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # uint8 [3, H, W]

    def __getitem__(self, item):
        index, flip = item
        image = self.load(index)
        if flip:
            image = image.flip(-1)
        return {"image": image.float() / 127.5 - 1, "label": self.samples[index][1], "index": index, "flip": bool(flip)}


_verified: set = set()  # folders already verified by this process (the dataset is built by several components)


def verify_images(folder: ImageFolder, workers: int = 0, progress: bool = True) -> None:
    """Decode every image of `folder` once; one DataError naming every unreadable file (data.verify=true), so a
    corrupt image deep in a dataset stops a run before its first step rather than at an arbitrary one."""
    from tqdm import tqdm

    from zoo.data.store import CropsOf, _first

    key = (str(folder.root.resolve()), folder.image_size)
    if key in _verified:
        return
    loader = torch.utils.data.DataLoader(CropsOf(folder), batch_size=64, num_workers=workers, collate_fn=_first)
    bad = []
    with tqdm(total=len(folder), desc="verify", unit="img", disable=not progress, leave=False) as bar:
        for items in loader:
            bad += [error for _, _, error in items if error is not None]
            bar.update(len(items))
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DataError(f"{len(bad)} of the {len(folder)} images in {folder.root} cannot be read: {shown}")
    _verified.add(key)
