"""`zoo prepare vae`: train the built-in VAE once (zoo/latents/vae.py) and report how well it reconstructs."""
from __future__ import annotations

import argparse
import json


def register_prepare(targets) -> None:
    p = targets.add_parser("vae", help="train the built-in VAE that data.vae=builtin uses",
                           description="Train the built-in VAE (a small diffusers AutoencoderKL) on the data of a "
                                       "preset and cache it; data.vae=builtin trains it on first use otherwise.")
    p.add_argument("--preset", default="tiny", help="whose data and autoencoder sections to use (default: tiny)")
    p.add_argument("--force", action="store_true", help="retrain even if the cached VAE exists")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data.* and autoencoder.* overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from zoo.config import load_config
    from zoo.latents.vae import builtin_vae_dir, ensure_builtin_vae, train_builtin_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides, args.preset)
    path = train_builtin_vae(cfg, builtin_vae_dir(cfg)) if args.force else ensure_builtin_vae(cfg)
    record = json.loads((path / "zoo_vae.json").read_text())
    config = json.loads((path / "config.json").read_text())
    # a VAE cached before the held-out measure recorded its reconstruction of 1000 training images
    measured = (f"{record['reconstruction_images']} held-out" if "reconstruction_images" in record
                else "1000 training")
    print(f"vae: {path} (diffusers AutoencoderKL; latent scale {config['scaling_factor']:.4f}, "
          f"shift {config['shift_factor']:.4f})\nreconstruction of {measured} images: L1 "
          f"{record['reconstruction_l1']:.4f}, PSNR {record['reconstruction_psnr']:.2f} dB; trained "
          f"{record['recipe']['steps']} steps in {record['train_seconds']:.0f} s")
    return 0
