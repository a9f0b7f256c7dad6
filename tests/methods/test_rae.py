"""rae: its equations against direct transcriptions. The shared contract (tests/test_contract.py)
runs for every registered method; a method in another package calls zoo.training.contract.check_all("rae")."""
import torch

from zoo.training.contract import micro_config
from zoo.training.method import TrainContext
from zoo.training.generate import build_method


def test_its_loss_terms_are_the_ones_it_declares():
    method = build_method(micro_config("rae"))
    model = method.build_model()
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 1])}
    terms = method.loss_terms(model, batch, TrainContext(0, model))
    # TODO: once extra_losses returns the method's loss, assert its value against a direct
    # transcription of the paper's equation on hand-built tensors, as tests/methods/test_repa.py does.
    assert set(terms) == {"flow"}
    assert torch.isfinite(terms["flow"].value)
