"""`zoo prepare latent-autoencoder --method NAME`: train once the autoencoder of a method that diffuses in a latent
space of its own (a frozen teacher's features plus trained channels, decoded by a trained decoder), and report how
well it reconstructs."""
from __future__ import annotations

import argparse


def register_prepare(targets) -> None:
    p = targets.add_parser("latent-autoencoder", help="train the autoencoder of a method with its own latent space (svg)",
                           description="Train the method's autoencoder (its trained encoder channels and decoder, on "
                                       "its frozen teacher) on the data of a preset and cache it, keyed by recipe, "
                                       "teacher and data; training the method trains it on first use otherwise.")
    p.add_argument("--method", required=True, help="a method with its own latent autoencoder (e.g. svg)")
    p.add_argument("--preset", default=None, help="size/recipe preset whose data, teacher and recipe to use (default: tiny)")
    p.add_argument("--force", action="store_true", help="retrain even if the cached autoencoder exists")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.*, teacher.*, the method's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from zoo.config import load_config
    from zoo.errors import ConfigError
    from zoo.training.distributed import pick_device
    from zoo.training.generate import build_method
    from zoo.training.registry import available_methods

    if args.threads:
        torch.set_num_threads(args.threads)
    method = build_method(load_config(args.method, args.overrides, args.preset))
    if not hasattr(method, "prepare_autoencoder"):
        users = [name for name, cls in available_methods().items() if hasattr(cls, "prepare_autoencoder")]
        raise ConfigError(f"method {args.method!r} has no latent autoencoder; methods that do: {', '.join(users) or 'none'}")
    method.device = pick_device(args.device)
    path = method.prepare_autoencoder(retrain=args.force)
    record = torch.load(path, map_location="cpu", weights_only=True)
    c, g, _ = method.state_shape()
    held_out = f"{record['held_out_psnr']:.2f} dB on 1000 held-out images, " if "held_out_psnr" in record else ""
    print(f"latent autoencoder: {path}\nlatent {c}x{g}x{g}; reconstruction PSNR {held_out}{record['train_psnr']:.2f} dB "
          f"on training images; trained {record['recipe']['ae_steps']} steps in {record['train_seconds']:.0f} s")
    return 0
