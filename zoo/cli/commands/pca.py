"""`zoo prepare pca --method NAME`: fit the PCA of a method's teacher tokens once, cache it, report kept variance."""
from __future__ import annotations

import argparse


def register_prepare(targets) -> None:
    p = targets.add_parser("pca", help="fit the feature PCA that feature-diffusing methods (ReDi) use",
                           description="Fit the PCA of the method's frozen encoder's standardised patch tokens on "
                                       "its training set (zoo/latents/pca.py) and cache it, keyed by encoder and data; "
                                       "training the method fits it on first use otherwise. Prints the fraction "
                                       "of variance kept by the method's number of components.")
    p.add_argument("--method", required=True, help="a method that diffuses PCA features (e.g. redi)")
    p.add_argument("--preset", default=None, help="size/recipe preset whose data and encoder to use (default: tiny)")
    p.add_argument("--force", action="store_true", help="refit even if the cached PCA exists")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.*, teacher.*, the method's)")
    p.set_defaults(func=run)


def kept_variance_table(pca, rank: int) -> str:
    ranks = sorted({r for r in (1, 2, 4, 8, 16, 32, 64, rank) if r <= pca.dim})
    return "\n".join(f"  r = {r:3d}: {pca.kept_variance(r):.4f}{'   <- used' if r == rank else ''}" for r in ranks)


def run(args: argparse.Namespace) -> int:
    import torch

    from zoo.config import load_config
    from zoo.training.distributed import pick_device
    from zoo.errors import ConfigError
    from zoo.training.registry import available_methods
    from zoo.training.generate import build_method

    if args.threads:
        torch.set_num_threads(args.threads)
    method = build_method(load_config(args.method, args.overrides, args.preset))
    if not hasattr(method, "fit_feature_pca"):
        users = [name for name, cls in available_methods().items() if hasattr(cls, "fit_feature_pca")]
        raise ConfigError(f"method {args.method!r} uses no feature PCA; methods that do: {', '.join(users) or 'none'}")
    pca, rank = method.fit_feature_pca(pick_device(args.device), refit=args.force)
    encoder = pca.identity.get("encoder", {})
    print(f"feature PCA of {encoder.get('name')} tokens (width {pca.dim}, grid {encoder.get('grid')}), fitted on "
          f"{pca.num_tokens} tokens of {pca.num_images} training images\nfraction of variance kept by the first r "
          f"components of the standardised tokens:\n{kept_variance_table(pca, rank)}\nsaved at {pca.path}")
    return 0
