"""`zoo compare`: a tiny two-method comparison whose table, CSV and plot agree with the per-run records,
that resumes without redoing finished work, and that refuses unequal budgets."""
import csv
import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from zoo.training import registry
from zoo.compare.runner import Comparison, record_name, run_comparison, run_config
from zoo.compare.report import cell, steps_to_reach
from zoo.errors import ConfigError
from zoo.eval.evaluate import PROTOCOL, Evaluator
from zoo.training.method import Method


class Doubled(Method):
    """A throwaway second method: the flow loss counted twice (a different optimisation path)."""
    name = "doubled_for_test"
    description = "test only"

    def flow_loss(self, velocity, target):
        return 2 * super().flow_loss(velocity, target)


@pytest.fixture
def second_method():
    registry.discover()
    registry.register(Doubled)  # registered inside the test so the shared contract never sees it
    yield Doubled.name
    registry._METHODS.pop(Doubled.name, None)


def comparison(out, judge, methods, **kw):
    settings = dataclasses.replace(PROTOCOL, num_samples=20, steps=2, batch_size=10, weights=str(judge),
                                   reference_num=40)
    return Comparison(methods=methods, steps=4, eval_every=2, out=out, seeds=[0, 1], preset="micro",
                      overrides=["train.device=cpu"], settings=settings, device="cpu", **kw)


def read_records(out):
    records = {}
    for path in (out / "runs").glob("*/eval/step_*.json"):
        rec = json.loads(path.read_text())
        records[(rec["method"], rec["train_seed"], rec["step"])] = rec
    return records


def test_two_method_comparison_writes_consistent_outputs_and_resumes(tmp_path, tiny_judge, zoo_cache, second_method,
                                                                    monkeypatch):
    out = tmp_path / "cmp"
    run_comparison(comparison(out, tiny_judge, ["sit", second_method]))
    for name in ("table.md", "results.csv", "fid_vs_steps.png", "samples_sit.png", f"samples_{second_method}.png"):
        assert (out / name).stat().st_size > 0, name
    assert Image.open(out / "fid_vs_steps.png").size[0] > 100

    records = read_records(out)
    assert len(records) == 2 * 2 * 2  # methods x seeds x evaluation points
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(records)
    for row in rows:
        m = records[(row["method"], int(row["seed"]), int(row["step"]))]["metrics"]
        for key in ("fid", "kid_mean", "precision", "recall", "class_accuracy"):
            assert float(row[key]) == m[key]

    table = (out / "table.md").read_text()
    for method in ("sit", second_method):
        line = next(l for l in table.splitlines() if l.startswith(f"| {method} |") and "ms/step" not in l)
        for step in (2, 4):
            fids = [records[(method, seed, step)]["metrics"]["fid"] for seed in (0, 1)]
            assert cell(fids) in line
    assert "Differences larger than the seed spread" in table
    sit_cfg = run_config(comparison(out, tiny_judge, ['sit']), 'sit', 0)
    embedding = f"{sit_cfg.model.time_scale:g} t"  # SiT embeds the noise-convention t, scaled
    assert f"| sit | {sit_cfg.flow.time} | {embedding} | none | pixels |" in table

    # a second invocation finds everything done: no training, no sampling
    from zoo.training.trainer import Trainer
    from zoo.eval import evaluate

    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("retrained a finished run"))
    monkeypatch.setattr(evaluate, "sample_uint8", lambda *a, **k: pytest.fail("re-evaluated a finished point"))
    run_comparison(comparison(out, tiny_judge, ["sit", second_method]))
    assert (out / "table.md").read_text().split("this invocation")[0] == table.split("this invocation")[0]
    monkeypatch.undo()

    # an interrupted run: its last checkpoint and evaluation are gone; it resumes and gets the same numbers
    run = out / "runs" / "sit-seed1"
    (run / "checkpoints" / "step_0000004.pt").unlink()
    for path in (run / "eval").glob("step_0000004-*"):
        path.unlink()
    run_comparison(comparison(out, tiny_judge, ["sit", second_method]))
    again = read_records(out)
    assert again[("sit", 1, 4)]["metrics"] == records[("sit", 1, 4)]["metrics"]
    assert again[("sit", 1, 2)]["time"] == records[("sit", 1, 2)]["time"]  # not recomputed


def test_resuming_with_other_settings_is_refused(tmp_path, tiny_judge, zoo_cache):
    out = tmp_path / "cmp"
    comp = comparison(out, tiny_judge, ["sit"])
    comp.seeds, comp.steps = [0], 2
    run_comparison(comp)
    other = comparison(out, tiny_judge, ["sit"])
    other.seeds, other.steps, other.settings = [0], 2, dataclasses.replace(other.settings, num_samples=30)
    with pytest.raises(ConfigError, match="other settings.*settings"):
        run_comparison(other)


def test_a_method_with_options_of_its_own_can_join_a_folder_later(tmp_path, tiny_judge, zoo_cache, monkeypatch):
    from zoo.training.checkpoint import load_checkpoint
    from zoo.training.trainer import Trainer

    out = tmp_path / "cmp"
    first = comparison(out, tiny_judge, ["sit"])
    first.seeds, first.steps = [0], 2
    run_comparison(first)
    later = comparison(out, tiny_judge, ["sit", "layersync"])
    later.seeds, later.steps, later.overrides = [0], 2, [*later.overrides, "layersync.weight=0.5"]
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fit(self) if self.cfg.method == "layersync"
                        else pytest.fail("retrained sit"))
    run_comparison(later)  # sit is read back; only layersync trains, with its own option
    saved = json.loads((out / "comparison.json").read_text())["protocol"]
    assert saved["overrides"] == ["train.device=cpu"]
    trained = load_checkpoint(out / "runs" / "layersync-seed0" / "checkpoints" / "step_0000002.pt")
    assert trained["config"]["layersync"]["weight"] == 0.5

    # a folder written when the protocol kept every override resumes as well
    path = out / "comparison.json"
    record = json.loads(path.read_text())
    record["protocol"]["overrides"] = later.overrides
    path.write_text(json.dumps(record))
    run_comparison(later)

    # another value of that option is still refused, by the finished run's own config
    changed = comparison(out, tiny_judge, ["sit", "layersync"])
    changed.seeds, changed.steps, changed.overrides = [0], 2, [*changed.overrides, "layersync.weight=0.7"]
    with pytest.raises(ConfigError, match="layersync-seed0 was trained with another config"):
        run_comparison(changed)


def test_unequal_batch_between_methods_is_refused(tmp_path, tiny_judge, second_method, monkeypatch):
    yaml = tmp_path / "doubled.yaml"
    yaml.write_text("train:\n  batch_size: 16\n")
    monkeypatch.setattr(Doubled, "config_file", str(yaml))
    with pytest.raises(ConfigError, match="train.batch_size"):
        run_comparison(comparison(tmp_path / "cmp", tiny_judge, ["sit", second_method]))


def test_unknown_method_lists_the_known_ones(tmp_path, tiny_judge):
    with pytest.raises(ConfigError, match="unknown method 'nope'.*sit"):
        run_comparison(comparison(tmp_path / "cmp", tiny_judge, ["sit", "nope"]))


def test_an_override_in_a_methods_own_section_goes_to_that_method_only(tmp_path, tiny_judge):
    comp = comparison(tmp_path / "cmp", tiny_judge, ["sit", "repa", "repa_e"])
    comp.overrides += ["repa.proj_coeff=2.0", "repa_e.proj_coeff=3.0", "repa_e.encoder_depth=1"]
    assert "repa" not in run_config(comp, "sit", 0) and "repa_e" not in run_config(comp, "sit", 0)
    repa, repa_e = run_config(comp, "repa", 0), run_config(comp, "repa_e", 0)
    assert repa.repa.proj_coeff == 2.0 and repa.train.device == "cpu"
    assert (repa_e.repa_e.proj_coeff, repa_e.repa_e.encoder_depth) == (3.0, 1)


def test_an_override_for_a_method_not_compared_is_refused(tmp_path, tiny_judge):
    comp = comparison(tmp_path / "cmp", tiny_judge, ["sit", "repa"])
    comp.overrides += ["ddt.proj_coeff=2.0"]
    with pytest.raises(ConfigError, match="ddt.proj_coeff=2.0.*ddt, which is not in --methods"):
        run_comparison(comp)
    assert not (tmp_path / "cmp").exists()  # refused before anything is written


def test_a_guidance_scale_below_one_is_refused_before_training(tmp_path, tiny_judge):
    comp = comparison(tmp_path / "cmp", tiny_judge, ["sit"])
    comp.settings = dataclasses.replace(comp.settings, cfg_scale=0.5)
    with pytest.raises(ConfigError, match="guidance scale of 0.5 guides nothing"):
        run_comparison(comp)
    assert not (tmp_path / "cmp").exists()


def test_the_table_says_which_overrides_went_to_one_method_only(tmp_path, tiny_judge, zoo_cache):
    out = tmp_path / "cmp"
    comp = comparison(out, tiny_judge, ["sit"])
    comp.seeds, comp.steps = [0], 2
    run_comparison(comp)
    assert "Overrides for every run: train.device=cpu.\n" in (out / "table.md").read_text()
    comp = comparison(tmp_path / "cmp2", tiny_judge, ["sit", "repa"])
    comp.seeds, comp.steps, comp.overrides = [0], 2, [*comp.overrides, "repa.encoder_depth=1"]
    run_comparison(comp)
    assert ("train.device=cpu repa.encoder_depth=1 (one in a method's own section, such as repa.*, for that "
            "method's runs only).") in (tmp_path / "cmp2" / "table.md").read_text()


def test_steps_to_reach_interpolates_between_evaluation_points():
    curve = {100: [0.5, 0.5], 200: [0.3, 0.3], 300: [0.1, 0.1]}
    assert steps_to_reach(curve, 0.2) == (250, True)
    assert steps_to_reach(curve, 0.6) == (100, False)
    assert steps_to_reach(curve, 0.05) == (None, True)


def test_parallel_jobs_give_the_same_numbers_as_one_at_a_time(tmp_path, tiny_judge, zoo_cache):
    one, two = comparison(tmp_path / "one", tiny_judge, ["sit"]), comparison(tmp_path / "two", tiny_judge, ["sit"])
    for comp in (one, two):
        comp.steps = 2
    run_comparison(one)
    run_comparison(two, jobs=2)
    a, b = read_records(tmp_path / "one"), read_records(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 2
    for k in a:  # the children may use another number of threads, so allow for rounding
        assert b[k]["metrics"] == pytest.approx(a[k]["metrics"], rel=1e-3, abs=1e-6)
    assert (tmp_path / "two" / "runs" / "sit-seed1" / "compare.log").exists()


def test_progress_counts_only_the_comparisons_own_records(tmp_path, tiny_judge, zoo_cache):
    comp = comparison(tmp_path / "cmp", tiny_judge, ["sit"])
    comp.steps, comp.seeds = 2, [0]
    run_comparison(comp)
    run_dir = tmp_path / "cmp" / "runs" / "sit-seed0"
    (run_dir / "eval" / "step_0000002-judge-0123456789.json").write_text("{}")  # e.g. a zoo eval --share record
    pattern = record_name(Evaluator(comp.settings, device="cpu"), run_config(comp, "sit", 0), run_dir)
    assert [p.name for p in (run_dir / "eval").glob(pattern)] == [
        p.name for p in (run_dir / "eval").glob("step_*.json") if "0123456789" not in p.name]
    assert len(list((run_dir / "eval").glob(pattern))) == 1

    # a record written by `zoo eval` elsewhere holds a grid path relative to its cwd: the report finds the grid
    record = next((run_dir / "eval").glob(pattern))
    data = json.loads(record.read_text())
    data["grid"] = "some/other/cwd/" + Path(data["grid"]).name
    record.write_text(json.dumps(data))
    (tmp_path / "cmp" / "samples_sit.png").unlink()
    run_comparison(comp)
    assert (tmp_path / "cmp" / "samples_sit.png").stat().st_size > 0


def test_each_row_says_what_its_method_used():
    """Method.used(): the time distribution, the teacher (built-in with its recipe, a named encoder, or the model
    itself) and the space, read from each method's own config."""
    from zoo.config import load_config
    from zoo.training.generate import build_method

    used = {m: build_method(load_config(m, o, "micro")).used() for m, o in [
        ("sit", []), ("repa", ["teacher.center_tokens=true"]), ("sra", []), ("layersync", []),
        ("repa_e", []), ("ddt", []), ("rae", []), ("svg", [])]}
    assert used["sit"] == {"time": load_config("sit", [], "micro").flow.time, "embedding": "1000 t", "teacher": "none",
                           "space": "pixels"}
    assert used["ddt"]["embedding"] == "1000 (1 - t)"  # the network sees the data time 1 - t, as officially
    assert used["rae"]["time"].endswith("shifted (alpha 1.41)") and used["rae"]["space"].startswith("the teacher's normal")
    assert used["svg"]["time"].endswith("shifted (0.4)") and "residual channels" in used["svg"]["space"]
    steps = load_config("repa", [], "micro").teacher.steps
    assert used["repa"]["teacher"] == f"builtin ViT ({steps} steps, centred)"
    assert used["sra"]["teacher"].startswith("own EMA, block ") and used["layersync"]["teacher"].startswith("own block")
    assert used["repa_e"]["space"].startswith("latents (repa_e.vae=") and used["repa_e"]["teacher"].startswith("builtin")
    assert build_method(load_config("sit", ["data.vae=builtin"], "micro")).used()["space"] == "latents (data.vae=builtin)"


class DivergesOnSeed1(Method):
    """A throwaway method whose seed-1 run stops as a diverged loss does; its seed-0 run trains as SiT."""
    name = "diverges_for_test"
    description = "test only"

    def flow_loss(self, velocity, target):
        from zoo.errors import TrainingDiverged

        if self.cfg.train.seed == 1:
            raise TrainingDiverged("the loss is not finite (flow=nan)")
        return super().flow_loss(velocity, target)


def test_a_failed_run_leaves_a_report_of_the_finished_ones(tmp_path, tiny_judge, zoo_cache):
    from zoo.errors import ZooError

    registry.discover()
    registry.register(DivergesOnSeed1)
    try:
        out = tmp_path / "cmp"
        with pytest.raises(ZooError, match="1 of 4 runs failed.*diverges_for_test seed 1: the loss is not finite"):
            run_comparison(comparison(out, tiny_judge, ["sit", DivergesOnSeed1.name]))
    finally:
        registry._METHODS.pop(DivergesOnSeed1.name, None)
    records = read_records(out)
    assert {k[:2] for k in records} == {("sit", 0), ("sit", 1), (DivergesOnSeed1.name, 0)}
    table = (out / "table.md").read_text()
    line = next(l for l in table.splitlines() if l.startswith(f"| {DivergesOnSeed1.name} |") and "ms/step" not in l)
    assert cell([records[(DivergesOnSeed1.name, 0, 4)]["metrics"]["fid"]]) + " |" in line  # its one seed, no spread
    assert "1 run(s) did not finish" in table
    assert "## Runs that did not finish\n" in table
    assert f"- {DivergesOnSeed1.name} seed 1: the loss is not finite (flow=nan)" in table
    assert (out / f"samples_{DivergesOnSeed1.name}.png").exists()
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(records)


def test_a_failing_parallel_run_leaves_its_error_in_its_log(tmp_path):
    import sys

    from zoo.compare.jobs import logged
    from zoo.errors import ZooError

    def diverges():
        print("training 2000 steps")
        raise ZooError("the loss is not finite (flow=nan)")

    def crashes():
        raise RuntimeError("a bug")

    streams = sys.stdout, sys.stderr
    for fn, expected in ((diverges, "error: the loss is not finite (flow=nan)"), (crashes, "RuntimeError: a bug")):
        log = tmp_path / f"{fn.__name__}.log"
        with pytest.raises(SystemExit) as exit_info:
            logged(log, fn)
        assert exit_info.value.code == 1
        assert expected in log.read_text()
        assert (sys.stdout, sys.stderr) == streams  # nothing left writing to a closed file


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_killing_a_parallel_comparison_stops_its_runs(tmp_path, tiny_judge, signal_name):
    """`kill` (or `kill -9`, which runs no handler) of `zoo compare --jobs 2` ends its child runs too: none trains
    on without a parent."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def children(pid: int) -> set:
        found = set()
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if entry.isdigit() and int(fields[1]) == pid:
                found.add(int(entry))
        return found

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    cmd = [sys.executable, "-m", "zoo", "compare", "--methods", "sit", "--preset", "micro", "--steps", "100000",
           "--eval-every", "100000", "--seeds", "0,1", "--jobs", "2", "--out", str(tmp_path / "cmp"), "--weights",
           str(tiny_judge), "--num-samples", "20", "train.threads=1"]
    parent, runs = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # both runs started and training (their run folders have metrics)
            runs = {p for p in children(parent.pid) if "multiprocessing.spawn" in open(f"/proc/{p}/cmdline").read()}
            if len(runs) == 2 and len(list((tmp_path / "cmp" / "runs").glob("*/metrics.jsonl"))) == 2:
                break
            time.sleep(0.5)
        assert len(runs) == 2, "the two runs never started"
        parent.send_signal(getattr(signal, signal_name))
        assert parent.wait(timeout=60) != 0
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in runs):
            time.sleep(0.2)
        assert not any(alive(p) for p in runs)
    finally:
        for pid in [parent.pid, *runs]:  # a failing test leaves nothing running either
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        parent.wait()


def test_the_built_in_vaes_recipe_is_part_of_a_runs_config_only_where_the_run_uses_that_vae(tmp_path, capsys):
    """A comparison folder keeps its pixel-space runs when the preset's VAE recipe changes (it trains nothing of
    theirs); a run in the built-in VAE's latents, or REPA-E tuning it, is refused as before."""
    from zoo.compare.runner import reads_builtin_vae, train_run
    from zoo.config import load_config, to_dict

    assert not reads_builtin_vae(to_dict(load_config("sit", [], "micro")))
    assert reads_builtin_vae(to_dict(load_config("sit", ["data.vae=builtin"], "micro")))
    assert reads_builtin_vae(to_dict(load_config("repa_e", [], "micro")))
    assert not reads_builtin_vae(to_dict(load_config("repa_e", ["repa_e.vae=/w/sd-vae"], "micro")))
    run = tmp_path / "sit-seed0"
    train_run(load_config("sit", ["train.steps=2", "train.sample_every=0", "sample.num=0"], "micro"), run, "sit")
    train_run(load_config("sit", ["train.steps=2", "sample.num=0", "autoencoder.steps=9"], "micro"), run, "sit")
    assert "sit: trained (2 steps)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="another config"):
        train_run(load_config("sit", ["train.steps=2", "sample.num=0", "optim.lr=0.5"], "micro"), run, "sit")


def test_every_line_of_the_plot_looks_different_beyond_ten_methods():
    """matplotlib's default cycle repeats its colours after ten: the twelve-method table plotted SiT and DeepFlow alike."""
    from zoo.compare.report import line_styles

    styles = line_styles(13)
    looks = {(s["color"], s["linestyle"], s["marker"]) for s in styles}
    assert len(looks) == 13
    assert styles[0]["color"] == styles[10]["color"] and styles[0]["linestyle"] != styles[10]["linestyle"]


def test_one_teacher_for_every_compared_method_that_has_one(tmp_path, tiny_judge, capsys):
    from zoo.cli import main
    from zoo.compare.runner import teacher_overrides

    assert teacher_overrides(["sit", "repa", "layersync", "ddt"], "builtin-cluster", "micro") == [
        "repa.encoder=builtin-cluster", "ddt.encoder=builtin-cluster"]
    comp = comparison(tmp_path / "cmp", tiny_judge, ["sit", "repa", "ddt"])
    comp.overrides = [*teacher_overrides(comp.methods, "builtin-cluster", "micro"), *comp.overrides, "ddt.encoder=builtin"]
    assert run_config(comp, "repa", 0).repa.encoder == "builtin-cluster"
    assert run_config(comp, "ddt", 0).ddt.encoder == "builtin"  # the command line's own override wins
    assert "repa" not in run_config(comp, "sit", 0)
    out = tmp_path / "refused"
    assert main(["compare", "--methods", "sit,layersync", "--steps", "2", "--eval-every", "2", "--preset", "micro",
                 "--teacher", "builtin-cluster", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher builtin-cluster: none of the compared methods (sit,layersync)" in err[0]
    assert not out.exists()
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        teacher_overrides(["sit", "nope"], "builtin-cluster")


def test_an_unknown_teacher_is_refused_before_anything_trains(tmp_path, tiny_judge):
    comp = comparison(tmp_path / "cmp", tiny_judge, ["sit", "repa"])
    comp.overrides += ["repa.encoder=builtin,nonsense"]
    with pytest.raises(ConfigError, match="repa.encoder: unknown encoder 'nonsense'; valid: builtin, builtin-cluster"):
        run_comparison(comp)
    assert not (tmp_path / "cmp").exists()
