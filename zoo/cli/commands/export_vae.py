"""`zoo export-vae`: save the VAE a method tuned (REPA-E) as a diffusers AutoencoderKL folder.

The folder loads as a frozen VAE for any method (`data.vae=DIR`), or in diffusers directly, which is
how the REPA-E paper gets its best numbers (tune end to end, then train a fresh model on the frozen VAE).
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("export-vae", help="save a tuned VAE (REPA-E) as a diffusers AutoencoderKL folder",
                       description="Writes config.json and the weights; the per-channel latent statistics "
                                   "go into latents_mean / latents_std, so data.vae=DIR reproduces the "
                                   "diffusion states the model was trained on.")
    p.add_argument("--ckpt", required=True, help="a checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zoo.errors import ZooError
    from zoo.training.generate import load_for_sampling

    method, model, cfg, state = load_for_sampling(args.ckpt, "cpu", use_ema=not args.no_ema)
    vae = method.export_vae(model)
    if vae is None:
        raise ZooError(f"method {cfg.method!r} does not tune a VAE; nothing to export")
    vae.save_pretrained(args.out)
    print(f"wrote the {'raw' if args.no_ema else 'EMA'} VAE of {state['path']} (step {state['step']}) to {args.out}; "
          f"use it with data.vae={args.out}")
    return 0
