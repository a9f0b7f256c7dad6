"""iREPA: its target normalisation and conv projector against direct transcriptions, REPA as its special case,
and one clear line for a bad option."""
import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.teachers.alignment import ConvProjector, spatial_zscore
from zoo.training.generate import build_method
from zoo.training.method import TrainContext


def test_spatial_zscore_is_the_per_image_formula_over_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(2, 9, 5) + torch.tensor([3.0, -1.0, 0.0, 2.0, 0.5])   # a shared offset per channel
    alpha = 0.6
    expected = torch.empty_like(tokens)
    for b in range(2):
        for d in range(5):
            column = tokens[b, :, d]
            mean = column.sum() / 9
            std = ((column - mean) ** 2).sum().div(9 - 1).sqrt()   # Bessel's correction
            expected[b, :, d] = (column - alpha * mean) / (std + 1e-6)
    assert torch.allclose(spatial_zscore(tokens, alpha), expected, atol=1e-6)
    # alpha 1: every image's tokens have mean 0 and std 1 in every channel; alpha 0 keeps the mean
    full = spatial_zscore(tokens, 1.0)
    assert torch.allclose(full.mean(1), torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(full.std(1), torch.ones(2, 5), atol=1e-5)
    assert not torch.allclose(spatial_zscore(tokens, 0.0).mean(1), torch.zeros(2, 5), atol=0.1)


def test_conv_projector_sums_each_tokens_row_major_neighbourhood():
    torch.manual_seed(1)
    side, width, out = 3, 4, 2
    proj = ConvProjector(width, out, kernel=3)
    hidden = torch.randn(2, side * side, width)
    weight, bias = proj.conv.weight, proj.conv.bias        # [out, width, 3, 3]
    expected = torch.zeros(2, side * side, out)
    for n in range(side * side):
        i, j = divmod(n, side)                             # token n sits at row i, column j
        value = bias.expand(2, out).clone()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if 0 <= i + di < side and 0 <= j + dj < side:  # zero padding outside the grid
                    value += hidden[:, (i + di) * side + (j + dj)] @ weight[:, :, di + 1, dj + 1].T
        expected[:, n] = value
    assert torch.allclose(proj(hidden), expected, atol=1e-5)
    # kernel 1 is a token-wise linear map
    one = ConvProjector(width, out, kernel=1)
    assert torch.allclose(one(hidden), F.linear(hidden, one.conv.weight[:, :, 0, 0], one.conv.bias), atol=1e-6)
    with pytest.raises(ValueError, match="square token grid"):
        proj(torch.randn(1, 8, width))


def test_the_method_aligns_to_normalised_tokens_through_the_conv(micro_cfg, first_batch):
    method = build_method(micro_cfg("irepa", "irepa.feature_cache=never", "model.class_dropout=0"))
    method.setup("cpu")
    model = method.build_model()
    assert isinstance(model.extras["projectors"][0], ConvProjector)
    batch = first_batch(method.cfg)
    raw = method.teacher.tokens(batch)[0]
    assert torch.allclose(method.targets(batch)["tokens"][0], spatial_zscore(raw, 0.6))
    torch.manual_seed(3)
    terms = method.loss_terms(model, batch, TrainContext(0, None))
    assert set(terms) == {"flow", "repa"} and terms["repa"].weight == 1.0
    assert method.used()["teacher"].endswith(", spatially z-scored (alpha 0.6)")   # what its compare row says


def test_with_repas_projector_targets_and_weight_it_is_repa(micro_cfg, first_batch):
    """projector=mlp, spatial_norm=none, proj_coeff=0.5: the same loss terms as REPA on the same weights."""
    repa = build_method(micro_cfg("repa", "repa.feature_cache=never"))
    irepa = build_method(micro_cfg("irepa", "irepa.feature_cache=never", "irepa.projector=mlp",
                                   "irepa.spatial_norm=none", "irepa.proj_coeff=0.5"))
    repa.setup("cpu")
    irepa.setup("cpu")
    torch.manual_seed(0)
    model = repa.build_model()
    twin = irepa.build_model()
    twin.load_state_dict(model.state_dict())
    batch = first_batch(repa.cfg)
    torch.manual_seed(4)
    a = repa.loss_terms(model, batch, TrainContext(0, None))
    torch.manual_seed(4)
    b = irepa.loss_terms(twin, batch, TrainContext(0, None))
    for name in ("flow", "repa"):
        assert torch.equal(a[name].value, b[name].value) and a[name].weight == b[name].weight
    # the default (conv, zscore) is a different loss on the same batch
    default = build_method(micro_cfg("irepa", "irepa.feature_cache=never"))
    default.setup("cpu")
    assert not torch.equal(default.targets(batch)["tokens"][0], irepa.targets(batch)["tokens"][0])


@pytest.mark.parametrize("override, message", [
    ("irepa.projector_kernel=2", "irepa.projector_kernel=2: needs an odd size"),
    ("irepa.projector=attention", "irepa.projector='attention'; valid: conv, mlp, linear"),
    ("irepa.spatial_norm=layer", "irepa.spatial_norm='layer'; valid: zscore, none"),
])
def test_bad_options_name_the_key_and_the_valid_values(micro_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_method(micro_cfg("irepa", override))


def test_spatial_zscore_runs_in_fp32_for_bf16_tokens():
    tokens = torch.randn(2, 16, 8) + 3.0
    out = spatial_zscore(tokens.bfloat16(), 0.6)
    assert out.dtype == torch.float32
    assert torch.allclose(out, spatial_zscore(tokens.bfloat16().float(), 0.6))
