"""`zoo prepare TARGET` for the targets that methods bring (`Method.prepare_targets`), e.g. a helper network a
method trains once and caches. Built only when the command is `prepare` (listing them imports the methods)."""
from __future__ import annotations

import argparse

from zoo.cli import options


def register_prepare(targets) -> None:
    if not options.wanted("prepare"):
        return
    from zoo.training.registry import available_methods

    for name, cls in available_methods().items():
        for target in cls.prepare_targets():
            p = targets.add_parser(target.name, help=target.help,
                                   description=f"{target.help} (method {name}); training the method does it on "
                                               "first use otherwise, and caches the result.")
            p.add_argument("--preset", default=None, help="size/recipe preset whose data and options to use (default: tiny)")
            p.add_argument("--force", action="store_true", help="rebuild even if the cached result exists")
            p.add_argument("--out", default=None, help="write the result here instead of the cache")
            p.add_argument("--device", default="auto")
            p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
            p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides (data.*, teacher.*, {name}.*)")
            p.set_defaults(func=lambda args, method=name, run=target.run: _run(method, run, args))


def _run(method_name: str, run, args: argparse.Namespace) -> int:
    import torch

    from zoo.config import load_config
    from zoo.training.distributed import pick_device
    from zoo.training.generate import build_method

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = pick_device(args.device)
    return run(build_method(load_config(method_name, args.overrides, args.preset)), args)
