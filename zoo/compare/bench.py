"""`zoo bench`: training speed and peak memory of a method and preset, measured in this process; or
several runs side by side (`--run`), timed in interleaved rounds so that load on the machine hits all alike."""
from __future__ import annotations

import platform
import resource
import time

import torch

from zoo.backbones.sit import count_parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_side_by_side(cfgs: list, labels: list, steps: int = 20, warmup: int = 3, rounds: int = 5) -> list:
    """Median ms/step of each config's training step, measured in `rounds` interleaved rounds of `steps` steps.

    Every trainer is built first (teachers, feature caches), then each round times every run in turn,
    so a slower or faster spell of the machine falls on all runs alike. The first run is the reference
    of the `ratio` column.
    """
    import statistics

    from zoo.training.trainer import Trainer

    trainers = [Trainer(cfg, run_dir=None, progress=False) for cfg in cfgs]
    streams = [t.loader.iterate(0) for t in trainers]
    for trainer, batches in zip(trainers, streams):
        for _ in range(warmup):
            trainer.train_step(next(batches))
    times = [[] for _ in trainers]
    for _ in range(rounds):
        for i, (trainer, batches) in enumerate(zip(trainers, streams)):
            _sync(trainer.device)
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(next(batches))
            _sync(trainer.device)
            times[i].append(1000 * (time.perf_counter() - start) / steps)
    base = statistics.median(times[0])
    return [{"run": label, "method": cfg.method, "ms_per_step": round(statistics.median(ms), 2),
             "ms_per_step_rounds": [round(m, 1) for m in ms], "ratio": round(statistics.median(ms) / base, 3),
             "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(),
             "parameters": count_parameters(trainer.model)}
            for label, cfg, ms, trainer in zip(labels, cfgs, times, trainers)]


def bench_training(cfg, steps: int = 20, warmup: int = 3, peak_tflops: float = 0.0) -> dict:
    """Steps per second of the full training step (batch gathering, every phase, EMA) after `warmup` steps."""
    from zoo.training.trainer import Trainer

    trainer = Trainer(cfg, run_dir=None, progress=False)
    device = trainer.device
    batches = trainer.loader.iterate(0)
    for _ in range(warmup):
        trainer.train_step(next(batches))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    _sync(device)
    seconds = time.perf_counter() - start
    params = count_parameters(trainer.model)
    backbone = count_parameters(trainer.model.backbone)
    images_per_sec = steps * cfg.train.batch_size / seconds
    result = {
        "method": cfg.method, "preset": cfg.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "precision": "bf16" if trainer.bf16 else "fp32",
        "batch_size": cfg.train.batch_size, "parameters": params, "backbone_parameters": backbone,
        "steps": steps, "seconds": round(seconds, 3), "ms_per_step": round(1000 * seconds / steps, 2),
        "steps_per_sec": round(steps / seconds, 3), "images_per_sec": round(images_per_sec, 1),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:  # the whole process's peak resident memory (model, data and activations)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if peak_tflops:
        tokens = getattr(trainer.model.backbone, "x_embedder").num_patches
        # 6 FLOPs per parameter per token for forward + backward (the usual MFU estimate)
        result["mfu"] = round(6 * backbone * tokens * images_per_sec / (peak_tflops * 1e12), 4)
    return result


def bench_data(cfg, steps: int = 50, warmup: int = 5) -> dict:
    """Images/s of the training batch stream alone (no model): what the data side can feed a training step."""
    from zoo.data import BatchLoader, build_dataset

    dataset = build_dataset(cfg.data)
    loader = BatchLoader(dataset, cfg.data, cfg.train.batch_size, cfg.train.seed)
    batches = loader.iterate(0)
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    seconds = time.perf_counter() - start
    return {"dataset": cfg.data.dataset, "batch_size": cfg.train.batch_size, "num_workers": cfg.data.num_workers,
            "steps": steps, "batches_per_sec": steps / seconds, "images_per_sec": steps * cfg.train.batch_size / seconds,
            "threads": torch.get_num_threads(), "machine": platform.machine()}
