"""`zoo export-npz`: samples in the layout of ADM's evaluation suite (arr_0: uint8 N x H x W x 3, arr_1: labels)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from zoo.cli.commands.eval import add_sampling_args

    p = sub.add_parser("export-npz", help="write class-balanced samples as an ADM-style .npz (arr_0 uint8 NxHxWx3)",
                       description="For ImageNet-scale numbers with the standard ADM evaluation suite "
                                   "(evaluator.py REF.npz samples.npz). arr_1 holds the class labels.")
    p.add_argument("--ckpt", required=True, help="a checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--num-samples", "--num", dest="num", type=int, default=50_000,
                   help="number of samples (default 50000); under torchrun write --num-samples (torchrun's own "
                        "parser takes --num for its --numa-binding)")
    p.add_argument("--out", default="samples.npz")
    add_sampling_args(p, "the checkpoint's sample.* config")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    import numpy as np
    import torch

    from zoo.cli.commands.eval import settings_from
    from zoo.errors import ZooError
    from zoo.eval.evaluate import balanced_labels, sample_chunks
    from zoo.training.distributed import gather_to_main, init_processes
    from zoo.training.generate import load_for_sampling

    if args.num < 1 or args.batch_size < 1:
        raise ZooError(f"--num and --batch-size must be at least 1, got {args.num} and {args.batch_size}")
    args.num_samples, args.extractor, args.weights, args.reference_num = args.num, "judge", None, 0
    proc = init_processes(args.device)
    method, model, cfg, state = load_for_sampling(args.ckpt, proc.device, use_ema=not args.no_ema)
    settings = settings_from(args).resolved(cfg.sample, cfg.method)  # refuses an option the method does not take
    labels = balanced_labels(args.num, method.data.num_classes)
    mine = dict(sample_chunks(method, model, labels, settings, proc.device, proc, progress=proc.is_main,
                              desc="samples"))
    parts = gather_to_main(mine, proc)  # chunk c was drawn by process c mod N; the file holds them in order
    if not proc.is_main:
        return 0
    chunks = {number: images for part in parts for number, images in part.items()}
    arr = torch.cat([chunks[n] for n in sorted(chunks)]).permute(0, 2, 3, 1).contiguous().numpy()
    tmp = f"{args.out}.tmp"
    with open(tmp, "wb") as f:  # written whole, then renamed: a killed export leaves no half file
        np.savez(f, arr_0=arr, arr_1=labels.numpy())
    os.replace(tmp, args.out)
    print(f"wrote {arr.shape[0]} samples {arr.shape[1]}x{arr.shape[2]} from {state['path']} (step {state['step']}, "
          f"{settings.sampler}/{settings.solver} {settings.steps} steps, CFG {settings.cfg_scale}, seed {settings.seed}) "
          f"to {args.out}")
    return 0
