"""The `zoo` subcommands, one way for all: a new command is a new file here.

Every module in this package that defines `register(subparsers)` adds its subcommand (with
`parser.set_defaults(func=handler)`), and every module that defines `register_prepare(subparsers)`
adds a target to `zoo prepare <target>`. Keep the module's top free of torch (import it inside the
handler): `zoo --help` imports every command module. Arguments that cost an import are added only
when `zoo.cli.options.wanted(command)`.
"""
from __future__ import annotations

import importlib
import pkgutil


def command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{__name__}.{info.name}")
