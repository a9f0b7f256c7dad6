"""REPA: its loss is the paper's equation, it changes nothing when lambda = 0, and the teacher stays frozen."""
import pytest
import torch

from methods.repa import repa_loss
from zoo.teachers.alignment import negative_cosine, projector
from zoo.data import build_dataset
from zoo.errors import ConfigError
from zoo.training.method import TrainContext
from zoo.training.generate import build_method


def reference_repa_loss(hidden, projectors, targets):
    """The paper's equation written out: -1/|E| sum_e 1/(B N) sum_{b,n} <y, h_phi(h)> / (|y| |h_phi(h)|)."""
    per_encoder = []
    for proj, y in zip(projectors, targets):
        z = proj(hidden)
        total = 0.0
        for b in range(hidden.shape[0]):
            for n in range(hidden.shape[1]):
                total = total + torch.dot(y[b, n], z[b, n]) / (y[b, n].norm() * z[b, n].norm())
        per_encoder.append(-total / (hidden.shape[0] * hidden.shape[1]))
    return sum(per_encoder) / len(per_encoder)


def test_loss_matches_a_transcription_of_the_equation_with_several_encoders():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 16)
    projectors = [projector(16, 32, 8), projector(16, 32, 12)]  # two encoders of different widths
    targets = [torch.randn(3, 5, 8), torch.randn(3, 5, 12)]
    expected = reference_repa_loss(hidden, projectors, targets)
    assert torch.allclose(repa_loss(hidden, projectors, targets), expected, atol=1e-6)
    # perfectly aligned tokens give -1, opposite ones +1
    same = torch.randn(2, 4, 6)
    assert torch.allclose(negative_cosine(3 * same, same), torch.tensor(-1.0))
    assert torch.allclose(negative_cosine(-same, same), torch.tensor(1.0))


def test_alignment_is_computed_in_fp32_under_bf16_autocast():
    a, b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = negative_cosine(a.bfloat16(), b)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, negative_cosine(a.bfloat16().float(), b))


def test_method_loss_uses_block_k_of_the_noisy_input_and_each_encoders_tokens(micro_cfg, seeded_loss):
    cfg = micro_cfg("repa", "repa.encoder=builtin,builtin", "repa.feature_cache=never", "model.class_dropout=0")
    method = build_method(cfg)
    method.setup("cpu")
    model = method.build_model()
    batch = next(iter_batches(cfg))
    terms, t, x, x_t = seeded_loss(method, model, batch)
    hidden = model.backbone(x_t, t, batch["label"], hidden_layers=(1,)).hidden[1]
    targets = [encoder(x) for encoder in method.teacher.encoders]
    assert len(targets) == 2 and targets[0].shape == (len(x), 64, cfg.teacher.width)
    expected = reference_repa_loss(hidden, model.extras["projectors"], targets)
    assert set(terms) == {"flow", "repa"}
    assert torch.allclose(terms["repa"].value, expected, atol=1e-5)
    assert terms["repa"].weight == cfg.repa.proj_coeff == 0.5


def iter_batches(cfg, start=0):
    from zoo.data import BatchLoader

    return BatchLoader(build_dataset(cfg.data), cfg.data, cfg.train.batch_size, cfg.train.seed).iterate(start)


def backbone_grads(method, model, batch):
    torch.manual_seed(11)
    terms = method.loss_terms(model, batch, TrainContext(0, None))
    model.zero_grad()
    sum(term.weight * term.value for term in terms.values()).backward()
    return {k: p.grad.clone() for k, p in model.backbone.named_parameters() if p.grad is not None}


def test_with_lambda_zero_the_backbone_gets_exactly_vanilla_sits_gradients(micro_cfg):
    repa = build_method(micro_cfg("repa", "repa.proj_coeff=0"))
    repa.setup("cpu")
    sit = build_method(micro_cfg("sit"))
    torch.manual_seed(0)
    repa_model = repa.build_model()
    sit_model = sit.build_model()
    sit_model.backbone.load_state_dict(repa_model.backbone.state_dict())
    for p in repa_model.backbone.parameters():  # leave the zero-initialised state so every gradient is non-trivial
        p.data.add_(0.01 * torch.randn_like(p))
    sit_model.backbone.load_state_dict(repa_model.backbone.state_dict())
    batch = next(iter_batches(repa.cfg))
    got, expected = backbone_grads(repa, repa_model, batch), backbone_grads(sit, sit_model, batch)
    assert got.keys() == expected.keys() and len(got) > 0
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # and with lambda > 0 they differ: the alignment really reaches the backbone
    repa_on = build_method(micro_cfg("repa"))
    repa_on.setup("cpu")
    other = backbone_grads(repa_on, repa_model, batch)
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])


def test_projector_learns_and_the_teacher_gets_no_gradient_and_never_changes(micro_cfg):
    from zoo.training.trainer import Trainer

    trainer = Trainer(micro_cfg("repa", "repa.feature_cache=never"), run_dir=None, progress=False)
    teacher = trainer.method.teacher.encoders[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    proj_before = [p.detach().clone() for p in trainer.model.extras["projectors"].parameters()]
    batches = trainer.loader.iterate(0)
    for _ in range(2):
        trainer.train_step(next(batches))
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    proj_grads = [p.grad for p in trainer.model.extras["projectors"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in proj_grads) and any(g.abs().sum() > 0 for g in proj_grads)
    moved = [not torch.equal(a, b.detach()) for a, b in zip(proj_before, trainer.model.extras["projectors"].parameters())]
    assert all(moved)
    # the teacher is not part of the model: it is neither optimised, EMA'd nor checkpointed
    assert not any(p is q for p in teacher.parameters() for q in trainer.model.parameters())


def test_cached_and_on_the_fly_features_give_the_same_loss(micro_cfg):
    cached = build_method(micro_cfg("repa", "repa.feature_cache=always"))
    cached.setup("cpu")
    live = build_method(micro_cfg("repa", "repa.feature_cache=never"))
    live.setup("cpu")
    assert cached.teacher.caches and not live.teacher.caches
    model = live.build_model()
    batches = iter_batches(live.cfg)
    for _ in range(2):  # batches with and without flipped images
        batch = next(batches)
        assert batch["flip"].any() and not batch["flip"].all()
        torch.manual_seed(5)
        a = cached.loss_terms(model, batch, TrainContext(0, None))["repa"].value
        torch.manual_seed(5)
        b = live.loss_terms(model, batch, TrainContext(0, None))["repa"].value
        assert abs(a.item() - b.item()) < 1e-3  # float16 storage
        tokens_cached = cached.targets(batch)["tokens"][0]
        tokens_live = live.targets(batch)["tokens"][0]
        assert torch.allclose(tokens_cached, tokens_live, atol=2e-2, rtol=1e-2)


def test_block_out_of_range_and_bad_cache_mode_are_config_errors(micro_cfg):
    with pytest.raises(ConfigError, match="blocks 1..2"):
        build_method(micro_cfg("repa", "repa.encoder_depth=5")).build_model()
    with pytest.raises(ConfigError, match="auto, always, never"):
        build_method(micro_cfg("repa", "repa.feature_cache=maybe"))
    with pytest.raises(ConfigError, match="unknown encoder 'dino'.*builtin"):
        build_method(micro_cfg("repa", "repa.encoder=dino")).build_model()


def test_presets_follow_the_paper():
    from zoo.config import load_config

    assert load_config("repa", ["preset=XL"]).repa.encoder_depth == 8
    assert load_config("repa", ["preset=B"]).repa.encoder_depth == 4
    xl = load_config("repa", ["preset=XL"]).repa
    assert (xl.projector_dim, xl.proj_coeff) == (2048, 0.5)
