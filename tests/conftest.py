import os

import pytest
import torch

# Tests run on the CPU with few threads: results must not depend on the machine's core count.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Everything the zoo caches (teachers, judges, feature caches) goes to a per-session folder, never ~/.cache.

    REPA_ZOO_TEST_CACHE names a folder to share between sessions instead: mutation testing runs thousands of
    short sessions, each of which would otherwise train the micro teacher and VAE again."""
    os.environ["REPA_ZOO_CACHE"] = os.environ.get("REPA_ZOO_TEST_CACHE") or str(tmp_path_factory.mktemp("zoo-cache"))


@pytest.fixture
def micro_cfg():
    """A factory for the `micro` preset of a method, with extra overrides."""
    from zoo.config import load_config

    def make(method="sit", *overrides):
        return load_config(method, ["preset=micro", "train.device=cpu", *overrides])

    return make


@pytest.fixture
def first_batch():
    """The first training batch a config's loader gives (step 0, its seed): first_batch(cfg) -> batch dict."""
    from zoo.data import BatchLoader, build_dataset

    def make(cfg):
        return next(BatchLoader(build_dataset(cfg.data), cfg.data, cfg.train.batch_size, cfg.train.seed).iterate(0))

    return make


@pytest.fixture
def seeded_loss():
    """Run `method.loss_terms` under a seed, then redraw its t and eps under the same seed, so a test can
    transcribe the loss on the very same noisy input: returns (terms, t, x, x_t)."""
    from zoo.training.method import TrainContext

    def run(method, model, batch, seed=3):
        torch.manual_seed(seed)
        terms = method.loss_terms(model, batch, TrainContext(0, None))
        torch.manual_seed(seed)  # the same draws: t, then eps
        t = method.sample_time(len(batch["label"]), "cpu")
        x = batch["image"]
        return terms, t, x, method.path.interpolate(x, torch.randn_like(x), t)

    return run


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory):
    """A small judge trained for a few dozen steps on the micro preset's data (never the full recipe)."""
    from zoo.config import load_config
    from zoo.eval.judge import JudgeRecipe, train_judge

    data = load_config("sit", ["preset=micro"]).data
    recipe = JudgeRecipe(stem=8, widths=(16, 32), steps=150, batch_size=64, num_images=640, holdout=200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is as fast, and far faster on a busy machine
    try:
        return train_judge(data, recipe, tmp_path_factory.mktemp("judge") / "judge.pt", progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def zoo_cache(tmp_path, monkeypatch):
    """Reference statistics and other cached artifacts go to a fresh folder, not ~/.cache."""
    monkeypatch.setenv("REPA_ZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
