"""The shared contract, run for every registered method (zoo/training/contract.py), plus the files each must ship."""
from pathlib import Path

import pytest

from zoo.training import contract
from zoo.training.registry import available_methods

ROOT = Path(__file__).resolve().parent.parent
METHODS = sorted(available_methods())


@pytest.mark.parametrize("name", METHODS)
def test_builds_from_its_config(name):
    contract.check_builds(name)


@pytest.mark.parametrize("name", METHODS)
def test_one_cpu_training_step_has_finite_gradients(name):
    contract.check_training_step(name)


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_round_trip(name, tmp_path):
    contract.check_checkpoint_round_trip(name, workdir=tmp_path)


@pytest.mark.parametrize("name", METHODS)
def test_sampling_returns_images_of_the_right_shape(name):
    contract.check_sampling_shape(name)


@pytest.mark.parametrize("name", METHODS)
def test_ships_config_docs_and_tests(name):
    cls = available_methods()[name]
    if not cls.__module__.startswith("methods."):
        pytest.skip("an out-of-tree method ships its own files")
    assert (ROOT / "configs" / f"{name}.yaml").exists(), f"configs/{name}.yaml is missing"
    assert (ROOT / "docs" / "methods" / f"{name}.md").exists(), f"docs/methods/{name}.md is missing"
    assert (ROOT / "tests" / "methods" / f"test_{name}.py").exists(), f"tests/methods/test_{name}.py is missing"
    assert cls.description, f"{name} has no one-line description for `zoo list`"
