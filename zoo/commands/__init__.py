"""Pluggable `zoo` subcommands.

Every module in this package that defines `register(subparsers)` adds its own subcommands (with
`parser.set_defaults(func=handler)`), and every module that defines `register_prepare(subparsers)`
adds a target to `zoo prepare <target>`. A new command is a new file here; cli.py does not change.
"""
from __future__ import annotations

import importlib
import pkgutil


def command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{__name__}.{info.name}")
