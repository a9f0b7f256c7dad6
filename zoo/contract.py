"""The shared contract every method must honour, as plain functions.

`tests/test_contract.py` runs them for every registered method; a method that lives in another
package can run them from its own tests (`from zoo.contract import check_all`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from zoo.checkpoint import latest_checkpoint
from zoo.config import load_config
from zoo.sampling import build_method, generate, load_for_sampling

CPU_MICRO = ["preset=micro", "train.device=cpu"]


def micro_config(name: str, overrides=()):
    return load_config(name, [*CPU_MICRO, *overrides])


def check_builds(name: str, overrides=()) -> None:
    """The method builds from its config into a model with trainable parameters."""
    cfg = micro_config(name, overrides)
    model = build_method(cfg).build_model()
    assert any(p.requires_grad for p in model.parameters()), f"{name}: the model has no trainable parameters"


def check_training_step(name: str, overrides=()) -> dict:
    """One CPU training step: finite named losses, finite gradients on every phase, parameters move."""
    from zoo.trainer import Trainer

    trainer = Trainer(micro_config(name, overrides), run_dir=None, progress=False)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    logs = trainer.train_step(next(trainer.loader.iterate(0)))
    assert logs, f"{name}: the training step logged nothing"
    for key, value in logs.items():
        assert torch.isfinite(value).all(), f"{name}: {key} is not finite"
    for phase in trainer.phases:
        grads = [p.grad for p in phase.parameters if p.grad is not None]
        assert grads, f"{name}: phase {phase.name!r} produced no gradients"
        assert all(torch.isfinite(g).all() for g in grads), f"{name}: phase {phase.name!r} has non-finite gradients"
        assert any(g.abs().sum() > 0 for g in grads), f"{name}: phase {phase.name!r} has all-zero gradients"
    moved = [k for k, v in trainer.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert moved, f"{name}: no parameter changed after a step"
    return logs


def check_checkpoint_round_trip(name: str, overrides=(), workdir=None) -> None:
    """Train two steps, save; the checkpoint alone rebuilds the same model, which samples the same images."""
    from zoo.trainer import Trainer

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run_dir = Path(tmp) / "run"
        trainer = Trainer(micro_config(name, [*overrides, "train.steps=2", "sample.num=0"]), run_dir=run_dir,
                          progress=False)
        trainer.fit()
        ckpt = latest_checkpoint(run_dir)
        assert ckpt is not None and ckpt.name == "step_0000002.pt", f"{name}: no checkpoint at step 2"
        method, model, _, state = load_for_sampling(ckpt, "cpu", use_ema=False)
        assert state["step"] == 2
        live = trainer.model.state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(value, live[key]), f"{name}: {key} differs after the round trip"
        labels = torch.arange(3) % method.data.num_classes
        trainer.model.eval()
        a = generate(trainer.method, trainer.model, labels, steps=2, seed=5)
        b = generate(method, model, labels, steps=2, seed=5)
        assert torch.allclose(a, b, atol=1e-6), f"{name}: the reloaded model samples differently"


def check_sampling_shape(name: str, overrides=()) -> None:
    """Sampling returns finite images in [-1, 1] with the data's shape, with the ODE and SDE samplers and CFG."""
    cfg = micro_config(name, overrides)
    method = build_method(cfg)
    method.setup("cpu", training=False)
    model = method.build_model().eval()
    labels = torch.tensor([0, 1, 2, 0]) % method.data.num_classes
    size = (4, method.data.channels, method.data.image_size, method.data.image_size)
    for kwargs in (dict(sampler="ode", steps=2), dict(sampler="sde", steps=2),
                   dict(sampler="ode", steps=2, cfg_scale=2.0, cfg_interval=(0.0, 0.7))):
        images = generate(method, model, labels, **kwargs)
        assert images.shape == size, f"{name}: samples {tuple(images.shape)}, expected {size} ({kwargs})"
        assert torch.isfinite(images).all() and images.abs().max() <= 1, f"{name}: bad sample values ({kwargs})"


def check_all(name: str, overrides=()) -> None:
    check_builds(name, overrides)
    check_training_step(name, overrides)
    check_checkpoint_round_trip(name, overrides)
    check_sampling_shape(name, overrides)
