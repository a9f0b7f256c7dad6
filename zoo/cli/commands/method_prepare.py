"""`zoo prepare TARGET` for the targets that methods bring (`Method.prepare_targets`, built by `Method.prepare`):
helpers a method trains once and caches. They are listed from the methods' source, without importing torch."""
from __future__ import annotations

import argparse


def register_prepare(targets) -> None:
    from zoo.training.registry import prepare_target_summaries

    for target, (method, text) in prepare_target_summaries().items():
        p = targets.add_parser(target, help=text, description=f"{text} (method {method}); training the method does "
                                                              "it on first use otherwise, and caches the result.")
        p.add_argument("--preset", default=None, help="size/recipe preset whose data and options to use (default: tiny)")
        p.add_argument("--force", action="store_true", help="rebuild even if the cached result exists")
        p.add_argument("--out", default=None, help="write the result here instead of the cache")
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides (data.*, teacher.*, {method}.*)")
        p.set_defaults(func=lambda args, method=method, target=target: _run(method, target, args))


def _run(method: str, target: str, args: argparse.Namespace) -> int:
    import torch

    from zoo.config import load_config
    from zoo.training.distributed import pick_device
    from zoo.training.generate import build_method

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = pick_device(args.device)
    return build_method(load_config(method, args.overrides, args.preset)).prepare(target, args)
