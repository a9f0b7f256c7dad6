"""The ranges of the shared numeric options, checked whenever a config is resolved (zoo/config.py).

A value outside its range would otherwise surface later as a traceback deep in torch (a negative
learning rate in AdamW, a zero batch in the data plan) or, worse, as silent success (`train.steps=0`
writing a step-0 checkpoint). Each rule names the key, what it must be, and the value given.
"""
from __future__ import annotations

from zoo.errors import ConfigError

POSITIVE, NON_NEGATIVE, FRACTION, AT_LEAST_ONE = "> 0", ">= 0", "in [0, 1)", ">= 1 (1 = no guidance)"

RULES = {
    "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.grad_clip": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "train.steps": POSITIVE, "train.batch_size": POSITIVE, "train.accumulate": POSITIVE,
    "train.log_every": POSITIVE, "train.ckpt_every": NON_NEGATIVE, "train.sample_every": NON_NEGATIVE,
    "train.ema_decay": FRACTION, "train.threads": NON_NEGATIVE, "train.divergence_factor": NON_NEGATIVE,
    "data.image_size": POSITIVE, "data.num_classes": POSITIVE, "data.num_images": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "model.patch": POSITIVE, "model.mlp_ratio": POSITIVE, "model.max_tokens": NON_NEGATIVE,
    "model.class_dropout": FRACTION,
    "sample.steps": POSITIVE, "sample.num": NON_NEGATIVE, "sample.cfg_scale": AT_LEAST_ONE,
    "flow.time_std": POSITIVE,
    "teacher.steps": POSITIVE, "teacher.batch_size": POSITIVE, "teacher.lr": POSITIVE,
    "autoencoder.steps": POSITIVE, "autoencoder.batch_size": POSITIVE, "autoencoder.lr": POSITIVE,
    "autoencoder.perceptual_weight": NON_NEGATIVE, "optim.beta1": FRACTION, "optim.beta2": FRACTION,
    "cluster_teacher.clusters": NON_NEGATIVE, "cluster_teacher.neighbours": POSITIVE, "cluster_teacher.heads": POSITIVE,
    "cluster_teacher.head_steps": POSITIVE, "cluster_teacher.head_batch": POSITIVE,
    "cluster_teacher.entropy_weight": NON_NEGATIVE, "cluster_teacher.steps": POSITIVE,
    "cluster_teacher.batch_size": POSITIVE, "cluster_teacher.lr": POSITIVE,
}


def _holds(value, rule: str) -> bool:
    if rule == POSITIVE:
        return value > 0
    if rule == NON_NEGATIVE:
        return value >= 0
    if rule == AT_LEAST_ONE:
        return value >= 1
    return 0 <= value < 1


def check_ranges(cfg) -> None:
    """One ConfigError naming the first option outside its range."""
    for key, rule in RULES.items():
        section, name = key.split(".")
        value = cfg[section][name]
        if not _holds(value, rule):
            raise ConfigError(f"{key}={value}: it must be {rule}")
    if cfg.train.batch_size % cfg.train.accumulate:
        raise ConfigError(f"train.accumulate={cfg.train.accumulate} must divide train.batch_size={cfg.train.batch_size}")
    if not 1 <= cfg.cluster_teacher.stage <= len(cfg.cluster_teacher.widths):
        raise ConfigError(f"cluster_teacher.stage={cfg.cluster_teacher.stage}: it must be 1 .. "
                          f"{len(cfg.cluster_teacher.widths)} (one per entry of cluster_teacher.widths)")
    low, high = cfg.sample.cfg_interval
    if not 0 <= low <= high <= 1:
        raise ConfigError(f"sample.cfg_interval={[low, high]}: it must be [low, high] with 0 <= low <= high <= 1")
