"""Arguments several commands share, and when the costly ones are built."""
from __future__ import annotations

import argparse
from typing import Optional

# The command `main` is about to run (None: build every command in full, as tests and docs do). Arguments
# that cost an import -- every method's sampling flags import the methods, and with them torch -- are
# only added to that command's parser, so `zoo --help` and `zoo list` start without torch.
building_for: Optional[str] = None


def wanted(command: str) -> bool:
    """Whether the parser of `command` is built in full in this run."""
    return building_for is None or building_for == command


def add_config_args(p: argparse.ArgumentParser, method_required: bool = True) -> None:
    p.add_argument("--method", required=method_required, help="a registered method (see `zoo list`)")
    p.add_argument("--preset", default=None, help="size/recipe preset: tiny (default, CPU), B, XL, ...")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")


def config_of(args):
    from zoo.config import load_config

    return load_config(args.method, args.overrides, args.preset)
