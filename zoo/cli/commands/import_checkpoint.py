"""`zoo import --from METHOD FILE --out RUN`: an official checkpoint as a zoo run folder (zoo/training/official_import.py)."""
from __future__ import annotations

import sys

from zoo.cli.options import config_of


def register(sub) -> None:
    p = sub.add_parser("import", help="an official checkpoint as a zoo run folder (sample, eval, fine-tune it)",
                       description="Read an official checkpoint of METHOD (its EMA and raw weights, a bare state dict, "
                                   "DDP prefixes), map it with the method's from_official and load it strictly into "
                                   "the model the config builds (--preset and overrides: the recipe it was trained "
                                   "with), then write RUN/checkpoints/step_0000000.pt, config.yaml and import.json.")
    p.add_argument("file", help="the official checkpoint file (.pt)")
    p.add_argument("--from", dest="method", required=True, metavar="METHOD",
                   help="the method whose official code wrote it (sit, repa, ddt, deepflow, repa_e, sra, ...)")
    p.add_argument("--out", required=True, help="the new run folder")
    p.add_argument("--preset", default=None, help="the recipe the checkpoint was trained with, e.g. XL")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.vae=/w/sd-vae")
    p.set_defaults(func=run)


def run(args) -> int:
    from zoo.training.official_import import import_official

    cfg = config_of(args)
    result = import_official(cfg, args.file, args.out)
    print(f"{args.file}: {result.layout}; {result.mapped} tensors mapped", file=sys.stderr)
    if result.unused:
        shown = ", ".join(result.unused[:12]) + (f", ... ({len(result.unused)} in all)" if len(result.unused) > 12 else "")
        print(f"unused official keys (no place in the zoo's {cfg.method}): {shown}", file=sys.stderr)
    if result.ignored:
        print(f"not weights, not imported: {', '.join(result.ignored)}", file=sys.stderr)
    print(f"wrote {result.checkpoint} (zoo sample --ckpt {args.out}; zoo train --resume {args.out} fine-tunes it)")
    return 0
