"""Building a cached artifact on first use leaves the run's random numbers where a cached build would: the same
config starts from the same weights whether its teacher was trained in this process or found in the cache."""
import torch

from zoo.config import load_config
from zoo.training.trainer import Trainer

OVERRIDES = ["preset=micro", "train.device=cpu", "teacher.steps=3", "teacher.probe_images=64", "train.steps=1"]


def initial_weights(cfg) -> dict:
    return {k: v.clone() for k, v in Trainer(cfg, run_dir=None, progress=False).model.state_dict().items()}


def test_a_teacher_trained_on_first_use_does_not_change_the_initial_weights(zoo_cache):
    cfg = load_config("repa", OVERRIDES + ["repa.encoder=builtin"])
    first = initial_weights(cfg)    # trains and caches the teacher (it seeds torch itself)
    cached = initial_weights(cfg)   # finds it cached
    assert first.keys() == cached.keys()
    for name in first:
        torch.testing.assert_close(first[name], cached[name], rtol=0, atol=0, msg=name)


def test_the_guard_restores_the_callers_generator():
    from zoo.cache import caller_random_state

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with caller_random_state():
        torch.manual_seed(99)
        torch.rand(10)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
