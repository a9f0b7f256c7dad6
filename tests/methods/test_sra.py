"""SRA: the teacher is the EMA model at a lower-noise time and a deeper block, and receives no gradient."""
import copy

import pytest
import torch
import torch.nn.functional as F

from methods.sra import sra_loss
from zoo.errors import ConfigError
from zoo.training.method import FlowState, TrainContext
from zoo.training.generate import build_method


def _setup(micro_cfg, *overrides):
    method = build_method(micro_cfg("sra", "model.class_dropout=0", *overrides))
    model = method.build_model()
    for p in model.parameters():  # adaLN-Zero starts blocks at identity; any weights will do here
        torch.nn.init.normal_(p, std=0.05)
    ema = copy.deepcopy(model).requires_grad_(False)
    for p in ema.parameters():  # a teacher that differs from the student
        p.add_(0.01 * torch.randn_like(p))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    eps = torch.randn_like(x)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    y = torch.tensor([0, 1, 2, 3])
    x_t = method.path.interpolate(x, eps, t)
    out = model.backbone(x_t, t, y, hidden_layers=method.hidden_layers())
    return method, model, ema, FlowState(x, eps, t, x_t, y, out, {}, {})


def test_loss_matches_a_direct_transcription_with_the_ema_teacher_at_a_lower_noise_time(micro_cfg):
    method, model, ema, state = _setup(micro_cfg)
    s, d = method.options.student_block, method.options.teacher_block
    torch.manual_seed(11)
    terms = method.extra_losses(model, state, TrainContext(0, ema))
    torch.manual_seed(11)
    t_teacher = (state.t - 0.2 * torch.rand(4)).clamp(0, 1)
    x_teacher = (1 - t_teacher)[:, None, None, None] * state.x + t_teacher[:, None, None, None] * state.eps
    teacher = ema.backbone(x_teacher, t_teacher, state.y, hidden_layers=(d,)).hidden[d]
    head = model.extras["projector"]
    student = head[2](F.silu(head[0](state.output.hidden[s])))   # Linear(D, 2D) -> SiLU -> Linear(2D, D)
    assert head[0].weight.shape == (64, 32) and head[2].weight.shape == (32, 64)
    # 1 - cos over the token axis (F.cosine_similarity's default dim=1 of [B, N, D]), per sample and channel
    cos = (student * teacher).sum(1) / (student.norm(dim=1) * teacher.norm(dim=1))
    expected = (1 - cos).mean()
    assert set(terms) == {"sra"} and terms["sra"].weight == 0.5
    assert torch.allclose(terms["sra"].value, expected, atol=1e-5)


def test_token_cosine_and_the_mlp_projector_are_named_options(micro_cfg):
    method, model, ema, state = _setup(micro_cfg, "sra.distance=token_cosine", "sra.projector=mlp")
    assert len(model.extras["projector"]) == 5 and model.extras["projector"][0].out_features == 64
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = -F.cosine_similarity(student, teacher, dim=-1).mean()
    assert torch.allclose(sra_loss(student, teacher, "token_cosine"), expected, atol=1e-6)
    assert not torch.allclose(sra_loss(student, teacher, "cosine"), 1 + expected, atol=1e-3)


def test_teacher_time_is_lower_noise_within_the_gap(micro_cfg):
    method, *_ = _setup(micro_cfg)
    t = torch.rand(10000)
    gap = t - method.teacher_time(t)
    assert (gap >= 0).all() and (gap <= 0.2 + 1e-6).all()
    assert gap[t > 0.2].max() > 0.19 and gap[t > 0.2].mean() == pytest.approx(0.1, abs=0.01)
    assert (method.teacher_time(torch.full((100,), 0.01)) >= 0).all()  # clamped at t = 0


def test_teacher_receives_no_gradient_and_the_student_does(micro_cfg):
    method, model, ema, state = _setup(micro_cfg)
    method.extra_losses(model, state, TrainContext(0, ema))["sra"].value.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert model.extras["projector"][0].weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_smooth_l1_distance_is_the_papers():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    diff = (a - b).abs()
    expected = torch.where(diff < 0.05, 0.5 * diff ** 2 / 0.05, diff - 0.025).mean()
    assert torch.allclose(sra_loss(a, b, "smooth_l1"), expected, atol=1e-6)


def test_bad_options_and_a_missing_teacher_are_clear_errors(micro_cfg):
    with pytest.raises(ConfigError, match="sra.distance"):
        build_method(micro_cfg("sra", "sra.distance=l3"))
    with pytest.raises(ConfigError, match="sra.projector"):
        build_method(micro_cfg("sra", "sra.projector=big"))
    method, model, _, state = _setup(micro_cfg)
    with pytest.raises(ConfigError, match="EMA"):
        method.extra_losses(model, state, TrainContext(0, None))
