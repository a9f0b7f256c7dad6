"""The SiT backbone: paper parameter counts, hidden states, block options."""
import pytest
import torch

from zoo.backbones.layers import Block, RoPE2D, unpatchify
from zoo.backbones.sit import SiT, sit_parameter_count
from zoo.errors import ConfigError

PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("size", list(PAPER_PARAMS))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_parameter_counts_match_papers(size, patch):
    # 256 tokens of 4 channels at patch 2 (32x32x4 SD-VAE latents), counted on the meta device
    n = sit_parameter_count(size, patch=patch, input_size=32, in_channels=4, num_classes=1000)
    assert abs(n - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.01


def small_sit(**kw):
    torch.manual_seed(0)
    args = dict(input_size=16, in_channels=3, num_classes=5, patch=4, hidden=32, depth=3, heads=2)
    args.update(kw)
    return SiT(**args)


def test_output_shape_and_zero_init():
    model = small_sit()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 4])
    out = model(x, t, y)
    assert out.velocity.shape == x.shape
    assert torch.all(out.velocity == 0)  # adaLN-Zero: the output layer starts at zero
    assert model.null_label == 5 and model.y_embedder.embedding_table.num_embeddings == 6


def test_hidden_states_are_the_block_outputs():
    model = small_sit()
    for p in model.parameters():  # leave zero-init so that blocks do something
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    out = model(x, t, y, hidden_layers=(1, 3))
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    expected = {}
    for k, block in enumerate(model.blocks, start=1):
        tokens = block(tokens, c)
        expected[k] = tokens
    assert set(out.hidden) == {1, 3}
    assert torch.allclose(out.hidden[1], expected[1]) and torch.allclose(out.hidden[3], expected[3])
    early = model(x, t, y, hidden_layers=(2,), stop_after=2)
    assert early.velocity is None and torch.allclose(early.hidden[2], expected[2])


def test_bad_hidden_layer_is_a_clear_error():
    with pytest.raises(ConfigError, match="blocks 1..3"):
        small_sit()(torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([0]), hidden_layers=(4,))


@pytest.mark.parametrize("opts", [dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(qk_norm=True), dict(rope=True),
                                  dict(norm="rmsnorm", mlp="swiglu", qk_norm=True, rope=True)])
def test_block_options_build_and_run(opts):
    model = small_sit(hidden=32, heads=2, **opts)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert out.velocity.shape == (2, 3, 16, 16) and torch.isfinite(out.velocity).all()


def test_block_accepts_per_token_modulation():
    torch.manual_seed(0)
    block = Block(16, 2)
    torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5)
    x = torch.randn(1, 2, 16).repeat(1, 1, 1)
    x = torch.cat([x[:, :1], x[:, :1]], dim=1)  # two identical tokens
    c = torch.randn(1, 2, 16)                   # ...modulated by different conditions
    out = block(x, c)
    assert not torch.allclose(out[:, 0], out[:, 1])
    same = block(x, c[:, :1].expand(1, 2, 16))
    assert torch.allclose(same, block(x, c[:, 0]), atol=1e-6)  # per-token == per-sample when all equal


def test_rope_is_a_rotation():
    rope = RoPE2D(8, 4)
    q = torch.randn(1, 2, 16, 8)
    assert torch.allclose(rope(q).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # relative: <R_m q, R_n k> depends only on the offset, so token 0 against itself is unchanged
    assert torch.allclose(rope(q)[..., 0, :], q[..., 0, :], atol=1e-6)


def test_unpatchify_inverts_patch_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = 4
    tokens = x.reshape(2, 3, 2, p, 2, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, p * p * 3)
    assert torch.equal(unpatchify(tokens, p, 3), x)
