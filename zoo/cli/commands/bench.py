"""`zoo bench`: training steps/s and peak memory of a method and preset (zoo/compare/bench.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from zoo.cli.options import add_config_args, config_of
from zoo.errors import ZooError


def register(sub) -> None:
    p = sub.add_parser("bench", help="training steps/s and peak memory of a method and preset")
    add_config_args(p, method_required=False)
    p.add_argument("--run", action="append", metavar="'METHOD [key=value ...]'",
                   help="time several runs side by side in interleaved rounds (repeat; the first is the reference)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --steps steps each, with --run")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, to report model FLOP utilisation")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--data", action="store_true", help="time the batch stream alone (images/s the data side feeds)")
    p.set_defaults(func=run)


def run(args) -> int:
    from zoo.compare.bench import bench_data, bench_side_by_side, bench_training
    from zoo.config import load_config

    if args.data:
        result = bench_data(load_config(args.method or "sit", args.overrides, args.preset), steps=args.steps,
                            warmup=args.warmup)
    elif args.run:
        specs = [spec.split() for spec in args.run]
        if any(not spec for spec in specs):
            raise ZooError("--run needs a method name, optionally followed by key=value overrides")
        cfgs = [load_config(spec[0], [*args.overrides, *spec[1:]], args.preset) for spec in specs]
        result = bench_side_by_side(cfgs, args.run, steps=args.steps, warmup=args.warmup, rounds=args.rounds)
        for row in result:
            print(f"{row['run']:<40} {row['ms_per_step']:8.1f} ms/step  {row['ratio']:.3f}x", file=sys.stderr)
    elif not args.method:
        raise ZooError("zoo bench needs --method (or --run METHOD [key=value ...], repeated)")
    else:
        result = bench_training(config_of(args), steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops)
    print(json.dumps(result, indent=2))
    if args.out:
        from zoo.training.checkpoint import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    return 0
