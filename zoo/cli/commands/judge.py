"""`zoo prepare judge`: train the evaluation network of the built-in data once (zoo/eval/judge.py)."""
from __future__ import annotations

import argparse
import dataclasses


def register_prepare(targets) -> None:
    p = targets.add_parser("judge", help="train the evaluation network (judge) that FID on the built-in data uses",
                           description="Train the supervised CNN judge on the data of a preset and cache it; "
                                       "`zoo eval` and `zoo compare` train it on first use otherwise.")
    p.add_argument("--preset", default="tiny", help="whose data section to use (default: tiny)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--force", action="store_true", help="retrain even if the cached judge exists")
    p.add_argument("--out", default=None, help="write the judge here instead of the cache")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from zoo.eval.judge import JudgeRecipe, default_judge_path, load_judge, train_judge
    from zoo.eval.reference import data_config

    if args.threads:
        torch.set_num_threads(args.threads)
    data_cfg = data_config(args.preset, args.overrides)
    recipe = JudgeRecipe() if args.steps is None else dataclasses.replace(JudgeRecipe(), steps=args.steps)
    path = args.out or default_judge_path(data_cfg, recipe)
    if args.force or args.out or not default_judge_path(data_cfg, recipe).exists():
        train_judge(data_cfg, recipe, path)
    _, record = load_judge(path)
    print(f"judge: {path}\naccuracy on {recipe.holdout} held-out reference images: {record['reference_accuracy']:.4f} "
          f"(trained {record['recipe']['steps']} steps in {record['train_seconds']:.0f} s)")
    return 0
