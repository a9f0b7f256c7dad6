"""LayerSync: the loss against a direct transcription, and the deep block as a detached teacher."""
import pytest
import torch
import torch.nn.functional as F

from methods.layersync import layersync_loss
from zoo.errors import ConfigError
from zoo.training.method import TrainContext
from zoo.training.generate import build_method


def test_loss_is_the_negative_mean_token_cosine_to_the_deep_block():
    shallow, deep = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    expected = -torch.stack([F.cosine_similarity(shallow[b, n], deep[b, n], dim=0)
                             for b in range(3) for n in range(5)]).mean()
    assert torch.allclose(layersync_loss(shallow, deep), expected, atol=1e-6)
    assert torch.allclose(layersync_loss(deep, deep), torch.tensor(-1.0))


def test_deep_block_is_detached_and_shallow_block_is_pulled():
    shallow = torch.randn(2, 4, 6, requires_grad=True)
    deep = torch.randn(2, 4, 6, requires_grad=True)
    layersync_loss(shallow, deep).backward()
    assert deep.grad is None
    assert shallow.grad is not None and shallow.grad.abs().sum() > 0


def test_alignment_loss_gives_no_gradient_to_blocks_after_the_shallow_one(micro_cfg):
    """Through the real model: the sync loss alone moves blocks up to s and nothing after it."""
    method = build_method(micro_cfg("layersync", "model.class_dropout=0"))
    model = method.build_model()
    for p in model.parameters():  # adaLN-Zero starts blocks at identity; any weights will do here
        torch.nn.init.normal_(p, std=0.05)
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 1])}
    terms = method.loss_terms(model, batch, TrainContext(0, model))
    assert set(terms) == {"flow", "layersync"} and terms["layersync"].weight == 0.2
    terms["layersync"].value.backward()
    grads = {name: p.grad for name, p in model.backbone.named_parameters()}
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0          # block 1 = s in micro
    assert grads["blocks.1.attn.qkv.weight"] is None                 # block 2 = d: the teacher
    assert grads["final_layer.linear.weight"] is None


def test_shallow_block_must_come_first(micro_cfg):
    with pytest.raises(ConfigError, match="must come before"):
        build_method(micro_cfg("layersync", "layersync.shallow_block=2", "layersync.deep_block=1"))
    with pytest.raises(ConfigError, match="must come before"):  # the same block is no teacher either
        build_method(micro_cfg("layersync", "layersync.shallow_block=2", "layersync.deep_block=2"))
