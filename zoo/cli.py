"""The `zoo` command: list, config, train, sample, bench, and the commands of zoo/commands/.

Every subcommand that builds a config takes `key=value` overrides after its flags, e.g.
`zoo train --method sit train.steps=100 model.size=micro`. Errors in the user's input print one
line (`error: ...`) and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoo.errors import ZooError


def _add_config_args(p: argparse.ArgumentParser, method_required: bool = True) -> None:
    p.add_argument("--method", required=method_required, help="a registered method (see `zoo list`)")
    p.add_argument("--preset", default=None, help="size/recipe preset: tiny (default, CPU), B, XL, ...")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")


def _config(args):
    from zoo.config import load_config

    return load_config(args.method, args.overrides, args.preset)


def cmd_list(args) -> int:
    from zoo.registry import available_methods

    methods = available_methods()
    width = max(len(n) for n in methods)
    for name, cls in methods.items():
        print(f"{name:<{width}}  {cls.description}")
    return 0


def cmd_config(args) -> int:
    from zoo.config import to_yaml

    print(to_yaml(_config(args)), end="")
    return 0


def _parameter_summary(cfg) -> str:
    import torch

    from zoo.backbones.sit import count_parameters
    from zoo.sampling import build_method

    method = build_method(cfg)
    with torch.device("meta"):
        model = method.build_model()
    total, backbone = count_parameters(model), count_parameters(model.backbone)
    return f"parameters: {total / 1e6:.2f}M ({backbone / 1e6:.2f}M backbone, {(total - backbone) / 1e6:.2f}M extras)"


def cmd_train(args) -> int:
    from zoo.checkpoint import load_checkpoint
    from zoo.config import config_from_dict, to_yaml, with_overrides
    from zoo.trainer import Trainer, new_run_dir

    resume = None
    if args.resume:
        resume = load_checkpoint(args.resume)
        cfg = with_overrides(config_from_dict(resume["config"]), args.overrides)
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(resume["path"]).parent.parent
    else:
        if not args.method:
            raise ZooError("zoo train needs --method (or --resume RUN)")
        cfg = _config(args)
        run_dir = new_run_dir(cfg)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        print(f"# method: {cfg.method}; {_parameter_summary(cfg)}")
        print(f"# would write to: {run_dir}" + (f" (resuming at step {resume['step']})" if resume else ""))
        return 0
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume)
    if trainer.proc.is_main:
        print(f"{cfg.method} ({cfg.preset}): {_parameter_summary(cfg)}; run folder {run_dir}", file=sys.stderr)
    last = trainer.fit()
    if trainer.proc.is_main:
        loss = f"; final loss {last['loss']:.4f}" if "loss" in last else ""
        print(f"done: {trainer.step} steps{loss}; checkpoints, samples and metrics in {run_dir}")
    return 0


def cmd_sample(argv: list[str]) -> int:
    import torch

    from zoo.config import ODE_SOLVER_NAMES
    from zoo.images import save_grid
    from zoo.commands.eval import add_method_sampling_args, method_option_values
    from zoo.eval.evaluate import method_options
    from zoo.sampling import class_grid_labels, generate, load_for_sampling

    p = argparse.ArgumentParser(prog="zoo sample", description="sample a grid of images from a checkpoint")
    p.add_argument("--ckpt", required=True, help="a checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--num", type=int, default=64, help="number of images (one row per class)")
    p.add_argument("--sampler", choices=["ode", "sde"], default=None)
    p.add_argument("--solver", choices=ODE_SOLVER_NAMES, default=None, help="ODE solver")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--class", dest="label", type=int, default=None, help="sample only this class")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="grid.png")
    add_method_sampling_args(p)  # every method's flags, so that --help lists them; the checkpoint's method checks them
    args = p.parse_args(argv)

    from zoo.distributed import pick_device
    device = pick_device(args.device)
    method, model, cfg, _ = load_for_sampling(args.ckpt, device, use_ema=not args.no_ema)
    options = method_options(cfg.method, method_option_values(args))
    s = cfg.sample
    n_classes = method.data.num_classes
    if args.label is not None:
        if not 0 <= args.label < n_classes:
            raise ZooError(f"--class {args.label} is out of range: this model has classes 0..{n_classes - 1}")
        labels = torch.full((args.num,), args.label, dtype=torch.long)
    else:
        labels = class_grid_labels(args.num, n_classes)
    images = generate(method, model, labels, sampler=args.sampler or s.sampler, solver=args.solver or s.solver,
                      steps=args.steps or s.steps, cfg_scale=s.cfg_scale if args.cfg is None else args.cfg,
                      cfg_interval=tuple(args.cfg_interval or s.cfg_interval),
                      seed=s.seed if args.seed is None else args.seed, batch_size=args.batch_size, device=device,
                      last_step=s.last_step, **options)
    per_row = args.num if args.label is not None else max(1, args.num // n_classes)
    path = save_grid(images, args.out, nrow=min(per_row, 16), scale=2 if images.shape[-1] <= 64 else 1)
    print(f"wrote {len(images)} samples to {path}")
    return 0


def cmd_bench(args) -> int:
    from zoo.bench import bench_side_by_side, bench_training
    from zoo.config import load_config

    if args.run:
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
        result = bench_training(_config(args), steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="repa-zoo: train and compare REPA-family methods")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registered methods, one line each")
    _add_config_args(sub.add_parser("config", help="print the resolved config of a method"))
    train = sub.add_parser("train", help="train a method (progress bar, run folder with checkpoints and samples)")
    _add_config_args(train, method_required=False)
    train.add_argument("--resume", metavar="RUN", help="continue a run folder (or checkpoint) where it stopped")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count, then exit")
    sub.add_parser("sample", help="sample an image grid from a checkpoint (zoo sample --help)", add_help=False)
    bench = sub.add_parser("bench", help="training steps/s and peak memory of a method and preset")
    _add_config_args(bench, method_required=False)
    bench.add_argument("--run", action="append", metavar="'METHOD [key=value ...]'",
                       help="time several runs side by side in interleaved rounds (repeat; the first is the reference)")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --steps steps each, with --run")
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, to report model FLOP utilisation")
    bench.add_argument("--out", help="also write the result as JSON here")
    prepare = sub.add_parser("prepare", help="build once what later runs reuse (zoo prepare --help lists targets)")
    targets = prepare.add_subparsers(dest="target", required=True, metavar="TARGET")
    from zoo.commands import command_modules

    for module in command_modules():
        if hasattr(module, "register"):
            module.register(sub)
        if hasattr(module, "register_prepare"):
            module.register_prepare(targets)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "sample":
            return cmd_sample(argv[1:])
        args = build_parser().parse_args(argv)
        core = {"list": cmd_list, "config": cmd_config, "train": cmd_train, "bench": cmd_bench}
        return core[args.command](args) if args.command in core else args.func(args)
    except ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
