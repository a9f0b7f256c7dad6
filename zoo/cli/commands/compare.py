"""`zoo compare`: every listed method under one budget, evaluated alike (zoo/compare/runner.py)."""
from __future__ import annotations

import argparse


def _int_list(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(sub) -> None:
    from zoo.cli.commands.eval import add_extractor_args

    p = sub.add_parser("compare", help="train methods on the same budget, evaluate alike, write table/CSV/plot",
                       description="Train every method (the first is the baseline) for each seed with the same data, "
                                   "batch and steps, evaluate every --eval-every steps with the same sampler, samples "
                                   "and seeds, and write table.md, results.csv, fid_vs_steps.png and samples_<method>.png. "
                                   "Run the same command again to resume an interrupted comparison.")
    p.add_argument("--methods", required=True, help="comma-separated registered methods, baseline first (sit,repa)")
    p.add_argument("--steps", type=int, required=True, help="training steps of every run")
    p.add_argument("--eval-every", type=int, required=True, help="evaluate (and checkpoint) every E steps")
    p.add_argument("--seeds", type=_int_list, default=[0], help="training seeds, e.g. 0,1 (default 0)")
    p.add_argument("--out", default=None, help="comparison folder (default: runs/compare-<methods>-<steps>)")
    p.add_argument("--preset", default=None, help="size/recipe preset of every run (default tiny)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per evaluation (default 500)")
    p.add_argument("--sample-steps", type=int, default=32, help="Euler ODE steps when sampling (default 32)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale when sampling (default 1: none)")
    p.add_argument("--sample-seed", type=int, default=0, help="the sampling seed, the same for every run")
    p.add_argument("--sample-batch", type=int, default=100, help="sampling batch (part of the noise seeding)")
    add_extractor_args(p)
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, one process each (e.g. 2 single-thread runs on 2 cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--teacher", default=None,
                   help="the teacher of every compared method that has one, e.g. builtin-cluster (sets <method>.encoder; "
                        "a <method>.encoder=... override still wins for its method)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run; one in a method's own section (repa.proj_coeff=2) to that method's runs only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from zoo.compare.runner import Comparison, run_comparison, teacher_overrides
    from zoo.eval.evaluate import PROTOCOL

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = dataclasses.replace(PROTOCOL, num_samples=args.num_samples, steps=args.sample_steps,
                                   cfg_scale=args.cfg, seed=args.sample_seed, batch_size=args.sample_batch,
                                   extractor=args.extractor, weights=args.weights, reference_num=args.reference_num)
    out = Path(args.out or f"runs/compare-{'-'.join(methods)}-{args.steps}")
    overrides = list(args.overrides)
    if args.teacher:  # expanded here, so the protocol (and a resume) sees the same overrides as the long form
        overrides = teacher_overrides(methods, args.teacher, args.preset) + overrides
    comp = Comparison(methods=methods, steps=args.steps, eval_every=args.eval_every, out=out, seeds=args.seeds,
                      preset=args.preset, overrides=overrides, settings=settings, device=args.device)
    files = run_comparison(comp, jobs=args.jobs)["files"]
    print((Path(files["table"])).read_text(), end="")
    return 0
