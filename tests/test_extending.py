"""Extending the zoo (docs/extending.md): `zoo new-method` writes a method that passes the shared contract,
and a method in another package, registered through an entry point, is listed and trains."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.training import contract
from zoo.errors import ConfigError
from zoo.training.registry import _METHODS
from zoo.cli.scaffold import method_files, write_method

ROOT = Path(__file__).resolve().parent.parent


def _import_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)  # runs its @register
    return module


@pytest.fixture
def scaffolded(tmp_path):
    name = "scaffold_demo"
    paths = write_method(name, tmp_path)
    _import_file(tmp_path / "methods" / f"{name}.py", f"_zoo_test_{name}")
    yield name, tmp_path, paths
    _METHODS.pop(name, None)
    sys.modules.pop(f"_zoo_test_{name}", None)


def test_new_method_writes_the_four_files(scaffolded):
    name, root, paths = scaffolded
    assert sorted(p.relative_to(root).as_posix() for p in paths) == sorted(
        [f"methods/{name}.py", f"configs/{name}.yaml", f"docs/methods/{name}.md", f"tests/methods/test_{name}.py"])


def test_new_method_passes_the_shared_contract(scaffolded, tmp_path):
    name, root, _ = scaffolded
    contract.check_all(name)
    cfg = contract.micro_config(name)
    assert cfg[name].depth == 1, "the method's own config file (written next to it) was not read"


def test_new_method_test_file_runs(scaffolded):
    name, root, _ = scaffolded
    tests = _import_file(root / "tests" / "methods" / f"test_{name}.py", f"_zoo_test_tests_{name}")
    tests.test_its_loss_terms_are_the_ones_it_declares()


def test_new_method_refuses_taken_names_bad_names_and_overwrites(tmp_path):
    with pytest.raises(ConfigError, match="exists already"):
        write_method("repa", tmp_path)
    with pytest.raises(ConfigError, match="config section of the core"):
        write_method("train", tmp_path)
    with pytest.raises(ConfigError, match="lower-case Python identifier"):
        write_method("My-Method", tmp_path)
    target = next(iter(method_files("fresh_one", tmp_path)))
    target.parent.mkdir(parents=True)
    target.write_text("mine")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_method("fresh_one", tmp_path)
    assert target.read_text() == "mine"


def _zoo(args, pythonpath, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "zoo", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_method_in_another_package_is_listed_and_trains_through_its_entry_point(tmp_path):
    """An installed distribution declares `[repa_zoo.methods] plugged = zoo_plugin_demo.method`; the zoo
    finds it without any change (a dist-info folder on the path is what `pip install` leaves)."""
    site = tmp_path / "site"
    files = method_files("plugged", site / "zoo_plugin_demo")  # methods/plugged.py -> the package's module
    (site / "zoo_plugin_demo").mkdir(parents=True)
    (site / "zoo_plugin_demo" / "__init__.py").write_text("")
    for path, text in files.items():
        if path.name == "plugged.py":
            (site / "zoo_plugin_demo" / "method.py").write_text(text)
        elif path.suffix == ".yaml":
            (site / "configs").mkdir(exist_ok=True)  # the module reads ../configs/plugged.yaml
            (site / "configs" / path.name).write_text(text)
    dist = site / "zoo_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zoo-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[repa_zoo.methods]\nplugged = zoo_plugin_demo.method\n")

    listed = _zoo(["list"], site, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert any(line.startswith("plugged ") for line in listed.stdout.splitlines()), listed.stdout

    trained = _zoo(["train", "--method", "plugged", "--preset", "micro", "train.steps=1", "train.sample_every=0",
                    "sample.num=0", "train.device=cpu", f"train.out_dir={tmp_path / 'runs'}"], site, tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert list((tmp_path / "runs").glob("plugged-*/checkpoints/step_0000001.pt"))


def test_self_aligning_methods_enter_the_comparison_runner_on_the_same_budget(tmp_path):
    from zoo.compare.runner import Comparison, check_same_budget, run_config

    comp = Comparison(["sit", "sra", "layersync"], steps=20, eval_every=10, out=tmp_path)
    configs = {m: run_config(comp, m, 0) for m in comp.methods}
    check_same_budget(configs)  # raises if a method's own YAML changed the data, batch or steps
    assert configs["sra"].sra.teacher_block == 4 and configs["layersync"].layersync.deep_block == 4  # tiny presets
