"""`zoo prepare dataset`: an image folder cropped and VAE-encoded once, into a prepared store (zoo/data/store.py)."""
from __future__ import annotations

import argparse


def register_prepare(targets) -> None:
    p = targets.add_parser("dataset", help="crop and VAE-encode an image folder once, into a prepared store",
                           description="Writes, per image, the uint8 ADM centre crop (for teachers) and the VAE "
                                       "posterior mean and std of the crop and of its mirror image, in shards. "
                                       "A killed prepare continues where it stopped when run again. Train on it "
                                       "with data.dataset=prepared data.root=OUT data.vae=VAE.")
    p.add_argument("--images", required=True, help="an image folder with one subfolder per class (ImageNet's train/)")
    p.add_argument("--vae", required=True, help="a diffusers AutoencoderKL folder (SD-VAE), or builtin")
    p.add_argument("--out", required=True, help="the store's folder")
    p.add_argument("--size", type=int, default=256, help="ADM centre crop to this size (default 256)")
    p.add_argument("--no-images", action="store_true",
                   help="keep only the latents (enough for methods without a teacher; a fifth of the disk at 256 px)")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    p.add_argument("--workers", type=int, default=2, help="processes decoding JPEGs beside the VAE")
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="tiny", help="with --vae builtin: whose data and autoencoder sections")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zoo.config import load_config
    from zoo.data.folder import ImageFolder
    from zoo.data.store import prepare_store
    from zoo.errors import ZooError
    from zoo.latents.vae import load_vae
    from zoo.training.distributed import pick_device

    for flag in ("size", "shard_size", "batch_size"):
        if getattr(args, flag) < 1:
            raise ZooError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    cfg = load_config(None, [f"data.vae={args.vae}"], args.preset)
    images = ImageFolder(args.images, args.size)
    vae = load_vae(cfg).requires_grad_(False)
    meta = prepare_store(vae, images, args.out, args.shard_size, args.batch_size, pick_device(args.device),
                         workers=max(0, args.workers), keep_images=not args.no_images)
    skipped = f", skipped {len(meta['skipped'])} unreadable (named above and in {args.out}/meta.json)" \
        if meta["skipped"] else ""
    print(f"prepared {meta['num_images']} images ({meta['num_classes']} classes{skipped}) in {args.out}; train with "
          f"data.dataset=prepared data.root={args.out} data.vae={vae.source} data.image_size={args.size} "
          f"data.num_classes={meta['num_classes']}")
    return 0
