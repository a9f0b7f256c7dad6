"""The trainer: exact resume, divergence handling, atomic checkpoints, EMA."""
import math

import pytest
import torch

from zoo.checkpoint import atomic_save, latest_checkpoint, load_checkpoint
from zoo.ema import EMA
from zoo.errors import CheckpointError, TrainingDiverged
from zoo.images import read_metrics
from zoo.trainer import Trainer


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
    with pytest.raises(CheckpointError, match=r"bad.pt is corrupt"):
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
