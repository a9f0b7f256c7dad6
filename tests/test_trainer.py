"""The trainer: exact resume, divergence handling, atomic checkpoints, EMA."""
import math

import pytest
import torch

from zoo.training.checkpoint import atomic_save, latest_checkpoint, load_checkpoint
from zoo.training.ema import EMA
from zoo.errors import CheckpointError, ConfigError, TrainingDiverged
from zoo.figures import read_metrics
from zoo.training.trainer import Trainer


def test_resume_continues_exactly(micro_cfg, tmp_path):
    cfg = micro_cfg("sit", "train.steps=6", "train.ckpt_every=3", "sample.num=0")
    straight = Trainer(cfg, run_dir=tmp_path / "a", progress=False)
    straight.fit()

    first = Trainer(micro_cfg("sit", "train.steps=3", "sample.num=10"), run_dir=tmp_path / "b", progress=False)
    first.fit()  # also samples a grid at the end, which must not disturb the RNG
    resumed = Trainer(cfg, run_dir=tmp_path / "b", resume=load_checkpoint(tmp_path / "b"), progress=False)
    assert resumed.step == 3
    resumed.fit()

    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")}
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    for (k, va), vb in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(va, vb), k
    for va, vb in zip(straight.ema.module.state_dict().values(), resumed.ema.module.state_dict().values()):
        assert torch.equal(va, vb)


def test_resume_from_an_earlier_checkpoint_logs_each_step_once(micro_cfg, tmp_path):
    cfg = micro_cfg("sit", "train.steps=5", "train.ckpt_every=3", "train.log_every=1", "sample.num=0")
    Trainer(cfg, run_dir=tmp_path, progress=False).fit()  # logs 1..5, checkpoints at 3 and 5
    # as if stopped after step 5 but before its checkpoint landed: resume from step 3
    resumed = Trainer(cfg, run_dir=tmp_path, resume=load_checkpoint(tmp_path / "checkpoints" / "step_0000003.pt"),
                      progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # and a line half written when it stopped
    resumed.fit()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(micro_cfg, tmp_path, monkeypatch):
    from methods.sit import SiT

    calls = {"n": 0}
    original = SiT.flow_loss

    def flaky(self, velocity, target):
        calls["n"] += 1
        loss = original(self, velocity, target)
        return loss * math.nan if calls["n"] == 3 else loss

    monkeypatch.setattr(SiT, "flow_loss", flaky)
    trainer = Trainer(micro_cfg("sit", "train.steps=5", "train.ckpt_every=1"), run_dir=tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match="step 3.*not finite.*flow=nan.*step_0000002.pt"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step_0000002.pt"
    state = load_checkpoint(tmp_path)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.dtype.is_floating_point)


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_corrupt_and_missing_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"bad.pt is damaged: not a torch.save archive"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match="not a repa-zoo checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        load_checkpoint(tmp_path)


def test_ema_update_is_a_lerp_with_warmup():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.99, warmup=True)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)
    d = min(0.99, 1 / 10)
    assert torch.allclose(ema.module.weight, d * start + (1 - d) * model.weight)
    assert EMA(model, 0.99).decay_at(0) == 0.99 and not ema.module.weight.requires_grad


def test_gradients_are_clipped_to_optim_grad_clip_and_the_logged_norm_is_before_clipping(micro_cfg):
    from zoo.training.trainer import Trainer

    def norm_at_the_optimizer_step(clip):
        """(the gradient norm the optimizer steps with, the logged grad_norm) of one step."""
        trainer = Trainer(micro_cfg("sit", f"optim.grad_clip={clip}"), run_dir=None, progress=False)
        opt, seen = trainer.optimizers["model"], {}
        real_step = opt.step

        def step(*args, **kwargs):
            grads = [p.grad for p in trainer.phases[0].parameters if p.grad is not None]
            seen["norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
            return real_step(*args, **kwargs)

        opt.step = step
        logs = trainer.train_step(next(trainer.loader.iterate(0)))
        return seen["norm"], logs["grad_norm"].item()

    stepped, logged = norm_at_the_optimizer_step(0.001)
    assert stepped == pytest.approx(0.001, rel=1e-3)    # clipped to the bound
    assert logged > 0.01                                # the norm before clipping is what is logged
    stepped, logged = norm_at_the_optimizer_step(0)
    assert stepped == pytest.approx(logged, rel=1e-4) and logged > 0.01   # 0: no clipping at all


def test_warmup_ramps_the_learning_rate_linearly_from_the_first_step(micro_cfg):
    from zoo.training.trainer import Trainer

    trainer = Trainer(micro_cfg("sit", "optim.lr=1e-3", "optim.warmup_steps=4"), run_dir=None, progress=False)
    batches = trainer.loader.iterate(0)
    lrs = []
    for _ in range(6):
        trainer.train_step(next(batches))
        lrs.append(trainer.optimizers["model"].param_groups[0]["lr"])
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    flat = Trainer(micro_cfg("sit", "optim.lr=1e-3"), run_dir=None, progress=False)
    flat.train_step(next(flat.loader.iterate(0)))
    assert flat.optimizers["model"].param_groups[0]["lr"] == 1e-3


def test_ema_warmup_is_used_by_the_trainer(micro_cfg):
    from zoo.training.trainer import Trainer

    trainer = Trainer(micro_cfg("sit", "train.ema_decay=0.999", "train.ema_warmup=true"), run_dir=None, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(next(trainer.loader.iterate(0)))
    decay = 1 / 10                                               # min(0.999, (1 + 0) / (10 + 0))
    live, ema = trainer.model.state_dict(), trainer.ema.module.state_dict()
    key = "backbone.final_layer.linear.weight"
    assert torch.allclose(ema[key], before[key] * decay + live[key] * (1 - decay), atol=1e-7)


def test_fit_logs_window_means_checkpoints_and_samples_on_schedule(micro_cfg, tmp_path, monkeypatch):
    """log_every, ckpt_every and sample_every with steps they do not divide: each lands on its multiples and on
    the last step; a metrics line holds the mean of its window's logs, the learning rate and the timing."""
    cfg = micro_cfg("sit", "train.steps=5", "train.log_every=2", "train.ckpt_every=2", "train.sample_every=2",
                    "sample.num=2")
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False)
    real_step = trainer.train_step

    def step(batch):
        real_step(batch)
        return {"loss": torch.tensor(float(trainer.step)), "flow": torch.tensor(2.0 * trainer.step)}

    monkeypatch.setattr(trainer, "train_step", step)
    saved, sampled = [], []
    real_save, real_grid = trainer.save_checkpoint, trainer.sample_grid
    monkeypatch.setattr(trainer, "save_checkpoint", lambda: saved.append(trainer.step) or real_save())
    monkeypatch.setattr(trainer, "sample_grid", lambda: sampled.append(trainer.step) or real_grid())
    last = trainer.fit()
    assert saved == sampled == [2, 4, 5]          # the last step once, not twice
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 5]
    assert [r["loss"] for r in records] == [1.5, 3.5, 5.0] and [r["flow"] for r in records] == [3.0, 7.0, 10.0]
    assert all(r["lr"] == cfg.optim.lr and r["steps_per_sec"] > 0 for r in records)
    assert records[0]["elapsed"] < records[1]["elapsed"] < records[2]["elapsed"]
    # steps/s of each window: its steps over its own seconds (the first window starts with the run)
    windows = [(2, records[0]["elapsed"]), (2, records[1]["elapsed"] - records[0]["elapsed"]),
               (1, records[2]["elapsed"] - records[1]["elapsed"])]
    assert [r["steps_per_sec"] for r in records] == pytest.approx([n / sec for n, sec in windows], rel=1e-3)
    assert [r["images_per_sec"] for r in records] == pytest.approx([r["steps_per_sec"] * cfg.train.batch_size
                                                                    for r in records], rel=1e-9)
    assert last == records[-1]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_0000002.pt", "step_0000004.pt", "step_0000005.pt"]
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]
    assert (tmp_path / "run" / "losses.png").exists()


def test_the_training_context_carries_step_ema_rank_and_world_size(micro_cfg, monkeypatch):
    trainer = Trainer(micro_cfg("sit"), run_dir=None, progress=False)
    seen = []
    real = trainer.phases[0].losses
    trainer.phases[0].losses = lambda model, batch, ctx: seen.append(ctx) or real(model, batch, ctx)
    batches = trainer.loader.iterate(0)
    trainer.train_step(next(batches))
    trainer.train_step(next(batches))
    assert [c.step for c in seen] == [0, 1]
    assert all(c.ema is trainer.ema.module and (c.rank, c.world_size) == (0, 1) for c in seen)


def test_a_non_finite_gradient_or_loss_stops_with_a_line_naming_it(micro_cfg, monkeypatch):
    trainer = Trainer(micro_cfg("sit"), run_dir=None, progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.tensor(float("inf")))
    with pytest.raises(TrainingDiverged, match="the gradient norm of phase 'model' is inf; no checkpoint had been "
                                               "written yet"):
        trainer.train_step(next(trainer.loader.iterate(0)))
    with pytest.raises(TrainingDiverged, match=r"the loss is not finite \(flow=nan, repa=1\)"):
        trainer.check_finite({"flow": torch.tensor(float("nan")), "repa": torch.tensor(1.0)}, torch.tensor(float("nan")))


def test_ema_warmup_decay_grows_with_the_step():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.999, warmup=True)
    assert [ema.decay_at(s) for s in (0, 5, 90)] == pytest.approx([0.1, 0.4, 0.91])
    assert ema.decay_at(10_000) == 0.999 and EMA(torch.nn.Linear(2, 2), 0.999).decay_at(5) == 0.999


def test_a_last_step_on_the_schedule_is_checkpointed_and_sampled_once(micro_cfg, tmp_path, monkeypatch):
    cfg = micro_cfg("sit", "train.steps=4", "train.log_every=2", "train.ckpt_every=2", "train.sample_every=2",
                    "sample.num=2")
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False)
    saved, sampled = [], []
    real_save, real_grid = trainer.save_checkpoint, trainer.sample_grid
    monkeypatch.setattr(trainer, "save_checkpoint", lambda: saved.append(trainer.step) or real_save())
    monkeypatch.setattr(trainer, "sample_grid", lambda: sampled.append(trainer.step) or real_grid())
    trainer.fit()
    assert saved == sampled == [2, 4]


def test_fit_without_a_run_folder_trains_and_writes_nothing(micro_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(micro_cfg("sit", "train.steps=2", "train.log_every=1"), run_dir=None, progress=False)
    last = trainer.fit()
    assert last["step"] == 2 and trainer.step == 2 and not any(tmp_path.iterdir())


def test_the_cosine_schedule_follows_the_warmup_and_decays_to_zero_at_train_steps(micro_cfg):
    import math

    trainer = Trainer(micro_cfg("sit", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=cosine",
                                "train.steps=6"), run_dir=None, progress=False)
    batches = trainer.loader.iterate(0)
    lrs = []
    for _ in range(6):
        trainer.train_step(next(batches))
        lrs.append(trainer.optimizers["model"].param_groups[0]["lr"])
    # warm-up 1/2, 2/2; then 0.5 (1 + cos(pi (s - 2) / 4)) at steps s = 2..5 (the last update before step 6)
    expected = [5e-4, 1e-3, *(1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6))]
    assert lrs == pytest.approx(expected)
    with pytest.raises(ConfigError, match=r"optim.schedule='linear'; valid: constant, cosine"):
        Trainer(micro_cfg("sit", "optim.schedule=linear"), run_dir=None, progress=False)


def test_each_start_of_a_run_records_its_command_code_and_versions(micro_cfg, tmp_path, monkeypatch):
    import json
    import re

    monkeypatch.setattr("sys.argv", ["zoo", "train", "--method", "sit"])
    Trainer(micro_cfg("sit", "train.steps=2", "sample.num=0"), run_dir=tmp_path / "run", progress=False).fit()
    resumed = Trainer(micro_cfg("sit", "train.steps=3", "sample.num=0"), run_dir=tmp_path / "run",
                      resume=load_checkpoint(tmp_path / "run"), progress=False)
    resumed.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "provenance.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2]
    assert lines[0]["command"] == ["zoo", "train", "--method", "sit"] and lines[0]["world_size"] == 1
    assert lines[0]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        lines[0]["versions"]["torch"] == torch.__version__
    assert lines[0]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", lines[0]["commit"])
    assert lines[0]["device"] == "cpu"


def test_accumulating_micro_batches_makes_the_update_of_the_whole_batch(micro_cfg, monkeypatch):
    """train.accumulate=2: the same batch in two halves gives the same gradients, update, EMA and logged means as in
    one piece (the noise a function of each image here, so that both draw the same per-sample t and eps)."""
    def noise(x):
        return torch.sigmoid(x.mean(dim=(1, 2, 3)) * 5), torch.sin(7 * x)

    trainers = []
    for parts in (1, 2):
        trainer = Trainer(micro_cfg("sit", "model.class_dropout=0", f"train.accumulate={parts}", "optim.grad_clip=0"),
                          run_dir=None, progress=False)
        monkeypatch.setattr(trainer.method, "noise", noise)
        trainer.sizes, real = [], trainer.phases[0].losses
        trainer.phases[0].losses = lambda model, batch, ctx, t=trainer, real=real: \
            t.sizes.append(len(batch["label"])) or real(model, batch, ctx)
        trainer.logs = trainer.train_step(next(trainer.loader.iterate(0)))
        trainers.append(trainer)
    whole, halves = trainers
    assert whole.sizes == [8] and halves.sizes == [4, 4]
    assert halves.logs["flow"] == pytest.approx(float(whole.logs["flow"]), rel=1e-5)
    assert halves.logs["grad_norm"] == pytest.approx(float(whole.logs["grad_norm"]), rel=1e-4)
    for (name, a), b in zip(whole.model.state_dict().items(), halves.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(ConfigError, match=r"train.accumulate=3 must divide train.batch_size=8"):
        micro_cfg("sit", "train.accumulate=3")  # refused when the config is resolved


def test_tensorboard_gets_every_logged_value_and_the_sample_grids(micro_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = micro_cfg("sit", "train.steps=4", "train.log_every=2", "train.sample_every=2", "sample.num=2",
                    "train.logger=tensorboard")
    Trainer(cfg, run_dir=tmp_path / "run", progress=False).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"loss", "flow", "lr", "steps_per_sec"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert [e.step for e in events.Images("samples")] == [2, 4]


def test_an_unknown_or_missing_logger_is_one_line(micro_cfg, monkeypatch):
    import builtins

    with pytest.raises(ConfigError, match=r"train.logger='neptune'; valid: jsonl, tensorboard, wandb"):
        Trainer(micro_cfg("sit", "train.logger=neptune"), run_dir=None, progress=False)
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real_import(name, *a, **k))
    from zoo.training.loggers import RunLogger

    with pytest.raises(ConfigError, match=r"train.logger=wandb needs the wandb package: pip install wandb"):
        RunLogger("wandb", "/tmp/x", micro_cfg("sit"))
