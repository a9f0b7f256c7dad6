"""The `zoo` command end to end, in subprocesses, as a user runs it."""
import json
import subprocess
import sys

import pytest


MICRO = ["preset=micro", "train.device=cpu"]


def zoo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zoo", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_list_shows_every_method_on_one_line():
    out = zoo("list")
    assert out.returncode == 0
    assert any(line.startswith("sit ") for line in out.stdout.splitlines())


def test_unknown_method_lists_the_known_ones():
    out = zoo("train", "--method", "nope")
    assert out.returncode == 2
    assert "unknown method 'nope'" in out.stderr and "sit" in out.stderr


def test_unknown_config_key_lists_valid_keys():
    out = zoo("config", "--method", "sit", "optim.learning_rate=1")
    assert out.returncode == 2
    assert "optim.learning_rate" in out.stderr and "valid keys under optim: " in out.stderr


def test_missing_checkpoint_names_the_path(tmp_path):
    out = zoo("sample", "--ckpt", str(tmp_path / "missing.pt"))
    assert out.returncode == 2 and "missing.pt does not exist" in out.stderr
    out = zoo("train", "--resume", str(tmp_path / "norun"))
    assert out.returncode == 2 and "norun" in out.stderr


def test_config_prints_resolved_yaml_with_overrides():
    out = zoo("config", "--method", "sit", "--preset", "XL", "train.steps=5")
    assert out.returncode == 0
    assert "size: XL" in out.stdout and "steps: 5" in out.stdout


def test_dry_run_writes_nothing(tmp_path):
    out = zoo("train", "--method", "sit", "--dry-run", *MICRO, cwd=tmp_path)
    assert out.returncode == 0 and "parameters:" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_train_resume_and_sample(tmp_path):
    run = tmp_path / "runs" / "r"
    out = zoo("train", "--method", "sit", *MICRO, "train.steps=3", "train.run_name=r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("config.yaml", "metrics.jsonl", "losses.png", "checkpoints/step_0000003.pt",
                 "samples/step_0000003.png"):
        assert (run / name).exists(), name
    out = zoo("train", "--resume", str(run), "train.steps=5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (run / "checkpoints" / "step_0000005.pt").exists()
    grid = tmp_path / "grid.png"
    out = zoo("sample", "--ckpt", str(run), "--num", "10", "--sampler", "sde", "--steps", "3", "--cfg", "1.5",
              "--cfg-interval", "0", "0.7", "--out", str(grid))
    assert out.returncode == 0, out.stderr
    assert grid.exists() and grid.stat().st_size > 0
    out = zoo("sample", "--ckpt", str(run), "--share", "uniform:2", "--out", str(grid))
    assert out.returncode == 2 and "--share: not a sampling option of method 'sit'" in out.stderr


def test_sample_help_lists_the_methods_sampling_flags():
    out = zoo("sample", "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--ckpt", "--share", "--rg", "--rg-interval"):
        assert flag in out.stdout, flag


def test_bench_reports_speed_and_memory():
    out = zoo("bench", "--method", "sit", *MICRO, "--steps", "2", "--warmup", "1")
    assert out.returncode == 0, out.stderr
    assert '"steps_per_sec"' in out.stdout and '"peak_rss_mb"' in out.stdout


def test_bench_data_times_the_batch_stream_alone():
    out = zoo("bench", "--data", *MICRO, "--steps", "3", "--warmup", "1")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["steps"] == 3 and result["images_per_sec"] == pytest.approx(
        result["batches_per_sec"] * result["batch_size"])


def test_bench_side_by_side_reports_each_run_and_its_ratio_to_the_first():
    out = zoo("bench", "--run", "sit", "--run", "repa repa.feature_cache=never", *MICRO, "--steps", "1",
              "--warmup", "1", "--rounds", "2")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["run"] for r in rows] == ["sit", "repa repa.feature_cache=never"]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0 and len(rows[1]["ms_per_step_rounds"]) == 2
    assert rows[1]["parameters"] > rows[0]["parameters"]  # the projector


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["prepare", "--help"], ["train", "--help"]])
def test_help_and_list_start_without_importing_torch(argv):
    """`zoo --help` and `zoo list` read no method module (importing torch is seconds of a cold start)."""
    code = ("import sys\nfrom zoo.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().endswith("NO TORCH"), out[-500:]


def test_list_reads_the_same_methods_and_descriptions_as_the_registry():
    from zoo.training.registry import available_methods, method_summaries

    assert method_summaries() == {name: cls.description for name, cls in available_methods().items()}


def test_every_command_is_built_the_same_way():
    """One way to add a command: each is a module of zoo/cli/commands, `sample` included."""
    from zoo.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"list", "config", "train", "sample", "bench", "prepare", "eval", "compare", "new-method"} <= set(commands)
    assert "--share" in commands["sample"].format_help() and "--rg" in commands["eval"].format_help()
