"""`zoo recipes`: the paper recipes (presets such as imagenet256-XL), what each needs and the paper's number."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("recipes", help="the paper recipes: preset, the files they need, the paper's FID")
    p.add_argument("--method", default=None, help="only this method's recipes")
    p.set_defaults(func=run)


def run(args) -> int:
    from zoo.config import recipes
    from zoo.errors import ConfigError

    found = recipes()
    if args.method is not None:
        if args.method not in found:
            raise ConfigError(f"no paper recipe for {args.method!r}; methods with recipes: {', '.join(found)}")
        found = {args.method: found[args.method]}
    for method, records in found.items():
        for preset, record in records.items():
            print(f"{method} --preset {preset}: {record.get('paper', '')}")
            for key in ("train", "sample", "evaluate", "needs", "released"):
                if key in record:
                    value = record[key]
                    print(f"  {key:<9} {', '.join(value) if isinstance(value, list) else value}")
            print(f"  command   zoo train --method {method} --preset {preset} {record.get('command', '')}".rstrip())
    return 0
