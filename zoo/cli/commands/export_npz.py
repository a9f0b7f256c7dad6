"""`zoo export-npz`: samples in the layout of ADM's evaluation suite (arr_0: uint8 N x H x W x 3, arr_1: labels)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from zoo.cli.commands.eval import add_sampling_args

    p = sub.add_parser("export-npz", help="write class-balanced samples as an ADM-style .npz (arr_0 uint8 NxHxWx3)",
                       description="For ImageNet-scale numbers with the standard ADM evaluation suite "
                                   "(evaluator.py REF.npz samples.npz). arr_1 holds the class labels.")
    p.add_argument("--ckpt", required=True, help="a checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--num", type=int, default=50_000, help="number of samples (default 50000)")
    p.add_argument("--out", default="samples.npz")
    add_sampling_args(p, "the checkpoint's sample.* config")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from zoo.cli.commands.eval import settings_from
    from zoo.training.distributed import pick_device
    from zoo.eval.evaluate import balanced_labels, sample_uint8
    from zoo.training.generate import load_for_sampling

    args.num_samples, args.extractor, args.weights, args.reference_num = args.num, "judge", None, 0
    device = pick_device(args.device)
    method, model, cfg, state = load_for_sampling(args.ckpt, device, use_ema=not args.no_ema)
    settings = settings_from(args).resolved(cfg.sample, cfg.method)  # refuses an option the method does not take
    labels = balanced_labels(args.num, method.data.num_classes)
    images = sample_uint8(method, model, labels, settings, device, desc="samples")
    arr = images.permute(0, 2, 3, 1).contiguous().numpy()
    np.savez(args.out, arr_0=arr, arr_1=labels.numpy())
    print(f"wrote {arr.shape[0]} samples {arr.shape[1]}x{arr.shape[2]} from {state['path']} (step {state['step']}, "
          f"{settings.sampler}/{settings.solver} {settings.steps} steps, CFG {settings.cfg_scale}, seed {settings.seed}) "
          f"to {args.out}")
    return 0
