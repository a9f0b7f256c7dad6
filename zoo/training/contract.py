"""The shared contract every method must honour, as plain functions.

`tests/test_contract.py` runs them for every registered method; a method that lives in another
package can run them from its own tests (`from zoo.training.contract import check_all`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from zoo.training.checkpoint import latest_checkpoint
from zoo.config import load_config
from zoo.training.method import TrainContext
from zoo.training.generate import build_method, generate, load_for_sampling

CPU_MICRO = ["preset=micro", "train.device=cpu"]


def micro_config(name: str, overrides=()):
    return load_config(name, [*CPU_MICRO, *overrides])


def check_builds(name: str, overrides=()) -> None:
    """The method builds from its config into a model with trainable parameters."""
    cfg = micro_config(name, overrides)
    model = build_method(cfg).build_model()
    assert any(p.requires_grad for p in model.parameters()), f"{name}: the model has no trainable parameters"


def check_training_step(name: str, overrides=()) -> dict:
    """One CPU training step: finite named losses; every phase has finite, non-zero gradients and moves its own
    parameters (phases share none); the logged total of the first phase is the weighted sum of its terms; the
    EMA moves by exactly (1 - decay) of the way to the live weights (or copies what `unaveraged` names)."""
    from zoo.training.trainer import Trainer

    trainer = Trainer(micro_config(name, overrides), run_dir=None, progress=False)
    model, phases = trainer.model, trainer.phases
    owners = [{id(p) for p in phase.parameters} for phase in phases]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:]), f"{name}: phases share parameters"
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = trainer.to_device(next(trainer.loader.iterate(0)))
    expected = _first_phase_total(trainer, batch)
    logs = trainer.train_step(batch)
    assert logs, f"{name}: the training step logged nothing"
    for key, value in logs.items():
        assert torch.isfinite(value).all(), f"{name}: {key} is not finite"
    total_key = "loss" if len(phases) == 1 else f"loss/{phases[0].name}"
    assert torch.allclose(logs[total_key], expected, rtol=1e-5, atol=1e-6), \
        f"{name}: the logged {total_key} {logs[total_key].item():.6g} is not the weighted sum {expected.item():.6g}"
    names = {id(p): k for k, p in model.named_parameters()}
    for phase in phases:
        grads = [p.grad for p in phase.parameters if p.grad is not None]
        assert grads, f"{name}: phase {phase.name!r} produced no gradients"
        assert all(torch.isfinite(g).all() for g in grads), f"{name}: phase {phase.name!r} has non-finite gradients"
        assert any(g.abs().sum() > 0 for g in grads), f"{name}: phase {phase.name!r} has all-zero gradients"
        moved = [p for p in phase.parameters if not torch.equal(p.detach(), before[names[id(p)]])]
        assert moved, f"{name}: phase {phase.name!r} moved none of its parameters"
    _check_ema(name, trainer, before)
    return logs


def _first_phase_total(trainer, batch) -> torch.Tensor:
    """sum(weight * value) of the first phase's terms, computed on the same RNG draws as the step that follows."""
    phase = trainer.phases[0]
    ctx = TrainContext(trainer.step, trainer.ema.module, trainer.proc.rank, trainer.proc.world_size)
    with torch.random.fork_rng(devices=[]):
        terms = phase.losses(trainer.model, batch, ctx)
    return sum(term.weight * term.value.detach().float() for term in terms.values())


def _check_ema(name: str, trainer, before: dict) -> None:
    decay = trainer.ema.decay_at(0)
    live, ema = trainer.model.state_dict(), trainer.ema.module.state_dict()
    copied = tuple(trainer.method.unaveraged())
    moved = False
    for key, value in live.items():
        if not value.dtype.is_floating_point:
            continue
        if key.startswith(copied):
            assert torch.equal(ema[key], value), f"{name}: the EMA does not copy {key}"
            continue
        expected = before[key] * decay + value * (1 - decay)
        assert torch.allclose(ema[key], expected, atol=1e-6), f"{name}: the EMA of {key} is not its moving average"
        moved |= not torch.equal(ema[key], before[key])
    assert moved, f"{name}: the EMA did not move"


def check_checkpoint_round_trip(name: str, overrides=(), workdir=None) -> None:
    """Train two steps, save; the checkpoint alone rebuilds the same model, which samples the same images."""
    from zoo.training.trainer import Trainer

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


def trained_micro(name: str, overrides=(), steps: int = 3):
    """(method, model in eval mode) after a few CPU steps: at initialisation every velocity is 0 (adaLN-Zero), which
    would make sampling return its noise and classifier-free guidance change nothing."""
    from zoo.training.trainer import Trainer

    trainer = Trainer(micro_config(name, [*overrides, f"train.steps={steps}", "optim.lr=1e-2"]), run_dir=None,
                      progress=False)
    batches = trainer.loader.iterate(0)
    for _ in range(steps):
        trainer.train_step(next(batches))
    return trainer.method, trainer.model.eval()


def check_sampling_shape(name: str, overrides=()) -> None:
    """On a model trained a few steps: sampling returns finite images in [-1, 1] of the data's shape with the ODE
    and SDE samplers, which differ from each other, and classifier-free guidance changes the samples."""
    method, model = trained_micro(name, overrides)
    labels = torch.tensor([0, 1, 2, 0]) % method.data.num_classes
    size = (4, method.data.channels, method.data.image_size, method.data.image_size)
    runs = {}
    for key, kwargs in {"ode": dict(sampler="ode", steps=2), "sde": dict(sampler="sde", steps=2),
                        "cfg": dict(sampler="ode", steps=2, cfg_scale=4.0, cfg_interval=(0.0, 1.0))}.items():
        images = generate(method, model, labels, seed=1, **kwargs)
        assert images.shape == size, f"{name}: samples {tuple(images.shape)}, expected {size} ({kwargs})"
        assert torch.isfinite(images).all() and images.abs().max() <= 1, f"{name}: bad sample values ({kwargs})"
        runs[key] = images
    assert not torch.allclose(runs["ode"], runs["sde"], atol=1e-4), f"{name}: the ODE and SDE samplers agree"
    assert (runs["cfg"] - runs["ode"]).abs().max() > 1e-4, f"{name}: classifier-free guidance changes nothing"


def check_all(name: str, overrides=()) -> None:
    check_builds(name, overrides)
    check_training_step(name, overrides)
    check_checkpoint_round_trip(name, overrides)
    check_sampling_shape(name, overrides)
