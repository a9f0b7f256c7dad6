"""`zoo prepare TARGET`: build once what later runs reuse; every command module's `register_prepare` adds a target."""
from __future__ import annotations


def register(sub) -> None:
    from zoo.cli.commands import command_modules

    p = sub.add_parser("prepare", help="build once what later runs reuse (zoo prepare --help lists targets)")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    for module in command_modules():
        if hasattr(module, "register_prepare"):
            module.register_prepare(targets)
