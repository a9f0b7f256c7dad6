"""REG: its equations against direct transcriptions on hand-built tensors, the class token through the backbone and
the sampler, what serves as the class token, and its options. The official golden outputs: tests/official/."""
import pytest
import torch
import torch.nn.functional as F

import zoo.teachers.teacher
from methods.reg import (REGSiT, WithClassToken, guided_pair, pack, unpack, with_mean_token)
from zoo.errors import ConfigError
from zoo.flow.guidance import Guidance
from zoo.flow.samplers import EulerODE
from zoo.teachers import Encoder
from zoo.training.generate import build_method
from zoo.training.method import TrainContext

NO_TEACHER = ["reg.feature_cache=never", "model.class_dropout=0"]


class FakeTeacher(Encoder):
    """A frozen stand-in for the teacher: fixed random patch tokens per image (no training, no weights)."""
    name, dim = "fake", 16

    def __init__(self, grid, dim=16):
        super().__init__(grid)
        self.dim = dim
        self.mix = torch.nn.Linear(3, dim)

    @torch.no_grad()
    def forward(self, images):
        pooled = F.adaptive_avg_pool2d(images, self.grid).flatten(2).transpose(1, 2)
        return self.mix(pooled)


@pytest.fixture
def reg(micro_cfg, monkeypatch):
    """The micro REG with a fake 16-wide teacher (no class token: `auto` takes the mean of its patch tokens)."""
    def make(*overrides):
        monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: [16])
        monkeypatch.setattr(zoo.teachers.teacher, "build_encoders",
                            lambda *a, grid, **k: [FakeTeacher(grid).freeze()])
        method = build_method(micro_cfg("reg", *NO_TEACHER, *overrides))
        method.setup("cpu")
        torch.manual_seed(0)
        return method, randomised(method.build_model())

    return make


def randomised(model):
    """Every zero-initialised layer re-drawn, so that outputs depend on every input."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            elif p.dim() == 1 and p.abs().max() == 0:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def batch_of(n=4, size=32):
    torch.manual_seed(1)
    return {"image": torch.rand(n, 3, size, size) * 2 - 1, "label": torch.arange(n) % 3,
            "index": torch.arange(n), "flip": torch.zeros(n, dtype=torch.bool)}


def test_the_mean_token_is_put_first():
    tokens = torch.randn(2, 5, 3)
    out = with_mean_token(tokens)
    assert out.shape == (2, 6, 3)
    assert torch.allclose(out[:, 0], tokens.sum(1) / 5) and torch.equal(out[:, 1:], tokens)


def test_the_class_token_is_noised_at_the_images_t_with_its_own_noise_drawn_after_the_images(reg):
    method, model = reg()
    batch = batch_of()
    torch.manual_seed(7)
    noisy = method.noised(model, batch)
    torch.manual_seed(7)   # the draws written out, in the official order: t, eps, eps_c
    t = torch.rand(4)
    eps = torch.randn_like(batch["image"])
    eps_c = torch.randn(4, 16)
    c = method.teacher.encoders[0](batch["image"]).mean(1)
    assert torch.equal(noisy.t, t) and torch.equal(noisy.eps, eps) and torch.equal(noisy.class_eps, eps_c)
    assert torch.allclose(noisy.class_token, c, atol=1e-6)
    assert torch.allclose(noisy.class_t, (1 - t[:, None]) * c + t[:, None] * eps_c, atol=1e-6)
    assert torch.allclose(noisy.x_t, (1 - t[:, None, None, None]) * batch["image"] + t[:, None, None, None] * eps)
    assert not noisy.class_token.requires_grad   # the teacher is frozen


def test_the_losses_are_the_equations_written_out(reg):
    method, model = reg()
    batch = batch_of()
    torch.manual_seed(3)
    terms = method.loss_terms(model, batch, TrainContext(0, None))
    torch.manual_seed(3)
    noisy = method.noised(model, batch)
    out = model.backbone(noisy.x_t, noisy.t, noisy.y, hidden_layers=(1,), class_token=noisy.class_t)
    image_loss = sum(((out.velocity[b] - (noisy.eps[b] - noisy.x[b])) ** 2).mean() for b in range(4)) / 4
    class_loss = sum(((out.class_velocity[b] - (noisy.class_eps[b] - noisy.class_token[b])) ** 2).mean()
                     for b in range(4)) / 4
    teacher = method.teacher.encoders[0](batch["image"])
    aligned = torch.cat([teacher.mean(1, keepdim=True), teacher], 1)   # [c ; y*], 1 + 64 tokens
    z = model.extras["projectors"][0](out.hidden[1])
    cosines = [F.cosine_similarity(z[b, n], aligned[b, n], dim=0) for b in range(4) for n in range(65)]
    assert set(terms) == {"flow", "cls", "repa"}
    assert torch.allclose(terms["flow"].value, image_loss, atol=1e-6)
    assert torch.allclose(terms["cls"].value, class_loss, atol=1e-6)
    assert torch.allclose(terms["repa"].value, -torch.stack(cosines).mean(), atol=1e-5)
    assert (terms["flow"].weight, terms["cls"].weight, terms["repa"].weight) == (1.0, 0.03, 0.5)


def test_the_class_token_is_one_more_token_without_position_and_its_own_head(reg):
    method, model = reg()
    backbone = model.backbone
    assert isinstance(backbone, REGSiT) and backbone.class_in.in_features == backbone.class_out.out_features == 16
    torch.manual_seed(2)
    x, t, y, c = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1]), torch.randn(2, 16)
    out = backbone(x, t, y, hidden_layers=(1, 2), class_token=c)
    assert out.hidden[1].shape == (2, 1 + 64, 32) and out.class_velocity.shape == (2, 16)
    # entangled: the class token changes the image's velocity, and the image the class token's
    other = backbone(x, t, y, class_token=-c)
    assert (other.velocity - out.velocity).abs().max() > 1e-4
    assert (backbone(x.flip(0), t, y, class_token=c).class_velocity - out.class_velocity).abs().max() > 1e-4
    # its input token: LN(W_in c + b), before the patch tokens, which carry the position table
    first = backbone.class_norm(backbone.class_in(c))
    tokens = torch.cat([first[:, None], backbone.x_embedder(x) + backbone.pos_embed], 1)
    cond = backbone.condition(t, y)
    assert torch.allclose(backbone.blocks[0](tokens, cond), out.hidden[1], atol=1e-5)
    with pytest.raises(ValueError, match="class token"):
        backbone(x, t, y)


def test_at_initialisation_the_class_head_is_zero_and_the_input_projection_xavier(micro_cfg, monkeypatch):
    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: [16])
    backbone = build_method(micro_cfg("reg", *NO_TEACHER)).build_backbone()
    assert backbone.class_out.weight.abs().max() == 0 and backbone.class_out.bias.abs().max() == 0
    assert backbone.class_in.bias.abs().max() == 0
    bound = (6 / (16 + 32)) ** 0.5
    assert backbone.class_in.weight.abs().max() <= bound and backbone.class_in.weight.std() > bound / 4


def test_pack_and_unpack_are_inverse():
    image, cls = torch.randn(3, 2, 4, 4), torch.randn(3, 5)
    state = pack(image, cls)
    assert state.shape == (3, 2 * 16 + 5)
    back = unpack(state, (2, 4, 4))
    assert torch.equal(back[0], image) and torch.equal(back[1], cls)


class LinearBackbone(torch.nn.Module):
    """v = a x + y, v_c = b c + y: a backbone whose CFG result is known in closed form."""
    null_label = 9

    def forward(self, x, t, y, class_token=None):
        from methods.reg import REGOutput

        return REGOutput(2 * x + y[:, None, None, None], None, 3 * class_token + y[:, None])


@pytest.mark.parametrize("scale, class_scale", [(1.0, 5.0), (3.0, 3.0), (3.0, 1.0), (2.0, 4.0)])
def test_cfg_guides_each_part_with_its_own_scale_and_only_where_the_image_is_guided(scale, class_scale):
    x, c, t, y = torch.randn(2, 1, 2, 2), torch.randn(2, 3), torch.full((2,), 0.5), torch.tensor([1, 2])
    v, v_c = guided_pair(LinearBackbone(), x, c, t, y, Guidance(scale), class_scale)
    y_image = (9 + scale * (y - 9)) if scale > 1 else y           # v_u + w (v_c - v_u) on the label term
    y_class = (9 + class_scale * (y - 9)) if scale > 1 else y     # unguided outside the image's guidance
    assert torch.allclose(v, 2 * x + y_image[:, None, None, None].float())
    assert torch.allclose(v_c, 3 * c + y_class[:, None].float())
    outside = guided_pair(LinearBackbone(), x, c, t, y, Guidance(scale, 0.0, 0.4), class_scale)
    assert torch.allclose(outside[1], 3 * c + y[:, None].float())


def test_the_class_tokens_cfg_scale_defaults_to_the_images(reg):
    method, _ = reg()
    assert method.class_guidance(Guidance(2.3)) == 2.3
    assert method.class_guidance(Guidance(2.3), class_cfg=1.0) == 1.0
    assert reg("reg.class_cfg_scale=1.7")[0].class_guidance(Guidance(2.3)) == 1.7
    with pytest.raises(ConfigError, match="--class-cfg"):
        method.class_guidance(Guidance(2.0), class_cfg=-1)


def test_generate_draws_the_class_noise_after_the_images_and_drops_the_class_token(reg):
    method, model = reg()
    model.eval()
    labels = torch.tensor([0, 1])
    images = method.generate(model, labels, EulerODE(3), generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    noise, class_noise = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 16, generator=gen)
    field = method.velocity_field(model, labels, Guidance())
    state = EulerODE(3).sample(field, pack(noise, class_noise), method.path)
    assert images.shape == (2, 3, 32, 32)
    assert torch.allclose(images, unpack(state, (3, 32, 32))[0].clamp(-1, 1), atol=1e-6)
    # the generated class token is carried: another class noise gives other images
    other = EulerODE(3).sample(field, pack(noise, -class_noise), method.path)
    assert (unpack(other, (3, 32, 32))[0] - unpack(state, (3, 32, 32))[0]).abs().max() > 1e-4


def test_a_dinov2_teacher_gives_its_cls_token_first_and_the_builtin_one_the_mean(micro_cfg, monkeypatch):
    from zoo.teachers import pretrained

    torch.manual_seed(0)
    dino = pretrained.build_dinov2("dinov2-vit-s-reg", grid=4, random_init=True, embed_dim=32, depth=1, num_heads=2)
    wrapped = WithClassToken(dino)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = wrapped(images)
    features = dino.net.forward_features(dino.preprocess(images))
    assert tokens.shape == (2, 1 + 16, 32)
    assert torch.allclose(tokens[:, 0], features[:, 0], atol=1e-6)   # CLS, not a register (5 prefix tokens)
    assert torch.allclose(tokens[:, 1:], dino(images), atol=1e-6)
    assert wrapped.identity() != dino.identity()                       # its own feature cache
    assert WithClassToken.has_class_token(dino) and not WithClassToken.has_class_token(FakeTeacher(4))

    def teacher_with(encoder, mode):
        monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: [encoder.dim])
        monkeypatch.setattr(zoo.teachers.teacher, "build_encoders", lambda *a, **k: [encoder])
        method = build_method(micro_cfg("reg", *NO_TEACHER, f"reg.class_token={mode}"))
        method.setup("cpu")
        return method

    assert teacher_with(dino, "auto").teacher.uses_cls
    assert not teacher_with(dino, "mean").teacher.uses_cls
    assert not teacher_with(FakeTeacher(8), "auto").teacher.uses_cls
    with pytest.raises(ConfigError, match="reg.class_token=cls: encoder .* has no class token"):
        teacher_with(FakeTeacher(8), "cls")
    method = teacher_with(dino, "cls")
    targets = method.targets(batch_of(2))
    assert torch.allclose(targets["class_token"], targets["tokens"][0][:, 0])
    assert targets["tokens"][0].shape == (2, 1 + 16, 32)   # the stand-in was built for a 4x4 grid


@pytest.mark.parametrize("override, message", [
    ("reg.class_token=first", "reg.class_token='first'; valid: auto, cls, mean"),
    ("reg.class_cfg_scale=-1", "reg.class_cfg_scale=-1.0 must be >= 0"),
    ("reg.encoder=builtin,builtin", "exactly one encoder"),
])
def test_bad_options_are_one_clear_error(micro_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_method(micro_cfg("reg", override))


def test_rope_is_refused(micro_cfg, monkeypatch):
    monkeypatch.setattr(zoo.teachers.teacher, "encoder_dims", lambda names, cfg: [16])
    with pytest.raises(ConfigError, match="model.rope=true"):
        build_method(micro_cfg("reg", "model.rope=true")).build_backbone()


@pytest.mark.parametrize("preset, depth", [("B", 4), ("XL", 8)])
def test_the_paper_presets_are_the_official_recipe(preset, depth):
    from zoo.config import load_config

    cfg = load_config("reg", [f"preset={preset}"])
    assert (cfg.model.time_scale, cfg.model.time_convention) == (1.0, "noise")
    assert (cfg.reg.encoder_depth, cfg.reg.projector_dim, cfg.reg.proj_coeff, cfg.reg.class_weight) == \
        (depth, 2048, 0.5, 0.03)
    recipe = load_config("reg", [], "imagenet256-XL")
    assert (recipe.reg.encoder, recipe.reg.class_cfg_scale, recipe.sample.cfg_scale) == ("dinov2-vit-b", 2.3, 2.3)
    assert (recipe.sample.sampler, recipe.sample.steps, list(recipe.sample.cfg_interval)) == ("sde", 250, [0.0, 0.85])
