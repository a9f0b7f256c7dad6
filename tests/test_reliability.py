"""The promises of docs/reliability.md: one writer per run folder, divergence caught before it is saved, every bad
value one clear line, metrics rewritten atomically, damaged checkpoints refused."""
import json
import re
import subprocess
import sys
import time

import pytest
import torch

from zoo.cli import main
from zoo.config import load_config
from zoo.errors import CheckpointError, DataError, TrainingDiverged
from zoo.training.checkpoint import load_checkpoint
from zoo.training.trainer import Trainer

MICRO = ["preset=micro", "train.device=cpu", "sample.num=0"]


def zoo(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=timeout)


def metric_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- one writer
def hold_in_another_process(run):
    """A process that holds the run folder's lock until killed (as a training process would)."""
    code = ("import sys, time; from zoo.training.runlock import hold; hold(sys.argv[1]); print('held', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    Trainer(load_config("sit", [*MICRO, "train.steps=2"]), run_dir=run, progress=False).fit()
    before = (run / "metrics.jsonl").read_text()
    holder = hold_in_another_process(run)
    try:
        out = zoo("train", "--resume", str(run), "train.steps=4", "optim.lr=3e-4")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert re.search(r"run folder .*run is being written by pid \d+ on .*: .*-c", out.stderr), out.stderr
        assert (run / "metrics.jsonl").read_text() == before  # nothing written, nothing interleaved
    finally:
        holder.kill()
        holder.wait()
    # the operating system dropped the killed holder's lock: the run resumes
    out = zoo("train", "--resume", str(run), "train.steps=4")
    assert out.returncode == 0, out.stderr
    assert metric_steps(run) == [1, 2, 3, 4]


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    args = ["train", "--method", "sit", "--preset", "micro", "train.device=cpu", "train.steps=2", "sample.num=0",
            f"train.out_dir={tmp_path}", "train.run_name=same"]
    procs = [subprocess.Popen([sys.executable, "-m", "zoo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["same", "same-2", "same-3"]
    for name in folders:  # each folder holds one run's log, not an interleaving of several
        assert metric_steps(tmp_path / name) == [1, 2]


# ---------------------------------------------------------------- divergence
def test_a_diverging_run_stops_before_saving_and_the_named_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    Trainer(load_config("sit", [*MICRO, "train.steps=4", "train.ckpt_every=2"]), run_dir=run, progress=False).fit()
    diverging = load_config("sit", [*MICRO, "train.steps=40", "train.ckpt_every=1", "optim.lr=100"])
    with pytest.raises(TrainingDiverged) as err:
        Trainer(diverging, run_dir=run, resume=load_checkpoint(run), progress=False).fit()
    message = str(err.value)
    named = re.search(r"the last checkpoint, (\S+), was written before it", message).group(1)
    assert "optim.lr=<lower>" in message
    # every checkpoint in the folder was checked when written: finite weights, and the named one resumes
    for path in sorted((run / "checkpoints").glob("*.pt")):
        state = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path
    state = load_checkpoint(named)
    healthy = load_config("sit", [*MICRO, f"train.steps={state['step'] + 6}", "optim.lr=1e-3"])
    last = Trainer(healthy, run_dir=run, resume=state, progress=False).fit()
    assert torch.isfinite(torch.tensor(last["loss"])) and last["loss"] < 10


def test_the_divergence_rule_reads_the_loss_against_its_own_size(micro_cfg):
    trainer = Trainer(micro_cfg("sit"), run_dir=None, progress=False)
    for value in (2.0, 1.5, 1.2, 1.1):
        trainer.check_health({"loss": value})
    trainer.check_health({"loss": 90.0, "grad_norm": 1e9})  # within 100x of typical (>= 1); grad norms are not losses
    with pytest.raises(TrainingDiverged, match=r"the logged loss is 1\.2e\+04, over 100 times its typical size"):
        trainer.check_health({"loss": 1.2e4})
    with pytest.raises(TrainingDiverged, match="the logged loss/vae is nan"):
        trainer.check_health({"loss/vae": float("nan")})
    off = Trainer(micro_cfg("sit", "train.divergence_factor=0"), run_dir=None, progress=False)
    off.check_health({"loss": 1e12})


# ---------------------------------------------------------------- bad values: one line each
BAD_VALUES = {
    "optim.lr=-1": "optim.lr=-1.0: it must be > 0",
    "train.batch_size=0": "train.batch_size=0: it must be > 0",
    "train.batch_size=-8": "train.batch_size=-8: it must be > 0",
    "train.steps=0": "train.steps=0: it must be > 0",
    "train.steps=-5": "train.steps=-5: it must be > 0",
    "train.ema_decay=1.5": "train.ema_decay=1.5: it must be in [0, 1)",
    "model.patch=3": "model.patch=3 does not divide the diffusion state's size 32",
    "sample.cfg_interval=[0.8,0.2]": "sample.cfg_interval=[0.8, 0.2]",
    "sample.cfg_scale=0.5": "sample.cfg_scale=0.5: it must be >= 1 (1 = no guidance)",   # would guide nothing
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_bad_value_is_one_line_and_writes_nothing(override, dry_run, tmp_path, capsys):
    args = ["train", "--method", "sit", "--preset", "micro", "train.device=cpu", f"train.out_dir={tmp_path}", override]
    assert main([*args, *(["--dry-run"] if dry_run else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and BAD_VALUES[override] in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # no step-0 checkpoint, no grid, no folder


def test_an_encoder_weights_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "dinov2.pth"
    bad.write_text("<html>not found</html>")
    code = main(["train", "--method", "repa", "--preset", "micro", "train.device=cpu", f"train.out_dir={tmp_path}",
                 "repa.encoder=dinov2-vit-s", f"repa.encoder_weights={bad}", "train.steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and f"encoder weights {bad} are not a readable weights file" in err
    assert len(err.strip().splitlines()) == 1


def one_error_line(err: str) -> bool:
    """The run's own info lines may come first; the problem is one `error:` line and no traceback."""
    return "Traceback" not in err and sum(line.startswith("error: ") for line in err.splitlines()) == 1 \
        and err.strip().splitlines()[-1].startswith("error: ")


def test_a_read_only_folder_and_a_full_disk_are_one_line(tmp_path, capsys, monkeypatch):
    args = ["train", "--method", "sit", "--preset", "micro", "train.device=cpu", "train.steps=1", "sample.num=0"]

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.run_dir / "config.yaml"))

    # the folder is refused as a read-only mount refuses it (as root, chmod would not stop this process)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "prepare_run_dir", refuse)
        assert main([*args, f"train.out_dir={tmp_path / 'ro'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "config.yaml: Permission denied" in err and one_error_line(err)

    # torch's zip writer reports a full disk as "unexpected pos"; the zoo names the disk and the file
    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: unexpected pos 64 vs 0")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full)
        assert main([*args, f"train.out_dir={tmp_path / 'full'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: the disk is full: writing \S+step_0000001.pt failed with \d+ MiB free", err), err
    assert one_error_line(err)
    assert not list((tmp_path / "full").rglob("*.tmp"))  # the partial file is gone


def test_resuming_below_the_current_step_is_refused(tmp_path):
    run = tmp_path / "run"
    Trainer(load_config("sit", [*MICRO, "train.steps=3"]), run_dir=run, progress=False).fit()
    out = zoo("train", "--resume", str(run), "train.steps=2")
    assert out.returncode == 2 and "the run is at step 3, past train.steps=2" in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003.pt"]


# ---------------------------------------------------------------- files
def test_a_kill_during_the_metrics_rewrite_loses_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(load_config("sit", [*MICRO, "train.steps=6", "train.ckpt_every=3"]), run_dir=run, progress=False).fit()
    history = (run / "metrics.jsonl").read_text()
    early = load_checkpoint(run / "checkpoints" / "step_0000003.pt")
    import zoo.training.checkpoint as checkpoint

    def killed(src, dst):  # the process dies after writing the trimmed copy, before it replaces the log
        if str(dst).endswith("metrics.jsonl"):
            raise KeyboardInterrupt
        return real(src, dst)

    real = checkpoint.os.replace
    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config("sit", [*MICRO, "train.steps=6"]), run_dir=run, resume=early, progress=False).fit()
    monkeypatch.undo()
    assert (run / "metrics.jsonl").read_text() == history  # the whole log, not a truncated one
    assert not list(run.glob(".*.tmp"))
    # and the resume after the kill trims it properly
    Trainer(load_config("sit", [*MICRO, "train.steps=6"]), run_dir=run, resume=early, progress=False).fit()
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]


def test_leftover_temporary_files_are_removed_when_a_run_starts(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    leftover = run / "checkpoints" / ".step_0000002.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    Trainer(load_config("sit", [*MICRO, "train.steps=1"]), run_dir=run, progress=False).fit()
    assert not leftover.exists()


def flip_byte(path, where: float = 0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_byte_flipped_checkpoint_is_refused_and_the_intact_one_named(tmp_path):
    run = tmp_path / "run"
    Trainer(load_config("sit", [*MICRO, "train.steps=4", "train.ckpt_every=2"]), run_dir=run, progress=False).fit()
    latest = run / "checkpoints" / "step_0000004.pt"
    flip_byte(latest)
    with pytest.raises(CheckpointError, match=r"step_0000004.pt is damaged: the CRC of \S+ does not match"):
        load_checkpoint(latest)
    out = zoo("train", "--resume", str(run), "train.steps=6")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "step_0000004.pt is damaged" in out.stderr
    assert f"the newest intact checkpoint of the run is {run / 'checkpoints' / 'step_0000002.pt'}" in out.stderr
    out = zoo("train", "--resume", str(run / "checkpoints" / "step_0000002.pt"), "train.steps=6")
    assert out.returncode == 0, out.stderr


def test_data_verify_names_every_unreadable_image_before_the_first_step(tmp_path):
    from test_store import write_imagenet_like

    images = write_imagenet_like(tmp_path / "train")
    (images / "n01440764" / "n01440764_8.JPEG").write_bytes(b"truncated")
    cfg = load_config("sit", [*MICRO, "data.dataset=folder", f"data.root={images}", "data.num_classes=3",
                              "data.verify=true", "train.batch_size=4"])
    with pytest.raises(DataError, match=r"2 of the 14 images in \S+ cannot be read: cannot read image \S+_8.JPEG.*_9"):
        Trainer(cfg, run_dir=None, progress=False)


def test_a_seed_spread_below_the_tables_decimals_is_written_out():
    """On the micro preset two seeds' FIDs differ by 1e-5 (their untrained samples all look alike to the judge): the
    table must not print that as '± 0.0000', which reads as one seed run twice."""
    from zoo.compare.report import cell

    assert cell([1.5237009, 1.5236903]) == "1.5237 ± 5.3e-06"
    assert cell([0.1, 0.1]) == "0.1000 ± 0.0000"
    assert cell([0.5, 0.6]) == "0.5500 ± 0.0500"


def test_an_evaluation_record_and_a_grid_interrupted_mid_write_leave_the_old_file(tmp_path, monkeypatch):
    """A comparison reads RUN/eval/*.json back as its numbers: a kill while one is rewritten must not leave half
    a file (which would break every later report), and neither may a grid or a plot."""
    import os

    from PIL import Image

    from zoo.eval import evaluate
    from zoo.figures import save_grid

    grid = tmp_path / "grid.png"
    save_grid(torch.zeros(4, 3, 8, 8), grid, nrow=2)
    before = grid.read_bytes()

    def dies_half_way(self, fp, format=None, **kw):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt  # as a kill arrives

    monkeypatch.setattr(Image.Image, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_grid(torch.ones(4, 3, 8, 8), grid, nrow=2)
    assert grid.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]

    record = tmp_path / "eval" / "step_0000004-judge.json"
    record.parent.mkdir()
    record.write_text('{"metrics": {"fid": 0.5}}\n')
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))  # killed before the rename
    with pytest.raises(KeyboardInterrupt):
        evaluate.atomic_write_text(record, json.dumps({"metrics": {"fid": 0.4}}))  # the writer of evaluation records
    assert json.loads(record.read_text()) == {"metrics": {"fid": 0.5}}
    assert [p.name for p in record.parent.iterdir()] == [record.name]
