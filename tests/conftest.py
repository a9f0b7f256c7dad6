import os

import pytest
import torch

# Tests run on the CPU with few threads: results must not depend on the machine's core count.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def micro_cfg():
    """A factory for the `micro` preset of a method, with extra overrides."""
    from zoo.config import load_config

    def make(method="sit", *overrides):
        return load_config(method, ["preset=micro", "train.device=cpu", *overrides])

    return make
