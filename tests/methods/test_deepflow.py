"""DeepFlow: per-branch times, the branch-weighted loss, the acceleration loss and head, REPA on post-VeRA states,
sampling with one t, and the presets' parameter counts (counted on the meta device, as reported in the docs)."""
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from methods.deepflow import acceleration_loss, branch_times, deep_supervision_terms
from zoo.backbones.deepflow import DeepFlowSiT, build_deepflow_sit
from zoo.backbones.sit import SiT, count_parameters
from zoo.config import load_config
from zoo.errors import ConfigError
from zoo.training.method import TrainContext
from zoo.training.generate import build_method, generate

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods" / "deepflow.md"


def micro(micro_cfg, *overrides):
    method = build_method(micro_cfg("deepflow", "model.class_dropout=0", *overrides))
    method.setup("cpu")
    return method


def perturbed_model(method, seed=0, keep=("acceleration_head",)):
    """The method's model with every parameter but those under `keep` moved off its (partly zero) initialisation."""
    torch.manual_seed(seed)
    model = method.build_model()
    for name, p in model.named_parameters():
        if not name.startswith(tuple(f"backbone.{k}" for k in keep)):
            p.data.add_(0.05 * torch.randn_like(p))
    return model


def replay_draws(seed, x, branches, max_gap):
    """The random draws of DeepFlow.loss_terms, in its order: t, eps, the step's sign, one gap per later branch."""
    torch.manual_seed(seed)
    t = torch.rand(x.shape[0])
    eps = torch.randn_like(x)
    sign = 1.0 if torch.rand(()) < 0.5 else -1.0
    times = [t]
    for _ in range(branches - 1):
        times.append((times[-1] + sign * max_gap * torch.rand(x.shape[0])).clamp(0, 1))
    return times, eps


def mse(a, b):
    """Per-sample mean over dimensions, then the batch mean, written out with explicit loops."""
    total = 0.0
    for i in range(a.shape[0]):
        total += ((a[i] - b[i]) ** 2).sum() / a[i].numel()
    return total / a.shape[0]


# ------------------------------------------------------------------------------------------- per-branch times
def test_branch_times_move_at_most_the_gap_one_direction_per_step_inside_the_unit_interval():
    t = torch.cat([torch.rand(200), torch.zeros(5), torch.ones(5), torch.full((5,), 0.995), torch.full((5,), 0.004)])
    signs = set()
    for seed in range(40):
        torch.manual_seed(seed)
        times = branch_times(t, 4, 0.01)
        assert len(times) == 4 and torch.equal(times[0], t)
        steps = torch.stack([b - a for a, b in pairwise(times)])
        assert (steps.abs() <= 0.01 + 1e-7).all()
        assert (steps >= 0).all() or (steps <= 0).all()  # one direction for every branch and sample of a step
        assert all(((s >= 0) & (s <= 1)).all() for s in times)
        interior = (t > 0.05) & (t < 0.95)
        # away from the ends the branches really move (a gap below float precision at t leaves it unchanged)
        assert (steps[:, interior] != 0).float().mean() > 0.99
        signs.add(1 if steps.sum() > 0 else -1)
    assert signs == {1, -1}  # both directions occur across steps


def test_every_branch_uses_the_same_t_at_sampling(micro_cfg):
    method = micro(micro_cfg)
    model = perturbed_model(method, keep=()).eval()
    backbone = model.backbone
    x, y, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]), torch.full((3,), 0.6)
    with torch.no_grad():
        v = backbone(x, t, y).velocity
        same = backbone(x, t, y, branch_times=[t, t])
        shifted = backbone(x, t, y, branch_times=[t - 0.01, t - 0.02])
    assert torch.allclose(v, same.velocities[-1], atol=1e-6) and torch.allclose(v, same.velocity)
    assert not torch.allclose(v, shifted.velocity, atol=1e-4)  # branch times matter, so the check above means something
    # through the core's sampler: each model call embeds the sampler's t once and a zero time gap
    seen_t, seen_gap = [], []
    backbone.t_embedder.register_forward_hook(lambda m, args, out: seen_t.append(args[0].clone()))
    backbone.gap_embedder.register_forward_hook(lambda m, args, out: seen_gap.append(args[0].clone()))
    generate(method, model, torch.tensor([0, 1]), steps=2)
    assert [float(s[0]) for s in seen_t] == [1.0, 0.5] and all(torch.equal(s, s[:1].expand_as(s)) for s in seen_t)
    assert len(seen_gap) == 2 * len(backbone.splits) and all((g == 0).all() for g in seen_gap)


# ------------------------------------------------------------------------------------------- losses
def test_branch_weighted_loss_against_a_transcription_on_hand_built_tensors(micro_cfg):
    flow_loss = build_method(micro_cfg("deepflow")).flow_loss
    zero = torch.zeros(2, 3, 4, 4)
    v3 = torch.cat([torch.ones(1, 3, 4, 4), 3 * torch.ones(1, 3, 4, 4)])  # per-sample errors 1 and 9: mean 5
    terms = deep_supervision_terms([torch.ones_like(zero), 2 * torch.ones_like(zero), v3], [zero] * 3,
                                   [0.2, 0.2, 1.0], flow_loss)
    assert set(terms) == {"flow_b1", "flow_b2", "flow"}
    assert [terms[k].value.item() for k in ("flow_b1", "flow_b2", "flow")] == [1.0, 4.0, 5.0]
    assert sum(term.weight * term.value for term in terms.values()).item() == pytest.approx(0.2 * 1 + 0.2 * 4 + 5.0)
    torch.manual_seed(0)
    vs, targets, weights = [torch.randn(3, 2, 5, 5) for _ in range(3)], [torch.randn(3, 2, 5, 5) for _ in range(3)], \
        [0.3, 0.7, 1.0]
    terms = deep_supervision_terms(vs, targets, weights, flow_loss)
    expected = sum(w * mse(v, target) for v, target, w in zip(vs, targets, weights))
    assert torch.allclose(sum(term.weight * term.value for term in terms.values()), expected, atol=1e-6)


def test_acceleration_loss_is_the_second_order_step_to_t_zero_and_zero_for_the_exact_velocity():
    torch.manual_seed(1)
    x, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x + tt * eps
    exact = acceleration_loss(x, [x_t], [t], [eps - x], [torch.zeros_like(x)])
    assert exact.item() < 1e-10  # the linear path's velocity eps - x reconstructs x exactly to first order
    v, a = torch.randn_like(x), torch.randn_like(x)
    expected = mse(x_t - tt * v + 0.5 * a * tt ** 2, x) + mse(x_t - 0.5 * tt * v + 0.5 * a * tt ** 2, x)
    got = acceleration_loss(x, [x_t, x_t], [t, t], [v, 0.5 * v], [a, a])  # summed over VeRA blocks
    assert torch.allclose(got, expected, atol=1e-6)


def test_the_velocity_in_the_acceleration_loss_carries_no_gradient():
    x, x_t, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.rand(2)
    v, a = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
    acceleration_loss(x, [x_t], [t], [v], [a]).backward()
    assert v.grad is None and a.grad is not None and a.grad.abs().sum() > 0


def test_at_initialisation_the_acceleration_head_is_zero_and_the_method_losses_match_a_replay(micro_cfg, first_batch):
    method = micro(micro_cfg)
    model = perturbed_model(method)  # all but the acceleration head leave their (zero) initialisation
    batch = first_batch(method.cfg)
    torch.manual_seed(4)
    terms = method.loss_terms(model, batch, TrainContext(0, None))
    x, y = batch["image"], batch["label"]
    times, eps = replay_draws(4, x, 3, method.options.time_gap)
    x_t = [(1 - s.view(-1, 1, 1, 1)) * x + s.view(-1, 1, 1, 1) * eps for s in times]
    out = model.backbone(x_t[0], times[0], y, branch_times=times[1:])
    assert len(out.velocities) == 3 and len(out.accelerations) == 2
    assert all(torch.equal(a, torch.zeros_like(a)) for a in out.accelerations)
    assert all(v.abs().sum() > 0 for v in out.velocities)
    # the acceleration loss is then the first-order reconstruction error of the intermediate branches
    first_order = sum(mse(x_t[i] - times[i].view(-1, 1, 1, 1) * out.velocities[i], x) for i in range(2))
    assert set(terms) == {"flow_b1", "flow_b2", "flow", "acc"}
    assert torch.allclose(terms["acc"].value, first_order, atol=1e-5) and terms["acc"].weight == 1.0
    for name, i, w in (("flow_b1", 0, 0.2), ("flow_b2", 1, 0.2), ("flow", 2, 1.0)):
        assert torch.allclose(terms[name].value, mse(out.velocities[i], eps - x), atol=1e-5) and terms[name].weight == w
    # backward of the acceleration loss alone: no gradient reaches the velocity heads
    model.zero_grad()
    terms["acc"].value.backward()
    assert all(p.grad is None for p in model.backbone.intermediate_head.parameters())
    assert model.backbone.acceleration_head.linear.weight.grad.abs().sum() > 0


def test_repa_off_loads_no_teacher_and_repa_on_aligns_every_post_vera_state(micro_cfg, first_batch):
    off = micro(micro_cfg)
    assert off.teacher is None and "projectors" not in off.build_model().extras
    on = micro(micro_cfg, "deepflow.repa=true", "deepflow.feature_cache=never")
    model = perturbed_model(on)
    assert len(on.teacher.encoders) == 1 and len(model.extras["projectors"]) == 2  # one per VeRA block
    batch = first_batch(on.cfg)
    torch.manual_seed(6)
    terms = on.loss_terms(model, batch, TrainContext(0, None))
    x, y = batch["image"], batch["label"]
    times, eps = replay_draws(6, x, 3, on.options.time_gap)
    t0 = times[0].view(-1, 1, 1, 1)
    refined = model.backbone((1 - t0) * x + t0 * eps, times[0], y, branch_times=times[1:]).refined
    tokens = on.teacher.encoders[0](x)
    expected = 0.0
    for h, projectors in zip(refined, model.extras["projectors"]):
        z = torch.nn.functional.normalize(projectors[0](h), dim=-1)
        expected += -(z * torch.nn.functional.normalize(tokens, dim=-1)).sum(-1).mean() / len(refined)
    assert torch.allclose(terms["repa"].value, expected, atol=1e-5) and terms["repa"].weight == 0.5


# ------------------------------------------------------------------------------------------- config, sizes
def test_bad_splits_and_weights_are_config_errors(micro_cfg):
    with pytest.raises(ConfigError, match=r"strictly increasing block numbers in 1..2"):
        build_method(micro_cfg("deepflow", "deepflow.splits=[2,1]"))
    with pytest.raises(ConfigError, match=r"in 1..2"):
        build_method(micro_cfg("deepflow", "deepflow.splits=[3]"))
    with pytest.raises(ConfigError, match="one weight per branch"):
        build_method(micro_cfg("deepflow", "deepflow.weights=[0.2,1.0]"))
    with pytest.raises(ConfigError, match="auto, always, never"):
        build_method(micro_cfg("deepflow", "deepflow.feature_cache=maybe"))


def test_presets_follow_the_paper():
    b, xl = load_config("deepflow", ["preset=B"]), load_config("deepflow", ["preset=XL"])
    assert (b.model.size, b.deepflow.splits, b.deepflow.weights) == ("B", [6], [0.2, 1.0])
    assert (xl.model.size, xl.model.depth, xl.deepflow.splits, xl.deepflow.weights) == ("XL", 24, [8, 16],
                                                                                         [0.2, 0.2, 1.0])
    for cfg in (b, xl):
        assert (cfg.flow.time, cfg.deepflow.time_gap, cfg.deepflow.acc_coeff, cfg.deepflow.repa) == \
            ("logit_normal", 0.01, 1.0, False)


def linear(i, o):
    return i * o + o


def added_parameters(h, p, patch, channels, splits):
    """Transcription of what DeepFlow adds to a SiT of the same depth: VeRA blocks, two heads, the gap embedder."""
    acc_mlp = linear(h, p) + linear(p, 2 * p) + linear(2 * p, p) + linear(p, h)
    vera = acc_mlp + linear(2 * h, 4 * h) + linear(2 * h, 2 * h) + linear(2 * h, h) \
        + 2 * h + linear(h, h) + linear(h, 2 * h) + linear(h, h)  # modulation, MLP, cross-attention (LN, q, kv, out)
    head = linear(h, 2 * h) + linear(h, patch * patch * channels)
    gap_embedder = linear(256, 2 * h) + linear(2 * h, 2 * h)
    return len(splits) * vera + 2 * head + gap_embedder


# preset -> (data channels, classes); B and XL are counted as in the paper: 32x32x4 latents, patch 2, 1000 classes
PRESETS = {"tiny": (3, 10), "B": (4, 1000), "XL": (4, 1000)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_counts_on_the_meta_device_match_a_transcription_and_the_docs(preset):
    cfg = load_config("deepflow", [f"preset={preset}"])
    channels, classes = PRESETS[preset]
    splits = list(cfg.deepflow.splits)
    with torch.device("meta"):
        model = build_deepflow_sit(cfg.model, splits=splits, acc_dim=cfg.deepflow.acc_mlp_dim, input_size=32,
                                   in_channels=channels, num_classes=classes)
        sit = SiT(input_size=32, in_channels=channels, num_classes=classes, patch=model.patch, hidden=model.hidden_size,
                  depth=model.depth, heads=model.blocks[0].attn.heads)
    assert isinstance(model, DeepFlowSiT) and model.num_branches == len(cfg.deepflow.weights)
    n = count_parameters(model)
    extra = added_parameters(model.hidden_size, cfg.deepflow.acc_mlp_dim, model.patch, channels, splits)
    assert n == count_parameters(sit) + extra
    assert f"{n:,}" in DOCS.read_text(), f"docs/methods/deepflow.md should report {preset}: {n:,} parameters"


def test_the_acceleration_and_branch_weights_come_from_the_config(micro_cfg, first_batch):
    method = build_method(micro_cfg("deepflow", "deepflow.acc_coeff=0.3", "deepflow.weights=[0.1,0.4,0.9]"))
    model = perturbed_model(method)
    terms = method.loss_terms(model, first_batch(method.cfg), TrainContext(0, None))
    assert [terms[k].weight for k in ("flow_b1", "flow_b2", "flow", "acc")] == pytest.approx([0.1, 0.4, 0.9, 0.3])
