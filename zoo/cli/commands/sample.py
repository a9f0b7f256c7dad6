"""`zoo sample`: a grid of images from a checkpoint."""
from __future__ import annotations

from zoo.cli.commands.eval import add_method_sampling_args
from zoo.config import ODE_SOLVER_NAMES
from zoo.errors import ZooError


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample an image grid from a checkpoint",
                       description="sample a grid of images from a checkpoint")
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
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from zoo.figures import save_grid
    from zoo.cli.commands.eval import method_option_values
    from zoo.eval.evaluate import method_options
    from zoo.training.distributed import pick_device
    from zoo.training.generate import class_grid_labels, generate, load_for_sampling

    device = pick_device(args.device)
    method, model, cfg, _ = load_for_sampling(args.ckpt, device, use_ema=not args.no_ema)
    options = method_options(cfg.method, method_option_values(args))
    defaults = cfg.sample
    n_classes = method.data.num_classes
    if args.label is not None:
        if not 0 <= args.label < n_classes:
            raise ZooError(f"--class {args.label} is out of range: this model has classes 0..{n_classes - 1}")
        labels = torch.full((args.num,), args.label, dtype=torch.long)
    else:
        labels = class_grid_labels(args.num, n_classes)
    images = generate(method, model, labels, sampler=args.sampler or defaults.sampler, solver=args.solver or defaults.solver,
                      steps=args.steps or defaults.steps, cfg_scale=defaults.cfg_scale if args.cfg is None else args.cfg,
                      cfg_interval=tuple(args.cfg_interval or defaults.cfg_interval),
                      seed=defaults.seed if args.seed is None else args.seed, batch_size=args.batch_size, device=device,
                      last_step=defaults.last_step, **options)
    per_row = args.num if args.label is not None else max(1, args.num // n_classes)
    path = save_grid(images, args.out, nrow=min(per_row, 16), scale=2 if images.shape[-1] <= 64 else 1)
    print(f"wrote {len(images)} samples to {path}")
    return 0
