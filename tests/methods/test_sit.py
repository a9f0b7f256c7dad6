"""Vanilla SiT: its loss is exactly the flow-matching loss of the equations."""
import torch

from zoo.training.method import TrainContext
from zoo.training.generate import build_method


def test_loss_is_the_velocity_mse_of_a_direct_transcription(micro_cfg):
    cfg = micro_cfg("sit", "model.class_dropout=0")
    method = build_method(cfg)
    model = method.build_model()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(7)
    terms = method.loss_terms(model, {"image": x, "label": y}, TrainContext(0, None))
    # the same draws, in the same order: t ~ U(0, 1), then eps ~ N(0, I)
    torch.manual_seed(7)
    t = torch.rand(4)
    eps = torch.randn_like(x)
    x_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * eps
    v = model.backbone(x_t, t, y).velocity
    expected = ((v - (eps - x)) ** 2).mean(dim=(1, 2, 3)).mean()
    assert set(terms) == {"flow"}
    assert torch.allclose(terms["flow"].value, expected)


def test_label_dropout_uses_the_null_class(micro_cfg):
    method = build_method(micro_cfg("sit", "model.class_dropout=0.5"))
    model = method.build_model()
    torch.manual_seed(0)
    y = method.drop_labels(model, torch.zeros(2000, dtype=torch.long))
    frac = (y == model.backbone.null_label).float().mean().item()
    assert 0.45 < frac < 0.55 and set(y.unique().tolist()) == {0, model.backbone.null_label}


def test_extra_losses_receive_the_noisy_sample_and_the_batch(micro_cfg):
    """The FlowState handed to `extra_losses` is the step's own: x, eps, t, x_t on the path, labels, batch."""
    from zoo.training.method import TrainContext
    from zoo.training.generate import build_method

    method = build_method(micro_cfg("sit", "model.class_dropout=0"))
    model = method.build_model()
    seen = {}
    method.extra_losses = lambda model, state, ctx: seen.update(state=state, ctx=ctx) or {}
    batch = {"image": torch.rand(3, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 1, 2])}
    ctx = TrainContext(0, None)
    method.loss_terms(model, batch, ctx)
    state = seen["state"]
    assert torch.equal(state.x, batch["image"]) and state.batch is batch and seen["ctx"] is ctx
    assert torch.allclose(state.x_t, method.path.interpolate(state.x, state.eps, state.t))
    assert torch.equal(state.y, batch["label"]) and state.output.velocity.shape == state.x.shape
