"""`zoo train`: train a method (progress bar; a run folder with checkpoints, samples and metrics)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from zoo.cli.options import add_config_args, config_of
from zoo.errors import ZooError


def register(sub) -> None:
    p = sub.add_parser("train", help="train a method (progress bar, run folder with checkpoints and samples)")
    add_config_args(p, method_required=False)
    p.add_argument("--resume", metavar="RUN", help="continue a run folder (or checkpoint) where it stopped")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count, then exit")
    p.set_defaults(func=run)


def parameter_summary(model) -> str:
    from zoo.backbones.sit import count_parameters

    total, backbone = count_parameters(model), count_parameters(model.backbone)
    return f"parameters: {total / 1e6:.2f}M ({backbone / 1e6:.2f}M backbone, {(total - backbone) / 1e6:.2f}M extras)"


def model_on_meta(cfg):
    """The method's model with no memory behind it: enough to count its parameters without building it."""
    import torch

    from zoo.training.generate import build_method

    method = build_method(cfg)
    with torch.device("meta"):
        return method.build_model()


def run(args) -> int:
    from zoo.training.checkpoint import load_checkpoint
    from zoo.config import config_from_dict, to_yaml, with_overrides
    from zoo.training.trainer import Trainer, new_run_dir

    resume = None
    if args.resume:
        resume = load_checkpoint(args.resume)
        cfg = with_overrides(config_from_dict(resume["config"]), args.overrides)
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(resume["path"]).parent.parent
    else:
        if not args.method:
            raise ZooError("zoo train needs --method (or --resume RUN)")
        cfg = config_of(args)
        main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only the main process writes (and claims)
        run_dir = new_run_dir(cfg, claim=main_process and not args.dry_run)
    if args.dry_run:
        summary = parameter_summary(model_on_meta(cfg))  # first: a config that builds no model prints only the error
        print(to_yaml(cfg), end="")
        print(f"# method: {cfg.method}; {summary}")
        print(f"# would write to: {run_dir}" + (f" (resuming at step {resume['step']})" if resume else ""))
        return 0
    try:
        trainer = Trainer(cfg, run_dir=run_dir, resume=resume)
    except BaseException:
        if resume is None:  # a new run that could not even start leaves no empty folder behind
            from zoo.training.runlock import abandon

            abandon(run_dir)
        raise
    if trainer.proc.is_main:
        print(f"{cfg.method} ({cfg.preset}): {parameter_summary(trainer.model)}; run folder {run_dir}", file=sys.stderr)
    last = trainer.fit()
    if trainer.proc.is_main:
        loss = f"; final loss {last['loss']:.4f}" if "loss" in last else ""
        print(f"done: {trainer.step} steps{loss}; checkpoints, samples and metrics in {run_dir}")
        if trainer.grid_accuracy is not None:
            sampling = trainer.cfg.sample
            print(f"final grid ({sampling.num} samples, CFG {sampling.cfg_scale:g}): the judge gives "
                  f"{trainer.grid_accuracy:.2f} of them their row's class (chance "
                  f"{1 / trainer.method.data.num_classes:.2f}; real images about 1.00)")
    return 0
