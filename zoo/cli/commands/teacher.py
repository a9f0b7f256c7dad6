"""`zoo prepare teacher`: train the built-in teacher encoder once and report its linear-probe accuracy."""
from __future__ import annotations

import argparse


def register_prepare(targets) -> None:
    p = targets.add_parser("teacher", help="train the built-in teacher encoder that aligning methods use by default",
                           description="Train the built-in self-supervised ViT teacher on the data of a preset and "
                                       "cache it (zoo/teachers/builtin.py); training a method whose encoder is "
                                       "`builtin` trains it on first use otherwise.")
    p.add_argument("--preset", default="tiny", help="whose data and teacher sections to use (default: tiny)")
    p.add_argument("--force", action="store_true", help="retrain even if the cached teacher exists")
    p.add_argument("--out", default=None, help="write the teacher here instead of the cache")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--cluster", action="store_true",
                   help="the cluster teacher (encoder builtin-cluster, zoo/teachers/cluster.py) instead")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data.*, teacher.* and cluster_teacher.* overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from zoo.config import load_config
    from zoo.teachers.builtin import default_teacher_path, load_teacher, train_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides, args.preset)
    if args.cluster:
        return run_cluster(cfg, args)
    cached = default_teacher_path(cfg.data, cfg.teacher)
    path = args.out or cached
    if args.force or args.out or not cached.exists():
        train_teacher(cfg.data, cfg.teacher, path)
    _, record = load_teacher(path)
    print(f"teacher: {path}\nlinear-probe accuracy on {cfg.teacher.probe_images} held-out images: "
          f"{record['probe_accuracy']:.4f} (the same probe on a randomly initialised teacher: "
          f"{record['random_init_probe_accuracy']:.4f}); trained {record['recipe']['steps']} steps in "
          f"{record['train_seconds']:.0f} s" + (f"; mean cosine of a token to the mean token "
                                                  f"{record['token_mean_cosine']:.3f}" if "token_mean_cosine" in record else "")
          + (f"; the best cosine a constant reaches on the centred tokens (teacher.center_tokens=true) "
             f"{record['centred_constant_cosine']:.3f}" if "centred_constant_cosine" in record else ""))
    return 0


def run_cluster(cfg, args: argparse.Namespace) -> int:
    from zoo.teachers.cluster import default_cluster_path, load_cluster_teacher, train_cluster_teacher

    cached = default_cluster_path(cfg)
    path = args.out or cached
    if args.force or args.out or not cached.exists():
        train_cluster_teacher(cfg, path)
    _, record = load_cluster_teacher(path)
    print(f"cluster teacher: {path}\n{record['clusters']} clusters; they agree with the data's classes for "
          f"{record['purity']:.4f} of the training images (purity; labels are read for this report only); linear "
          f"probe of the CNN's pooled features on {cfg.teacher.probe_images} held-out images: "
          f"{record['probe_accuracy']:.4f}; mean cosine of a token to the mean token {record['token_mean_cosine']:.3f}, "
          f"the best cosine a constant reaches on the centred tokens it gives {record['centred_constant_cosine']:.3f}; "
          f"built in {record['train_seconds']:.0f} s")
    return 0
