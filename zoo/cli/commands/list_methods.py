"""`zoo list`: the registered methods, one line each (read without importing them: this stays fast)."""
from __future__ import annotations


def register(sub) -> None:
    sub.add_parser("list", help="the registered methods, one line each").set_defaults(func=run)


def run(args) -> int:
    from zoo.training.registry import method_summaries

    methods = method_summaries()
    width = max(len(n) for n in methods)
    for name, description in methods.items():
        print(f"{name:<{width}}  {description}")
    return 0
