"""`zoo config`: print the resolved config of a method."""
from __future__ import annotations

from zoo.cli.options import add_config_args, config_of


def register(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config of a method")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from zoo.config import to_yaml

    print(to_yaml(config_of(args)), end="")
    return 0
