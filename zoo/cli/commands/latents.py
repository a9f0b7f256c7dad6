"""`zoo prepare latents`: VAE posterior moments of an image folder, in shards (zoo/data/latents.py)."""
from __future__ import annotations

import argparse


def register_prepare(targets) -> None:
    p = targets.add_parser("latents", help="encode an image folder with a VAE once, into latent shards",
                           description="Writes the posterior mean and std of every image, unflipped and flipped; "
                                       "train on them with data.dataset=latents data.root=OUT data.vae=VAE.")
    p.add_argument("--vae", required=True, help="a diffusers AutoencoderKL folder (SD-VAE), or builtin")
    p.add_argument("--images", required=True, help="an image folder with one subfolder per class")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--image-size", type=int, default=256, help="centre crop and resize (ADM's) to this size")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="tiny", help="with --vae builtin: whose data and autoencoder sections")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zoo.config import load_config
    from zoo.data.folder import ImageFolder
    from zoo.data.latents import prepare_latents
    from zoo.training.distributed import pick_device
    from zoo.latents.vae import load_vae

    cfg = load_config(None, [f"data.vae={args.vae}"], args.preset)
    images = ImageFolder(args.images, args.image_size)
    vae = load_vae(cfg).requires_grad_(False)
    out = prepare_latents(vae, images, args.out, args.shard_size, args.batch_size, pick_device(args.device))
    print(f"wrote the latents of {len(images)} images ({len(images.classes)} classes) to {out}; train with "
          f"data.dataset=latents data.root={out} data.vae={vae.source} data.image_size={args.image_size} "
          f"data.num_classes={len(images.classes)}")
    return 0
