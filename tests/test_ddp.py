"""Two CPU processes with gloo: gradients are averaged, so every process ends with the same weights."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, method: str = "sit", overrides: tuple = ()) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from zoo.config import load_config
    from zoo.training.trainer import Trainer

    cfg = load_config(method, ["preset=micro", "train.device=cpu", "train.steps=3", "sample.num=0", *overrides])
    trainer = Trainer(cfg, run_dir=os.path.join(out_dir, "run"), progress=False)
    initial = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.fit()
    final = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save({"initial": initial, "final": final}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


from zoo.training.registry import available_methods

SINGLE_PHASE = [name for name, cls in available_methods().items()   # REPA-E's three phases: the test below
                if cls.__module__.startswith("methods.") and name != "repa_e"]


@pytest.mark.parametrize("method", SINGLE_PHASE)
def test_two_process_gloo_training_keeps_replicas_identical(tmp_path, method):
    """Every single-phase method uses every parameter in its forward: DDP runs without searching for unused ones
    (it would stop with an error at the second step otherwise)."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), method), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["initial"], r1["initial"])
    assert not torch.equal(r0["initial"], r0["final"])
    assert torch.allclose(r0["final"], r1["final"], atol=1e-6)
    # only the main process writes the run folder
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000003.pt"]


def test_two_process_gloo_training_of_repa_e_keeps_its_three_updates_in_step(tmp_path):
    """REPA-E's VAE, discriminator and SiT updates, BatchNorm included, stay identical across processes."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), "repa_e"), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["initial"], r1["initial"]) and not torch.equal(r0["initial"], r0["final"])
    assert torch.allclose(r0["final"], r1["final"], atol=1e-5)


def test_two_process_gloo_training_with_accumulation_all_reduces_the_summed_gradients(tmp_path):
    """train.accumulate=2 under DDP: the first micro-batch's backward skips the all-reduce (no_sync), the last one
    reduces the sum; the replicas stay identical."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), "sit", ("train.accumulate=2",)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["initial"], r0["final"])
    assert torch.allclose(r0["final"], r1["final"], atol=1e-6)


def _averaging_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Each process logs its own loss (rank + 1): the metrics line holds their mean."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from zoo.config import load_config
    from zoo.training.trainer import Trainer

    cfg = load_config("sit", ["preset=micro", "train.device=cpu", "train.steps=2", "train.log_every=1",
                              "sample.num=0"])
    trainer = Trainer(cfg, run_dir=os.path.join(out_dir, "run"), progress=False)
    real = trainer.train_step
    trainer.train_step = lambda batch: {**real(batch), "loss": torch.tensor(float(rank + 1))}
    trainer.fit()
    torch.distributed.destroy_process_group()


def test_logged_values_are_means_over_the_processes(tmp_path):
    from zoo.figures import read_metrics

    mp.spawn(_averaging_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1.5, 1.5]
