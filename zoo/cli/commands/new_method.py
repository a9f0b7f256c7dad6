"""`zoo new-method NAME`: write a new method's module, config, docs page and test file (zoo/cli/scaffold.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("new-method", help="write the four files of a new method from a template",
                              description="Write methods/NAME.py, configs/NAME.yaml, docs/methods/NAME.md and "
                                          "tests/methods/test_NAME.py: a method that already trains, samples and "
                                          "passes the shared contract, with TODOs where its loss and hooks go "
                                          "(docs/extending.md).")
    p.add_argument("name", help="the method's name: a lower-case Python identifier (zoo train --method NAME)")
    p.add_argument("--root", default=None,
                   help="project root to write into (default: this zoo's checkout, next to the other methods)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zoo.config import CONFIG_DIR
    from zoo.cli.scaffold import write_method

    root = Path(args.root) if args.root else CONFIG_DIR.parent
    for path in write_method(args.name, root):
        print(f"wrote {path}")
    print(f"add to the nav of mkdocs.yml (under Methods):    - {args.name}: methods/{args.name}.md")
    print(f"add a row to the method index, docs/index.md:   | [{args.name}](methods/{args.name}.md) | paper | code | "
          "hooks | headline | measured |")
    print(f"next: fill the TODOs, then `pytest tests/methods/test_{args.name}.py tests/test_contract.py -k {args.name}` "
          f"and `zoo train --method {args.name}`")
    return 0
