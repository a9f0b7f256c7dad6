"""Sampling from a trained model: rebuild it from a checkpoint, generate seeded, class-labelled images."""
from __future__ import annotations

from pathlib import Path

import torch

from zoo.training.checkpoint import load_checkpoint, load_model_weights
from zoo.config import config_from_dict
from zoo.data import data_info
from zoo.flow.guidance import Guidance
from zoo.training.method import DataInfo, Method, ZooModel
from zoo.training.registry import get_method_class
from zoo.flow.samplers import build_sampler


def build_method(cfg) -> Method:
    return get_method_class(cfg.method)(cfg, data_info(cfg.data))


def load_for_sampling(ckpt, device="cpu", use_ema: bool = True):
    """(method, model, cfg, checkpoint) rebuilt from a checkpoint alone; the model in eval mode on `device`."""
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(state["config"])
    # the checkpoint's own shape and classes where it records them (an imported model's data need not be here)
    method = get_method_class(cfg.method)(cfg, DataInfo(**state["data"])) if "data" in state else build_method(cfg)
    method.setup(device, training=False)
    method.checkpoint, method.checkpoint_weights = Path(state["path"]), "ema" if use_ema else "model"
    model = method.build_model()
    load_model_weights(model, state["ema" if use_ema else "model"], state["path"])
    return method, model.to(device).eval(), cfg, state


def class_grid_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels for a grid with one row per class: per_class images of class 0, then class 1, ..."""
    per_class = max(1, num // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_class)


def iter_generate(method: Method, model: ZooModel, labels: torch.Tensor, *, sampler: str = "ode",
                  solver: str = "euler", steps: int = 32, cfg_scale: float = 1.0, cfg_interval=(0.0, 1.0),
                  seed: int = 0, batch_size: int = 256, device=None, last_step: float = 0.0, chunks=None,
                  **options):
    """Images in [-1, 1] for `labels`, yielded one chunk of `batch_size` at a time (on the CPU); with `chunks`
    (chunk numbers), only those: processes that share an evaluation each draw their own.

    Each chunk draws its noise from its own generator seeded by (seed, chunk), and the caller's RNG
    state is left untouched, so sampling during training does not change training. Yielding chunks
    lets long runs (50k samples for an .npz, an evaluation) show progress and keep only uint8 copies.
    """
    device = device or next(model.parameters()).device
    integrator = build_sampler(sampler, steps, solver, last_step)
    guidance = Guidance(cfg_scale, *cfg_interval)
    forked = [device] if torch.device(device).type == "cuda" else []
    for i, chunk in enumerate(labels.split(batch_size)):
        if chunks is not None and i not in chunks:
            continue
        with torch.no_grad(), torch.random.fork_rng(devices=forked):
            gen = torch.Generator(device=device).manual_seed(seed * 100_003 + i)
            images = method.generate(model, chunk.to(device), integrator, guidance, gen, **options)
        yield images.cpu()


def generate(method: Method, model: ZooModel, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """All images for `labels` at once (see iter_generate); the same seed, labels and batch size give
    the same images."""
    return torch.cat(list(iter_generate(method, model, labels, **kwargs)))


def generate_from_config(method: Method, model: ZooModel, labels: torch.Tensor, sample_cfg, **overrides) -> torch.Tensor:
    kwargs = dict(sampler=sample_cfg.sampler, solver=sample_cfg.solver, steps=sample_cfg.steps,
                  cfg_scale=sample_cfg.cfg_scale, cfg_interval=tuple(sample_cfg.cfg_interval), seed=sample_cfg.seed,
                  last_step=sample_cfg.last_step)
    kwargs.update(overrides)
    return generate(method, model, labels, **kwargs)
