"""U-REPA: the manifold loss, project-then-upsample, SiT-down's stages and skips, parameter counts."""
import pytest
import torch
import torch.nn.functional as F

from methods.urepa import (
    manifold_loss,
    project_then_upsample,
    upsample_tokens,
    urepa_losses,
)
from zoo.teachers.alignment import negative_cosine, projector
from zoo.backbones.layers import unpatchify
from zoo.backbones.sit import sit_parameter_count
from zoo.backbones.usit import (
    TokenDownsample,
    TokenUpsample,
    USiT,
    middle_block,
    usit_parameter_count,
)
from zoo.data import BatchLoader, build_dataset
from zoo.errors import ConfigError
from zoo.training.method import TrainContext
from zoo.training.generate import build_method


# ---------------------------------------------------------------- the manifold loss
def reference_manifold_loss(features, targets):
    """The equation written out: mean-pool, normalise, then sum_ij (<h_i, h_j> - <y_i, y_j>)^2 / B^2."""
    b = features.shape[0]
    h = [features[i].mean(dim=0) for i in range(b)]
    y = [targets[i].mean(dim=0) for i in range(b)]
    h = [v / v.norm() for v in h]
    y = [v / v.norm() for v in y]
    total = 0.0
    for i in range(b):
        for j in range(b):
            total = total + (torch.dot(h[i], h[j]) - torch.dot(y[i], y[j])) ** 2
    return total / b ** 2


def test_manifold_loss_matches_a_transcription_of_the_equation():
    torch.manual_seed(0)
    features, targets = torch.randn(5, 9, 12), torch.randn(5, 9, 7)  # widths may differ: B x B Gram matrices
    expected = reference_manifold_loss(features, targets)
    assert expected > 0.01
    assert torch.allclose(manifold_loss(features, targets), expected, atol=1e-6)


def test_flattened_manifold_form_is_the_ports_gram_of_normalised_tokens_with_mse():
    torch.manual_seed(3)
    features, targets = torch.randn(4, 6, 8), torch.randn(4, 6, 5)
    h = F.normalize(features, dim=-1).reshape(4, -1)
    y = F.normalize(targets, dim=-1).reshape(4, -1)
    expected = F.mse_loss(h @ h.T, y @ y.T)           # the port: mse over the B x B entries
    assert torch.allclose(manifold_loss(features, targets, "flattened"), expected, atol=1e-5)
    assert not torch.allclose(manifold_loss(features, targets, "pooled"), expected, atol=1e-3)


def test_manifold_form_is_checked_and_reaches_the_loss(micro_cfg):
    from zoo.training.generate import build_method

    with pytest.raises(ConfigError, match="urepa.manifold_form"):
        build_method(micro_cfg("urepa", "urepa.manifold_form=gram"))
    assert build_method(micro_cfg("urepa", "urepa.manifold_form=flattened")).options.manifold_form == "flattened"


def test_manifold_loss_is_zero_up_to_normalisation_and_permutation_invariant():
    torch.manual_seed(1)
    targets = torch.randn(6, 4, 8)
    scale = torch.rand(6, 1, 1) * 10 + 0.1  # a positive factor per sample vanishes in the normalisation
    assert manifold_loss(scale * targets, targets).item() == pytest.approx(0.0, abs=1e-6)
    features = torch.randn(6, 4, 8)
    perm = torch.randperm(6)
    assert not torch.equal(perm, torch.arange(6))
    assert torch.allclose(manifold_loss(features[perm], targets[perm]), manifold_loss(features, targets), atol=1e-7)
    # but permuting only one side breaks the sample-to-sample correspondence
    assert not torch.allclose(manifold_loss(features[perm], targets), manifold_loss(features, targets), atol=1e-4)


def test_manifold_loss_is_fp32_under_bf16_autocast():
    a, b = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = manifold_loss(a.bfloat16(), b)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, manifold_loss(a.bfloat16().float(), b))


# ---------------------------------------------------------------- project, then upsample
def test_the_projector_runs_before_the_upsampling():
    torch.manual_seed(2)
    hidden = torch.randn(2, 16, 24)  # a 4x4 middle stage
    proj = projector(24, 32, 10)
    got = project_then_upsample(hidden, proj, grid=8)
    coarse = proj(hidden).transpose(1, 2).reshape(2, 10, 4, 4)
    expected = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert got.shape == (2, 64, 10)
    assert torch.allclose(got, expected, atol=1e-6)
    # the other order gives something else: this test would fail if the code upsampled first
    other = proj(upsample_tokens(hidden, 8))
    assert (got - other).abs().max() > 1e-2
    # the losses use exactly these tokens
    targets = [torch.randn(2, 64, 10)]
    token, manifold = urepa_losses(hidden, [proj], targets)
    assert torch.allclose(token, negative_cosine(expected, targets[0]), atol=1e-6)
    assert torch.allclose(manifold, reference_manifold_loss(expected, targets[0]), atol=1e-6)
    assert not torch.allclose(token, negative_cosine(other, targets[0]), atol=1e-4)


def test_upsampling_is_the_identity_at_the_teachers_grid_and_nearest_copies():
    tokens = torch.randn(2, 16, 3)
    assert upsample_tokens(tokens, 4) is tokens
    up = upsample_tokens(tokens, 8, mode="nearest").reshape(2, 8, 8, 3)
    grid = tokens.reshape(2, 4, 4, 3)
    assert torch.equal(up[:, 2 * 1 + 1, 2 * 3], grid[:, 1, 3])  # each coarse token fills its 2x2 children


# ---------------------------------------------------------------- SiT-down: stages, sampling, skips
def small_usit(stages=(1, 1, 1, 1, 1), **kw):
    torch.manual_seed(0)
    model = USiT(input_size=16, in_channels=3, num_classes=5, stages=stages, patch=2, hidden=16, heads=2, **kw)
    for p in model.parameters():  # leave the zero init so that every block and the output do something
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_token_down_and_upsampling_follow_the_row_major_grid():
    torch.manual_seed(3)
    x = torch.randn(2, 8 * 8, 5)
    down = TokenDownsample(5)
    with torch.no_grad():  # make the merge an average of the 2x2 group: it must equal 2x2 average pooling
        down.reduce.weight.copy_(torch.cat([torch.eye(5)] * 4, dim=1) / 4)
        down.reduce.bias.zero_()
    pooled = F.avg_pool2d(x.transpose(1, 2).reshape(2, 5, 8, 8), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(down(x, 8), pooled, atol=1e-6)
    up = TokenUpsample(5)
    with torch.no_grad():  # make each child a copy of its parent: it must equal nearest upsampling
        up.expand.weight.copy_(torch.cat([torch.eye(5)] * 4, dim=0))
        up.expand.bias.zero_()
    coarse = torch.randn(2, 4 * 4, 5)
    assert torch.allclose(up(coarse, 4), upsample_tokens(coarse, 8, mode="nearest"))


def test_stage_grids_block_numbering_and_hidden_states_on_each_stages_grid():
    model = small_usit()
    assert model.grids == (8, 4, 2, 4, 8) and model.depth == 5 and middle_block((1, 1, 1, 1, 1)) == 3
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 4])
    out = model(x, t, y, hidden_layers=range(1, 6))
    assert {k: v.shape[1] for k, v in out.hidden.items()} == {1: 64, 2: 16, 3: 4, 4: 16, 5: 64}
    assert [model.block_grid(k) for k in range(1, 6)] == [8, 4, 2, 4, 8]
    assert out.velocity.shape == x.shape
    early = model(x, t, y, hidden_layers=(3,), stop_after=3)
    assert early.velocity is None and torch.allclose(early.hidden[3], out.hidden[3])


def test_forward_is_the_u_shape_written_out():
    """Encoder, middle, decoder, by hand from the model's own parts, for two downsampling levels."""
    model = small_usit()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    c = model.t_embedder(t) + model.y_embedder(y)
    block = [stage[0] for stage in model.stages]
    pos = {g: getattr(model, f"pos_embed_{g}") for g in (8, 4, 2)}
    e1 = block[0](model.x_embedder(x) + pos[8], c)                                   # 8x8
    e2 = block[1](model.downsamplers[0](e1, 8) + pos[4], c)                          # 4x4
    m = block[2](model.downsamplers[1](e2, 4) + pos[2], c)                           # 2x2, the middle stage
    d1 = block[3](model.skips[0].linear(torch.cat([model.upsamplers[0](m, 2), e2], -1)) + pos[4], c)
    d2 = block[4](model.skips[1].linear(torch.cat([model.upsamplers[1](d1, 4), e1], -1)) + pos[8], c)
    velocity = unpatchify(model.final_layer(d2, c), 2, 3)
    assert torch.allclose(model(x, t, y).velocity, velocity, atol=1e-5)


def test_each_decoder_stage_receives_the_matching_encoder_stages_tokens():
    model = small_usit()
    received = []
    for fusion in model.skips:
        original = fusion.forward
        fusion.forward = lambda tokens, skip, original=original: received.append((tokens, skip)) or original(tokens, skip)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 3])
    out = model(x, t, y, hidden_layers=(1, 2, 3, 4))
    assert len(received) == 2
    (up1, skip1), (up2, skip2) = received
    # the first decoder stage (4x4) gets encoder stage 2's output, the last (8x8) encoder stage 1's: the very tensors
    assert skip1 is out.hidden[2] and skip2 is out.hidden[1]
    assert up1.shape == skip1.shape == (2, 16, 16) and up2.shape == skip2.shape == (2, 64, 16)
    assert torch.allclose(up1, model.upsamplers[0](out.hidden[3], 2))
    assert torch.allclose(up2, model.upsamplers[1](out.hidden[4], 4))
    # and the skip matters: the output changes when an encoder stage's tokens are not passed on
    with torch.no_grad():
        model.skips[1].linear.weight[:, 16:] = 0
    assert not torch.allclose(model(x, t, y).velocity, out.velocity, atol=1e-4)


def test_zero_init_output_and_rope_per_stage():
    model = USiT(input_size=16, in_channels=3, num_classes=5, stages=(1, 2, 1), patch=2, hidden=16, heads=2, rope=True)
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert torch.all(out.velocity == 0) and model.null_label == 5
    assert sorted(model.ropes) == ["4", "8"] and model.ropes["4"].cos.shape[0] == 16


def test_parameter_counts_on_the_meta_device_beside_sits():
    # B and XL at SiT's depth (12 = 4+4+4, 28 = 9+10+9): the only extra parameters are, per level,
    # the merge Linear(4C, C), the split Linear(C, 4C) and the skip Linear(2C, C): 10 C^2 + 6 C
    for size, width in (("B", 768), ("XL", 1152)):
        extra = usit_parameter_count(size) - sit_parameter_count(size)
        assert extra == 10 * width ** 2 + 6 * width
    assert usit_parameter_count("B") == 136_206_352 and sit_parameter_count("B") == 130_303_504
    assert usit_parameter_count("XL") == 688_094_224 and sit_parameter_count("XL") == 674_816_272
    tiny = {"patch": 4, "input_size": 32, "in_channels": 3, "num_classes": 10}
    assert usit_parameter_count("tiny", **tiny) == 2_041_904 and sit_parameter_count("tiny", **tiny) == 1_877_296


# ---------------------------------------------------------------- the method
def iter_batches(cfg):
    return BatchLoader(build_dataset(cfg.data), cfg.data, cfg.train.batch_size, cfg.train.seed).iterate(0)


def flattened_manifold(z, y):
    """The ports' form: Gram matrices of each sample's flattened, token-normalised features, their MSE."""
    h, g = F.normalize(z, dim=-1).flatten(1), F.normalize(y, dim=-1).flatten(1)
    return F.mse_loss(h @ h.T, g @ g.T)


@pytest.mark.parametrize("mode, form", [("bilinear", "pooled"), ("bicubic", "flattened"), ("nearest", "pooled")])
def test_method_aligns_the_middle_stage_projected_then_upsampled_to_the_teachers_grid(micro_cfg, seeded_loss, mode,
                                                                                     form):
    cfg = micro_cfg("urepa", "urepa.feature_cache=never", "model.class_dropout=0", f"urepa.upsample={mode}",
                    f"urepa.manifold_form={form}")
    method = build_method(cfg)
    method.setup("cpu")
    model = method.build_model()
    backbone = model.backbone
    assert backbone.stage_depths == (1, 1, 1) and backbone.grids == (8, 4, 8)
    assert method.hidden_layers() == (2,)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    batch = next(iter_batches(cfg))
    terms, t, x, x_t = seeded_loss(method, model, batch)
    hidden = backbone(x_t, t, batch["label"], hidden_layers=(2,)).hidden[2]
    assert hidden.shape[1] == 16  # the 4x4 middle stage
    y = method.teacher.encoders[0](x)
    assert y.shape[1] == 64  # the teacher's tokens are on the full-resolution 8x8 grid
    proj = model.extras["projectors"][0]
    grid = proj(hidden).transpose(1, 2).reshape(len(x), -1, 4, 4)
    z = F.interpolate(grid, size=(8, 8), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    z = z.flatten(2).transpose(1, 2)
    assert set(terms) == {"flow", "token", "manifold"}
    assert torch.allclose(terms["token"].value, negative_cosine(z, y), atol=1e-5)
    manifold = reference_manifold_loss(z, y) if form == "pooled" else flattened_manifold(z, y)
    assert torch.allclose(terms["manifold"].value, manifold, atol=1e-5)
    lam, w = cfg.urepa.proj_coeff, cfg.urepa.manifold_coeff
    assert (lam, w) == (0.5, 3.0)
    assert terms["token"].weight == lam and terms["manifold"].weight == pytest.approx(lam * w)


def test_alignment_gradients_reach_the_encoder_and_middle_stage_only(micro_cfg):
    method = build_method(micro_cfg("urepa", "urepa.feature_cache=never"))
    method.setup("cpu")
    model = method.build_model()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    terms = method.loss_terms(model, next(iter_batches(method.cfg)), TrainContext(0, None))
    (terms["token"].value + terms["manifold"].value).backward()
    named = dict(model.backbone.named_parameters())
    assert named["stages.0.0.attn.qkv.weight"].grad.abs().sum() > 0     # encoder stage
    assert named["stages.1.0.mlp.fc1.weight"].grad.abs().sum() > 0      # middle stage
    assert named["downsamplers.0.reduce.weight"].grad.abs().sum() > 0
    for key in ("stages.2.0.attn.qkv.weight", "upsamplers.0.expand.weight", "skips.0.linear.weight",
                "final_layer.linear.weight"):
        assert named[key].grad is None, key  # after the middle stage: untouched by the alignment


def test_config_errors_are_clear(micro_cfg):
    with pytest.raises(ConfigError, match=r"urepa.stages=\[2, 2\] must be an odd number"):
        build_method(micro_cfg("urepa", "urepa.stages=[2,2]")).build_model()
    with pytest.raises(ConfigError, match="model.depth=4 but the stages"):
        build_method(micro_cfg("urepa", "model.depth=4")).build_model()
    with pytest.raises(ConfigError, match="urepa.feature_cache='maybe'; valid: auto, always, never"):
        build_method(micro_cfg("urepa", "urepa.feature_cache=maybe"))
    with pytest.raises(ConfigError, match="bilinear, bicubic, nearest"):
        build_method(micro_cfg("urepa", "urepa.upsample=linear"))
    with pytest.raises(ConfigError, match="blocks 1..3"):
        build_method(micro_cfg("urepa", "urepa.align_block=7")).build_model()
    with pytest.raises(ConfigError, match="cannot be halved 4 time"):  # 8x8 tokens, four levels
        build_method(micro_cfg("urepa", "urepa.stages=[1,1,1,1,1,1,1,1,1]")).build_model()
    with pytest.raises(ConfigError, match="no stage layout; set urepa.stages"):
        build_method(micro_cfg("urepa", "model.size=custom", "model.hidden=32", "model.heads=2")).build_model()
    custom = build_method(micro_cfg("urepa", "model.size=custom", "model.hidden=32", "model.heads=2",
                                    "urepa.stages=[2,1,2]")).build_model()
    assert custom.backbone.depth == 5 and custom.backbone.hidden_size == 32


def test_presets():
    from zoo.config import load_config

    for preset, stages in (("tiny", (2, 2, 2)), ("B", (4, 4, 4)), ("XL", (9, 10, 9))):
        method = build_method(load_config("urepa", [f"preset={preset}"]))
        assert method.stages() == stages and method.hidden_layers() == (middle_block(stages),)
    assert load_config("urepa", ["preset=XL"]).urepa.manifold_coeff == 3.0


def test_a_token_count_that_is_no_square_and_an_unknown_manifold_form_are_clear_errors():
    from methods.urepa import token_grid_side

    with pytest.raises(ValueError, match="^17 tokens do not form a square grid$"):
        token_grid_side(torch.zeros(2, 17, 4))
    with pytest.raises(ValueError, match="unknown manifold form 'gram'"):
        manifold_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 3), "gram")
