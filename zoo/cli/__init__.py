"""The `zoo` command. Every subcommand is a module of zoo/cli/commands/ (see its docstring).

Every subcommand that builds a config takes `key=value` overrides after its flags, e.g.
`zoo train --method sit train.steps=100 model.size=micro`. Errors in the user's input print one
line (`error: ...`) and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from zoo.cli import options
from zoo.errors import ZooError


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The `zoo` parser; with `command`, only that subcommand's costly arguments are built (cli/options.py)."""
    from zoo.cli.commands import command_modules

    options.building_for = command
    parser = argparse.ArgumentParser(prog="zoo", description="repa-zoo: train and compare REPA-family methods")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        chosen = argv[0] if argv and not argv[0].startswith("-") else ""
        args = build_parser(chosen).parse_args(argv)
        return args.func(args)
    except ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused: a read-only folder, a full disk, a missing mount
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # only a command that imported torch can have started processes
            from zoo.training.distributed import end_processes

            end_processes()


def os_error_line(exc: OSError) -> str:
    import errno

    where = exc.filename or "a file"
    if exc.errno == errno.ENOSPC:
        return f"the disk is full: writing {where} failed; free space there or write elsewhere (train.out_dir=...)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {exc.strerror} (a read-only or foreign folder); write elsewhere (train.out_dir=...)"
    return f"{where}: {exc.strerror or exc}"


if __name__ == "__main__":
    sys.exit(main())
