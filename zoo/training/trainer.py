"""The training loop: one linear step that every method shares.

Per step: read a batch; for each of the method's phases, zero its optimizer, compute its named
losses through the model (one DDP forward), check they are finite, back-propagate the weighted
sum, clip, step; then update the EMA. Methods change what the losses are, never this loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from zoo.training.checkpoint import FORMAT, atomic_save, atomic_write_text, checkpoint_path, load_model_weights
from zoo.config import to_dict, to_yaml
from zoo.data import BatchLoader, build_dataset
from zoo.training.distributed import ProcessInfo, all_gather_objects, barrier, init_processes
from zoo.training.ema import EMA
from zoo.errors import ConfigError, TrainingDiverged
from zoo.figures import plot_losses, save_grid
from zoo.training.method import TrainContext
from zoo.training.loggers import LOGGERS, RunLogger
from zoo.training.provenance import record_start
from zoo.training.generate import build_method, class_grid_labels, generate_from_config


LR_SCHEDULES = ("constant", "cosine")
WEIGHT_GROWTH = 10  # how many times its norm at the start the model may grow before a run counts as diverged


def new_run_dir(cfg, claim: bool = True) -> Path:
    """The folder of a new run: train.run_name or <method>-<preset>-<time>, with -2, -3, ... when that one is taken.
    `claim` locks it for this process at once (zoo/training/runlock.py); without, it is only the name it would get."""
    from zoo.training.runlock import claim_new_run_dir

    name = cfg.train.run_name or f"{cfg.method}-{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    if claim:
        return claim_new_run_dir(cfg.train.out_dir, name)
    run_dir, n = Path(cfg.train.out_dir) / name, 1
    while run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()):
        n += 1
        run_dir = Path(cfg.train.out_dir) / f"{name}-{n}"
    return run_dir


class Trainer:
    """One run's training: built in named parts (processes and torch, the method and its frozen helpers, the
    model, EMA and optimizers, the data), then `fit` runs `train_step` to the end."""

    def __init__(self, cfg, run_dir: Optional[Path] = None, resume: Optional[dict] = None,
                 proc: Optional[ProcessInfo] = None, progress: bool = True):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir) if run_dir else None, progress
        self.proc = proc or init_processes(cfg.train.device)
        self.device = self.proc.device
        if self.proc.is_main and self.run_dir is not None:
            from zoo.training.runlock import hold

            hold(self.run_dir)  # one writer per run folder, from before anything is read or written
        if resume is not None and resume["step"] > cfg.train.steps:
            raise ConfigError(f"the run is at step {resume['step']}, past train.steps={cfg.train.steps}: resuming "
                              f"would rewrite its final checkpoint; give train.steps above {resume['step']} to "
                              "continue it")
        self.bf16 = self.configure_torch()
        if cfg.train.logger not in LOGGERS:
            raise ConfigError(f"train.logger={cfg.train.logger!r}; valid: {', '.join(LOGGERS)}")
        self.logger = RunLogger("jsonl", None, cfg)   # the chosen backend opens with the run folder (fit)
        self.last_grid = None                          # (images, labels) of the latest sample grid
        self.grid_accuracy: Optional[float] = None     # the judge's reading of the final grid (sample.judge=true)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every process
        self.method = build_method(cfg)
        self.set_up_method()
        self.model = self.build_model()
        self.ema = EMA(self.model, cfg.train.ema_decay, cfg.train.ema_warmup, self.method.unaveraged())
        self.phases = self.method.phases(self.model)
        self.optimizers, self.base_lr = self.build_optimizers()
        self.forward = self.wrap_for_processes()
        self.step = 0
        self.start_step, self.start_weight_norm = 0, 0.0
        self.loss_history: dict = {}  # each logged loss's recent magnitudes: what "far beyond its range" is measured by
        torch.manual_seed(cfg.train.seed * 1_000 + self.proc.rank + 1)  # per-process training noise
        if resume is not None:
            self.load_state(resume)
        self.dataset = build_dataset(cfg.data)
        self.loader = BatchLoader(self.dataset, cfg.data, cfg.train.batch_size, cfg.train.seed,
                                  self.proc.rank, self.proc.world_size)

    # ------------------------------------------------------------------ building
    def configure_torch(self) -> bool:
        """Threads and TF32 as the config asks; returns whether the step runs under bf16 autocast."""
        run = self.cfg.train
        if run.threads:
            torch.set_num_threads(run.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return run.precision == "bf16" or (run.precision == "auto" and self.device.type == "cuda")

    def set_up_method(self) -> None:
        """The method's frozen helpers, main process first: what setup trains and caches on first use (a teacher,
        a VAE, feature caches) is built once, and the other processes then find it in the cache."""
        if not self.proc.is_main:
            barrier(self.proc)
        self.method.setup(self.device, training=True)
        if self.proc.is_main:
            barrier(self.proc)

    def build_model(self):
        model = self.method.build_model().to(self.device)
        if self.proc.distributed and self.device.type == "cuda":
            # batch statistics over all processes; PyTorch's SyncBatchNorm has no CPU kernel, so on
            # CPU each process normalises with its own batch and DDP broadcasts rank 0's buffers
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def build_optimizers(self) -> tuple[dict, dict]:
        """One AdamW per phase, and each phase's peak learning rate (its own, or optim.lr)."""
        optim = self.cfg.optim
        if optim.schedule not in LR_SCHEDULES:
            raise ConfigError(f"optim.schedule={optim.schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        optimizers = {p.name: torch.optim.AdamW(p.parameters, lr=p.lr or optim.lr, betas=(optim.beta1, optim.beta2),
                                                weight_decay=optim.weight_decay) for p in self.phases}
        return optimizers, {p.name: p.lr or optim.lr for p in self.phases}

    def wrap_for_processes(self):
        """What a phase's losses run through: the model (its backbone compiled with train.compile, after the EMA
        copied it), or its DDP wrapper when there are several processes."""
        if self.cfg.train.compile:
            self.model.backbone.compile()
        if not self.proc.distributed:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        unused = len(self.phases) > 1 or not self.method.every_parameter_used
        return DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=unused)

    # ------------------------------------------------------------------ one step
    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_device(self, batch: dict) -> dict:
        from zoo.data import as_model_inputs

        return as_model_inputs({k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                                for k, v in batch.items()})

    def train_step(self, batch: dict) -> dict:
        """One optimizer step of every phase, its gradients summed over train.accumulate micro-batches; returns the
        logged values (means over the micro-batches) as tensors."""
        micros = self.micro_batches(self.to_device(batch))
        # one context per micro-batch: what a phase hands on (ctx.carry) reaches the next phase of the same images
        contexts = [TrainContext(self.step, self.ema.module, self.proc.rank, self.proc.world_size) for _ in micros]
        logs = {}
        for phase in self.phases:
            opt = self.optimizers[phase.name]
            for group in opt.param_groups:
                group["lr"] = self.base_lr[phase.name] * self.lr_factor()
            opt.zero_grad(set_to_none=True)
            values, total = self.backward_over(phase, micros, contexts)
            clip = self.cfg.optim.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(phase.parameters, clip if clip > 0 else math.inf)
            if not torch.isfinite(norm):
                raise self.diverged(f"the gradient norm of phase {phase.name!r} is {norm.item()}")
            opt.step()
            suffix = "" if len(self.phases) == 1 else f"/{phase.name}"
            logs.update(values)
            logs[f"loss{suffix}"] = total
            logs[f"grad_norm{suffix}"] = norm.detach()
        self.ema.update(self.model, self.step)
        self.step += 1
        return logs

    def micro_batches(self, batch: dict) -> list:
        """The process's batch in train.accumulate equal parts (one part: the batch itself)."""
        parts = self.cfg.train.accumulate
        if parts == 1:
            return [batch]
        size = len(batch["label"])
        if parts < 1 or size % parts:
            raise ConfigError(f"train.accumulate={parts} must divide the batch of each process ({size} images)")
        chunks = {k: v.split(size // parts) for k, v in batch.items() if torch.is_tensor(v)}
        return [{**batch, **{k: c[i] for k, c in chunks.items()}} for i in range(parts)]

    def backward_over(self, phase, micros: list, contexts: list) -> tuple[dict, torch.Tensor]:
        """Back-propagate the phase's weighted loss of each micro-batch, scaled by 1/parts so that the gradients
        sum to those of the whole batch; DDP all-reduces once, at the last part. Returns the mean values, total."""
        parts, values, total = len(micros), {}, 0.0
        for i, (micro, ctx) in enumerate(zip(micros, contexts)):
            last = i == parts - 1
            with contextlib.nullcontext() if last or not self.proc.distributed else self.forward.no_sync():
                with self.autocast():
                    terms = self.forward(phase.losses, micro, ctx)
                part = sum(term.weight * term.value.float() for term in terms.values())
                part_values = {name: term.value.detach().float() for name, term in terms.items()}
                self.check_finite(part_values, part)
                (part / parts).backward()
            for name, value in part_values.items():
                values[name] = values.get(name, 0.0) + value / parts
            total = total + part.detach() / parts
        return values, total

    def lr_factor(self) -> float:
        """The fraction of each phase's peak learning rate at this step: linear warm-up over optim.warmup_steps,
        then constant, or a cosine that reaches 0 at train.steps (optim.schedule)."""
        optim, steps = self.cfg.optim, self.cfg.train.steps
        warmup = optim.warmup_steps
        if warmup and self.step + 1 < warmup:
            return (self.step + 1) / warmup
        if optim.schedule == "cosine":
            progress = (self.step - warmup) / max(1, steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
        return 1.0

    def check_finite(self, values: dict, total: torch.Tensor) -> None:
        if torch.isfinite(total):
            return
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in values.items())
        raise self.diverged(f"the loss is not finite ({parts})")

    def check_health(self, logged: dict, remember: bool = True) -> None:
        """Stop before a diverging run is checkpointed: a loss far beyond its own typical size (median of its recent
        logged magnitudes, at least 1) is divergence even while it is finite (a loss of 1e6 becomes NaN a few
        steps later, and a checkpoint written in between would not resume)."""
        factor = self.cfg.train.divergence_factor
        for key, value in logged.items():
            if not key.startswith("loss"):
                continue
            if not math.isfinite(value):
                raise self.diverged(f"the logged {key} is {value}", self.step)
            history = self.loss_history.setdefault(key, [])
            typical = max(1.0, sorted(history)[len(history) // 2]) if history else 1.0
            if factor and abs(value) > factor * typical:
                raise self.diverged(f"the logged {key} is {value:.4g}, over {factor:g} times its typical size "
                                    f"{typical:.4g} (train.divergence_factor)", self.step)
            if remember:
                history.append(abs(value))
                del history[:-50]

    def weight_norm(self) -> float:
        return math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in self.model.parameters()))

    def check_weights(self) -> None:
        """Weights that are not finite, or whose norm grew by more than WEIGHT_GROWTH since this process started
        training, are never written to a checkpoint: an update blown up by a far too high learning rate moves every
        weight by about the learning rate, while the loss can look sane for a step or two longer."""
        for name, module in (("model", self.model), ("EMA", self.ema.module)):
            if not all(torch.isfinite(p).all() for p in module.parameters()):
                raise self.diverged(f"the {name} weights are not finite", self.step)
        start, norm = self.start_weight_norm, self.weight_norm()
        if self.cfg.train.divergence_factor and start and norm > WEIGHT_GROWTH * start:
            raise self.diverged(f"the weights' norm grew from {start:.4g} to {norm:.4g} (over {WEIGHT_GROWTH}x) "
                                f"since step {self.start_step}", self.step)

    def diverged(self, what: str, step: Optional[int] = None) -> TrainingDiverged:
        """The error that stops a diverged run at `step` (default: the step being computed)."""
        from zoo.training.checkpoint import latest_checkpoint

        last = latest_checkpoint(self.run_dir) if self.run_dir else None
        if last:
            kept = (f"the last checkpoint, {last}, was written before it (its losses and weights were checked); "
                    f"resume it with a lower learning rate: zoo train --resume {last} optim.lr=<lower>")
        else:
            kept = "no checkpoint had been written yet: start again with a lower optim.lr"
        return TrainingDiverged(f"training stopped at step {step or self.step + 1}: {what}; {kept} (or optim.grad_clip, "
                                "train.precision=fp32)")

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": FORMAT, "config": to_dict(self.cfg), "step": self.step,
                "model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "rng": all_gather_objects(rng, self.proc), "data": dataclasses.asdict(self.method.data)}

    def load_state(self, state: dict) -> None:
        load_model_weights(self.model, state["model"], state.get("path", "?"))
        load_model_weights(self.ema.module, state["ema"], state.get("path", "?"))
        for name, opt in self.optimizers.items():
            if name in state["optimizers"]:  # an imported checkpoint has none: fine-tuning starts them fresh
                opt.load_state_dict(state["optimizers"][name])
        self.step = state["step"]
        rngs = state.get("rng") or []
        if len(rngs) == self.proc.world_size:  # exact resume needs the same number of processes
            torch.set_rng_state(rngs[self.proc.rank]["cpu"])
            if "cuda" in rngs[self.proc.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(rngs[self.proc.rank]["cuda"], self.device)

    def save_checkpoint(self) -> Optional[Path]:
        self.check_weights()
        state = self.state()  # every process joins the RNG gather
        path = None
        if self.proc.is_main and self.run_dir is not None:
            path = checkpoint_path(self.run_dir, self.step)
            atomic_save(state, path)
        barrier(self.proc)
        return path

    # ------------------------------------------------------------------ outputs
    def sample_grid(self) -> Optional[Path]:
        sampling = self.cfg.sample
        if not self.proc.is_main or self.run_dir is None or sampling.num <= 0:
            return None
        model = self.ema.module if sampling.use_ema else self.model
        labels = class_grid_labels(sampling.num, self.method.data.num_classes)
        was_training = model.training
        model.eval()
        images = generate_from_config(self.method, model, labels, sampling, device=self.device)
        model.train(was_training)
        per_row = max(1, sampling.num // self.method.data.num_classes)
        path = save_grid(images, self.run_dir / "samples" / f"step_{self.step:07d}.png", nrow=per_row, scale=2)
        self.logger.image("samples", path, self.step)
        self.last_grid = (images, labels)
        return path

    def log(self, record: dict) -> None:
        if self.proc.is_main and self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.logger.scalars(record)

    def prepare_run_dir(self) -> None:
        if self.proc.is_main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.remove_partial_files()
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
            self.trim_metrics()
            record_start(self.run_dir, self.step, self.proc.world_size, str(self.device))
            self.logger = RunLogger(self.cfg.train.logger, self.run_dir, self.cfg)

    def remove_partial_files(self) -> None:
        """Temporary files of writes a killed process did not finish (this process holds the folder's lock, so
        no other writer is mid-write)."""
        for folder in (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "samples"):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)

    def trim_metrics(self) -> None:
        """Drop logged lines past the step training starts from: a run stopped after its last checkpoint
        logged steps that the resumed run logs again, and the loss curves would show both."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _logged_step(line) <= self.step]  # a half-written last line goes too
        if len(kept) != len(lines):  # rewritten whole or not at all: a kill here loses no history
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def window_means(self, window: dict, steps: int) -> dict:
        """Each logged value's mean over the window's steps and, with several processes, over the processes (every
        process reaches the same log steps, so all join the reduction)."""
        names = list(window)
        sums = torch.stack([window[k].double() for k in names]) / steps
        if self.proc.distributed:
            torch.distributed.all_reduce(sums)
            sums /= self.proc.world_size
        return dict(zip(names, sums.tolist()))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to cfg.train.steps, logging, checkpointing and sampling on the way. Returns the last logs."""
        from tqdm import tqdm

        run = self.cfg.train
        self.prepare_run_dir()
        self.model.train()
        # the progress bar is display only: nothing reads it (hence no mutation testing of its arguments)
        bar = tqdm(total=run.steps, initial=self.step, desc=self.cfg.method, unit="step",  # pragma: no mutate
                   dynamic_ncols=True, disable=not (self.progress and self.proc.is_main), mininterval=1.0)  # pragma: no mutate
        batches = self.loader.iterate(self.step)
        self.start_step, self.start_weight_norm = self.step, self.weight_norm()
        window, start, last = {}, time.perf_counter(), {}
        window_start, window_steps = start, 0
        while self.step < run.steps:
            logs = self.train_step(next(batches))
            window_steps += 1
            for k, v in logs.items():  # summed where they live: the host waits for them once per log line
                window[k] = window.get(k, 0.0) + v.detach()
            bar.update(1)  # pragma: no mutate
            if self.step % run.log_every == 0 or self.step == run.steps:
                now = time.perf_counter()
                last = {"step": self.step, **self.window_means(window, window_steps),
                        "lr": self.optimizers[self.phases[0].name].param_groups[0]["lr"],
                        "steps_per_sec": window_steps / (now - window_start),
                        "images_per_sec": window_steps * run.batch_size / (now - window_start), "elapsed": now - start}
                self.log(last)
                self.check_health(last)
                shown = "loss" if "loss" in last else "flow"  # methods with several updates log loss/<part>
                if shown in last:
                    bar.set_postfix({shown: f"{last[shown]:.4f}"}, refresh=False)  # pragma: no mutate
                window, window_start, window_steps = {}, now, 0
            if run.ckpt_every and self.step % run.ckpt_every == 0 and self.step < run.steps:
                if window_steps:  # steps not logged yet: checked before they are saved
                    self.check_health(self.window_means(window, window_steps), remember=False)
                self.save_checkpoint()
            if run.sample_every and self.step % run.sample_every == 0 and self.step < run.steps:
                self.sample_grid()
        bar.close()
        self.save_checkpoint()
        self.sample_grid()
        if self.cfg.sample.judge and self.last_grid is not None:
            from zoo.eval.judge import judge_accuracy

            self.grid_accuracy = judge_accuracy(self.cfg.data, *self.last_grid)
        self.logger.close()
        if self.proc.is_main and self.run_dir is not None:
            from zoo.training.runlock import release

            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "losses.png")
            release(self.run_dir)
        return last


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
