"""`zoo eval`: FID, KID, precision, recall (and the judge's class accuracy) of a checkpoint or of samples."""
from __future__ import annotations

import argparse
import json

from zoo.config import ODE_SOLVER_NAMES


def add_sampling_args(p: argparse.ArgumentParser, defaults_note: str) -> None:
    p.add_argument("--sampler", choices=["ode", "sde"], default=None, help=f"default: {defaults_note}")
    p.add_argument("--solver", choices=ODE_SOLVER_NAMES, default=None, help="ODE solver")
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=100, help="sampling batch (it is part of the noise seeding)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    add_method_sampling_args(p)


def add_method_sampling_args(p: argparse.ArgumentParser) -> None:
    """Every registered method's own sampling flags (DDT's --share, ...), absent unless given: the checkpoint
    decides which method reads them, and a flag its method does not know is an error then. They import every
    method (and torch), so they are built only for the command being run (zoo/cli/options.py)."""
    from zoo.cli import options
    from zoo.training.registry import available_methods

    if not options.wanted(p.prog.split()[-1]):
        return
    owners: dict[str, list] = {}
    for name, cls in available_methods().items():
        for opt in cls.sampling_options():
            owners.setdefault(opt.flag, [opt]).append(name)
    for flag, (opt, *names) in owners.items():
        p.add_argument(flag, dest=opt.dest, type=opt.type, default=argparse.SUPPRESS, nargs=opt.nargs,
                       metavar=opt.metavar,
                       help=f"{opt.help} (method {', '.join(names)}; default {opt.default})")


def method_option_values(args) -> dict:
    from zoo.training.registry import available_methods

    dests = {opt.dest for cls in available_methods().values() for opt in cls.sampling_options()}
    return {d: getattr(args, d) for d in sorted(dests) if hasattr(args, d)}


def add_extractor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extractor", default="judge",
                   help="judge (built-in data, default), inception, dinov2, dinov2-vit-{s,b,l,g}-14")
    p.add_argument("--weights", default=None, help="the extractor's weights file (feature_extractor_weights_path)")
    p.add_argument("--reference-num", type=int, default=5000, help="real reference images (default 5000)")


def settings_from(args, **fixed):
    from zoo.eval.evaluate import EvalSettings

    return EvalSettings(num_samples=args.num_samples, sampler=args.sampler, solver=args.solver, steps=args.steps,
                        cfg_scale=args.cfg, cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
                        seed=args.seed, batch_size=args.batch_size, use_ema=not args.no_ema,
                        extractor=args.extractor, weights=args.weights, reference_num=args.reference_num,
                        options=method_option_values(args), ref=getattr(args, "ref", None), **fixed)


def register(sub) -> None:
    p = sub.add_parser("eval", help="FID, KID, precision/recall and class accuracy of a checkpoint or samples",
                       description="Sample class-balanced images from a checkpoint (or read a folder / .npz of "
                                   "samples), score them against the data's reference split, print the numbers "
                                   "and save them as JSON (in RUN/eval/ for a checkpoint).")
    p.add_argument("--ckpt", help="a checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--samples", help="score these samples instead: a folder of PNG/JPEG or an ADM .npz")
    p.add_argument("--num-samples", type=int, default=500, help="samples to draw (default 500, class-balanced)")
    p.add_argument("--ref", metavar="REF.npz",
                   help="score the papers' way against an ADM reference batch (VIRTUAL_imagenet256_labeled.npz): "
                        "FID, sFID, Inception Score, precision, recall with ADM's Inception layers (--weights: the "
                        "InceptionV3 file); under torchrun the samples are shared among the processes")
    add_sampling_args(p, "the checkpoint's sample.* config")
    add_extractor_args(p)
    p.add_argument("--preset", default="tiny", help="with --samples and no --ckpt: whose data section is the reference")
    p.add_argument("--out-dir", default=None, help="where to write the JSON (default: RUN/eval/)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="with --samples: the reference data")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from zoo.errors import ZooError
    from zoo.eval.evaluate import Evaluator, load_samples, print_record

    from zoo.training.checkpoint import atomic_write_text
    from zoo.training.distributed import init_processes

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.ckpt and not args.samples:
        raise ZooError("zoo eval needs --ckpt CKPT (or --samples DIR|FILE.npz)")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ZooError(f"--num-samples and --batch-size must be at least 1, got {args.num_samples} and {args.batch_size}")
    proc = init_processes(args.device)
    if proc.distributed and args.samples:
        raise ZooError("scoring --samples runs in one process; torchrun shares out sampling from --ckpt only")
    if args.ref:
        from zoo.eval.adm import read_reference

        read_reference(args.ref)  # a missing or malformed reference is named before any sampling
    evaluator = Evaluator(settings_from(args), device=args.device, proc=proc)
    if args.samples and evaluator.settings.options:
        raise ZooError(f"{', '.join(evaluator.settings.options)}: a sampling option applies to sampling from --ckpt, "
                       f"not to scoring --samples")
    if args.samples:
        images, labels = load_samples(args.samples)
        if args.ckpt:
            from zoo.training.checkpoint import load_checkpoint
            from zoo.config import config_from_dict

            data_cfg = config_from_dict(load_checkpoint(args.ckpt)["config"]).data
        else:
            from zoo.eval.reference import data_config

            data_cfg = data_config(args.preset, args.overrides)
        metrics = evaluator.score(images, labels, data_cfg)
        record = {"samples": str(args.samples), "num_samples": len(images), **evaluator.describe(data_cfg),
                  "metrics": {k: v for k, v in metrics.items() if k != "feature_seconds"}}
        if args.out_dir:
            path = Path(args.out_dir) / f"{Path(args.samples).stem}-{record['extractor']}.json"
            record["metrics"] = {k: float(v) for k, v in record["metrics"].items()}
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
            record["path"] = str(path)
    else:
        record = evaluator.evaluate_checkpoint(args.ckpt, out_dir=args.out_dir, skip_existing=False)
        if record is None:  # not the main process: it drew its share of the samples
            return 0
        print(f"{record['method']} step {record['step']}: {record['num_samples']} samples, {record['sampler']}"
              f"/{record['solver']} {record['steps']} steps, CFG {record['cfg_scale']} in {record['cfg_interval']}, "
              f"seed {record['seed']}" + "".join(f", --{k.replace('_', '-')} {v}" for k, v in record.get("options", {}).items()))
    print_record(record)
    if "path" in record:
        print(f"saved to {record['path']}")
    return 0
