"""ReDi: joint noising, the merged patch embedding, feature dropout, representation guidance with and without
CFG against transcriptions of the equations, the PCA's identity, and the eval/sample plumbing of --rg."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from methods.redi import guided_velocity, without_features
from zoo.errors import ConfigError
from zoo.flow.guidance import Guidance
from zoo.training.method import TrainContext
from zoo.latents.pca import fit_pca, pca_identity, save_pca
from zoo.training.generate import build_method

NULL = 10


def redi(micro_cfg, *overrides, setup=True):
    cfg = micro_cfg("redi", "model.class_dropout=0", *overrides)
    method = build_method(cfg)
    if setup:
        method.setup("cpu")
    return method, method.build_model(), cfg


def spy_on_backbone(model):
    """Record what the backbone is called with (x_t, t, y) and return its real output."""
    calls, forward = [], model.backbone.forward

    def spy(x, t, y, **kwargs):
        calls.append((x.detach().clone(), t.detach().clone(), y.clone()))
        return forward(x, t, y, **kwargs)

    model.backbone.forward = spy
    return calls


def test_state_is_the_image_and_r_feature_channels_and_decode_keeps_the_image(micro_cfg):
    method, model, cfg = redi(micro_cfg, setup=False)
    assert method.state_shape() == (3 + cfg.redi.rank, 32, 32)
    backbone = model.backbone
    assert backbone.in_channels == backbone.out_channels == 3 + cfg.redi.rank
    state = torch.randn(2, *method.state_shape())
    assert torch.equal(method.decode(model, state), state[:, :3])


def test_merged_embedding_is_x_wx_plus_r_wr_on_a_hand_built_example(micro_cfg):
    """One patch embedding of the concatenation [x ; r] is the sum of an image and a feature patch embedding."""
    _, model, cfg = redi(micro_cfg, setup=False)
    embed = model.backbone.x_embedder
    c, r, p, hidden = 3, cfg.redi.rank, embed.patch, embed.proj.out_channels
    g = torch.Generator().manual_seed(0)
    w = torch.randn(hidden, c + r, p, p, generator=g)
    b = torch.randn(hidden, generator=g)
    with torch.no_grad():
        embed.proj.weight.copy_(w)
        embed.proj.bias.copy_(b)
    x, feats = torch.randn(2, c, 32, 32, generator=g), torch.randn(2, r, 32, 32, generator=g)

    def patches(a):  # [B, C, H, W] -> [B, N, C*p*p], row-major over the patch grid, (channel, row, col) per patch
        n = a.shape[-1] // p
        return a.reshape(a.shape[0], a.shape[1], n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(a.shape[0], n * n, -1)

    w_x, w_r = w[:, :c].reshape(hidden, -1), w[:, c:].reshape(hidden, -1)
    expected = patches(x) @ w_x.T + patches(feats) @ w_r.T + b
    tokens = embed(torch.cat([x, feats], 1))
    assert tokens.shape == (2, (32 // p) ** 2, hidden)        # sequence length unchanged
    assert torch.allclose(tokens, expected, atol=1e-4)


def test_joint_noising_uses_one_t_and_independent_noise(micro_cfg, first_batch):
    method, model, cfg = redi(micro_cfg, "redi.feature_dropout=0", "train.batch_size=16")
    batch = first_batch(cfg)
    calls = spy_on_backbone(model)
    torch.manual_seed(3)
    terms = method.loss_terms(model, batch, TrainContext(0, None))
    (x_t, t, _), = calls
    # the clean joint state: the image, then the teacher's PCA features on its grid
    x = torch.cat([batch["image"], method.targets(batch)["features"]], 1)
    torch.manual_seed(3)                                        # the same draws: t, then eps
    t_ref = torch.rand(16)
    eps = torch.randn_like(x)
    tb = t_ref[:, None, None, None]
    assert torch.equal(t, t_ref)
    assert torch.allclose(x_t, (1 - tb) * x + tb * eps, atol=1e-5)   # the linear path, one t for both parts
    # the noise the model saw, recovered from x_t, is standard normal and uncorrelated between the parts
    seen = (x_t - (1 - tb) * x) / tb
    img, feat = seen[:, :3].flatten(), seen[:, 3:6].flatten()
    assert abs(torch.corrcoef(torch.stack([img, feat]))[0, 1]) < 0.05
    assert 0.9 < seen[:, 3:].std() < 1.1
    # the two loss terms: the image and the feature part of the velocity target eps - x
    v = model.backbone(x_t, t, batch["label"]).velocity
    target = eps - x
    assert torch.allclose(terms["flow"].value, ((v[:, :3] - target[:, :3]) ** 2).mean(), atol=1e-5)
    assert torch.allclose(terms["features"].value, ((v[:, 3:] - target[:, 3:]) ** 2).mean(), atol=1e-5)
    assert terms["features"].weight == cfg.redi.feature_weight == 1.0


def test_features_are_the_teachers_standardised_pca_coordinates_on_the_state_grid(micro_cfg, first_batch):
    method, _, cfg = redi(micro_cfg, "redi.feature_cache=never")
    batch = first_batch(cfg)
    tokens = method.teacher.encoders[0](batch["image"])                 # [B, 64, D] on the 8x8 token grid
    pca, r = method.pca, cfg.redi.rank
    coords = ((tokens - pca.mean) / pca.std) @ pca.components[:r].T
    grid = coords.reshape(len(tokens), 8, 8, r).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(method.targets(batch)["features"], expected, atol=1e-4)


@pytest.mark.parametrize("dropped", ["noise", "zeros"])
def test_feature_dropout_zeroes_the_features_and_removes_the_feature_loss(micro_cfg, dropped, first_batch):
    """Officially the clean features are zeroed before noising, so the model sees sigma_t eps in their channels
    (`noise`); `zeros` zeroes the noisy input instead, as the representation-guidance pass sees it."""
    method, model, cfg = redi(micro_cfg, "redi.feature_dropout=1", f"redi.dropped_features={dropped}")
    batch = first_batch(cfg)
    calls = spy_on_backbone(model)
    for p in model.parameters():  # a model whose feature outputs are not zero, so the feature loss has gradients
        p.data += 0.05 * torch.randn_like(p)
    torch.manual_seed(5)
    terms = method.loss_terms(model, batch, TrainContext(0, None))
    (x_t, t, _), = calls
    torch.manual_seed(5)
    t_ref = torch.rand(len(t))
    eps = torch.randn_like(x_t)
    expected = torch.zeros_like(x_t[:, 3:]) if dropped == "zeros" else t_ref[:, None, None, None] * eps[:, 3:]
    assert torch.allclose(x_t[:, 3:], expected, atol=1e-6) and x_t[:, :3].abs().max() > 0
    assert terms["features"].weight == 0
    model.zero_grad()
    sum(term.weight * term.value for term in terms.values()).backward(retain_graph=True)
    total = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    terms["flow"].value.backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(total, model.parameters()))
    # without dropout the same features do carry a loss with weight lambda_r
    kept, _, _ = redi(micro_cfg, "redi.feature_dropout=0", "redi.feature_weight=0.5")
    assert kept.loss_terms(model, batch, TrainContext(0, None))["features"].weight == 0.5
    assert calls[-1][0][:, 3:].abs().max() > 0


def test_feature_dropout_is_drawn_once_per_batch_with_its_probability(micro_cfg):
    method, _, _ = redi(micro_cfg, "redi.feature_dropout=0.2", setup=False)
    torch.manual_seed(0)
    rate = sum(method.drop_features() for _ in range(4000)) / 4000
    assert rate == pytest.approx(0.2, abs=0.02)


# ------------------------------------------------------------------ guidance
def toy_model(x, t, y):
    """A velocity that depends on the image and feature channels, on t and on the label (so every guidance
    term is non-zero): mixes channels, adds a label- and time-dependent offset."""
    c = x.shape[1]
    mix = torch.linspace(-1, 1, c * c).reshape(c, c)
    label = torch.sin(y.float() + 1)[:, None, None, None] * torch.arange(1, c + 1).float()[None, :, None, None]
    return torch.einsum("dc,bchw->bdhw", mix, x) + label * (1 + t[:, None, None, None]) + x.pow(2)


def guide_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 7, 8, 8, generator=g), torch.tensor([0, 3, 5, 9])


@pytest.mark.parametrize("t", [0.2, 0.9])
def test_rg_weight_one_and_no_cfg_is_the_unguided_joint_velocity(t):
    x, y = guide_inputs()
    tt = torch.full((4,), t)
    v = guided_velocity(toy_model, x, tt, y, NULL, 3, Guidance(), Guidance(1.0))
    assert torch.equal(v, toy_model(x, tt, y))


def test_rg_alone_matches_the_papers_formula_on_every_channel():
    x, y = guide_inputs()
    t, w_r = torch.full((4,), 0.5), 2.5
    v = guided_velocity(toy_model, x, t, y, NULL, 3, Guidance(), Guidance(w_r))
    with_r, without_r = toy_model(x, t, y), toy_model(without_features(x, 3), t, y)
    # the official forward_with_rg guides the feature channels too
    assert torch.allclose(v, without_r + w_r * (with_r - without_r), atol=1e-5)


def paper_cfg_plus_rg(model, x, t, y, w, w_r, channels=3, cfg_features=False):
    """v = v(x_t, no r, no y) + w [v(x_t, no r, y) - v(x_t, no r, no y)] + w_r [v(x_t, r_t, y) - v(x_t, no r, y)],
    each term a separate model call; on the feature channels w = 1 (CFG of the image only) unless cfg_features."""
    bare = x.clone()
    bare[:, channels:] = 0
    null = torch.full_like(y, NULL)
    full, bare_y, bare_null = model(x, t, y), model(bare, t, y), model(bare, t, null)
    image = bare_null + w * (bare_y - bare_null) + w_r * (full - bare_y)
    w_f = w if cfg_features else 1.0
    features = bare_null + w_f * (bare_y - bare_null) + w_r * (full - bare_y)
    return torch.cat([image[:, :channels], features[:, channels:]], 1)


@pytest.mark.parametrize("cfg_features", [False, True])
def test_cfg_plus_rg_matches_a_transcription_of_the_papers_formula(cfg_features):
    x, y = guide_inputs()
    t = torch.full((4,), 0.5)
    v = guided_velocity(toy_model, x, t, y, NULL, 3, Guidance(1.8), Guidance(1.5), cfg_features=cfg_features)
    assert torch.allclose(v, paper_cfg_plus_rg(toy_model, x, t, y, 1.8, 1.5, cfg_features=cfg_features), atol=1e-5)


def test_cfg_plus_rg_through_the_methods_velocity_field(micro_cfg):
    method, model, _ = redi(micro_cfg, setup=False)
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    x = torch.randn(3, *method.state_shape())
    y, t = torch.tensor([0, 1, 2]), torch.full((3,), 0.6)
    field = method.velocity_field(model, y, Guidance(2.0, 0.0, 0.7), rg=1.7, rg_interval=[0.3, 0.8])
    with torch.no_grad():
        expected = paper_cfg_plus_rg(lambda a, b, c: model.backbone(a, b, c).velocity, x, t, y, 2.0, 1.7)
        assert torch.allclose(field(x, t, 0), expected, atol=1e-5)


def test_a_guidance_weight_outside_its_interval_has_no_effect():
    x, y = guide_inputs()
    t = torch.full((4,), 0.9)
    cfg_on, cfg_off = Guidance(2.0, 0.0, 1.0), Guidance(2.0, 0.0, 0.7)
    rg_on, rg_off = Guidance(1.5, 0.0, 1.0), Guidance(1.5, 0.0, 0.7)
    cfg_only = guided_velocity(toy_model, x, t, y, NULL, 3, cfg_on, Guidance())
    rg_only = guided_velocity(toy_model, x, t, y, NULL, 3, Guidance(), rg_on)
    assert torch.equal(guided_velocity(toy_model, x, t, y, NULL, 3, cfg_on, rg_off), cfg_only)
    assert torch.equal(guided_velocity(toy_model, x, t, y, NULL, 3, cfg_off, rg_on), rg_only)
    assert torch.equal(guided_velocity(toy_model, x, t, y, NULL, 3, cfg_off, rg_off), toy_model(x, t, y))
    # CFG alone guides the image channels of the joint model, as the official --cfg-vae; with cfg_features all
    null = torch.full_like(y, NULL)
    v_c, v_u = toy_model(x, t, y), toy_model(x, t, null)
    assert torch.allclose(cfg_only[:, :3], v_u[:, :3] + 2.0 * (v_c[:, :3] - v_u[:, :3]), atol=1e-5)
    assert torch.allclose(cfg_only[:, 3:], v_c[:, 3:], atol=1e-6)
    every = guided_velocity(toy_model, x, t, y, NULL, 3, cfg_on, Guidance(), cfg_features=True)
    assert torch.allclose(every, v_u + 2.0 * (v_c - v_u), atol=1e-5)


def test_rg_defaults_come_from_the_config_and_unknown_options_are_refused(micro_cfg):
    method, _, _ = redi(micro_cfg, "redi.rg_scale=1.4", "redi.rg_interval=[0.1,0.6]", setup=False)
    assert method.representation_guidance() == Guidance(1.4, 0.1, 0.6)
    assert method.representation_guidance(2.0, [0.0, 0.5]) == Guidance(2.0, 0.0, 0.5)
    with pytest.raises(ConfigError, match="share"):
        method.velocity_field(method.build_model(), torch.tensor([0]), Guidance(), share=True)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_real_features_keep_the_feature_channels_on_a_training_images_noising_path(micro_cfg, solver):
    """--features real: the model generates only the image; the feature channels end exactly at the PCA features of
    a training image of each sample's class, and the image channels still get the model's velocity."""
    from zoo.flow.samplers import build_sampler

    trained, model, _ = redi(micro_cfg)
    method, _, _ = redi(micro_cfg, setup=False)
    method.setup("cpu", training=False)   # as zoo eval / zoo sample build it: no teacher held until it is needed
    torch.manual_seed(0)
    for p in model.parameters():          # the output layer starts at zero: give the image channels a velocity
        p.data += 0.05 * torch.randn_like(p)
    labels = torch.tensor([0, 1, 2, 0])
    noise = torch.randn(4, *method.state_shape(), generator=torch.Generator().manual_seed(3))
    sampler, c = build_sampler("ode", 4, solver), method.image_channels()
    with torch.no_grad():
        end = sampler.sample(method.velocity_field(model, labels, Guidance(), features="real", sampler=sampler),
                             noise, method.path)
        generated = sampler.sample(method.velocity_field(model, labels, Guidance(), sampler=sampler), noise,
                                   method.path)
    pool, pool_labels = method.real_feature_pool()
    for i, y in enumerate(labels.tolist()):
        distances = (pool - end[i, c:]).flatten(1).abs().amax(dim=1)
        assert distances.min() < 1e-4 and pool_labels[distances.argmin()] == y
    # a training image's features, the ones the model was trained on (from the token cache, stored in half precision)
    index = subset_index_of(method, 0)
    assert torch.allclose(pool[0], trained.targets({"image": index[0], "index": index[1],
                                                   "flip": torch.zeros(1, dtype=torch.bool)})["features"][0], atol=5e-3)
    assert not torch.allclose(end[:, :c], noise[:, :c]) and not torch.allclose(end[:, :c], generated[:, :c])
    # the same noise draws the same training images again
    again = method.draw_real_features(labels, noise[:, c:])
    assert torch.equal(again, method.draw_real_features(labels, noise[:, c:]))


def subset_index_of(method, k: int) -> tuple:
    """(image [1, 3, H, W], index [1]) of the k-th training image the real-feature pool was drawn from."""
    from methods.redi import REAL_FEATURE_IMAGES
    from zoo.data import build_dataset, gather, subset_index

    dataset = build_dataset(method.cfg.data)
    index = subset_index(len(dataset), min(REAL_FEATURE_IMAGES, len(dataset)))[k:k + 1]
    return gather(dataset, index)["image"], index


def test_real_features_are_refused_with_a_sampler_that_leaves_their_path(micro_cfg):
    from zoo.flow.samplers import build_sampler

    method, model, _ = redi(micro_cfg, setup=False)
    with pytest.raises(ConfigError, match="fixed-step ODE"):
        method.velocity_field(model, torch.tensor([0]), Guidance(), features="real", sampler=build_sampler("sde", 4))
    with pytest.raises(ConfigError, match="valid: generated, real, dropped"):
        method.velocity_field(model, torch.tensor([0]), Guidance(), features="oracle")


def test_dropped_features_give_the_velocity_of_the_feature_dropped_state(micro_cfg):
    method, model, _ = redi(micro_cfg, setup=False)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    x, y, t = torch.randn(3, *method.state_shape()), torch.tensor([0, 1, 2]), torch.full((3,), 0.6)
    c = method.image_channels()
    with torch.no_grad():
        field = method.velocity_field(model, y, Guidance(), features="dropped")
        assert torch.allclose(field(x, t, 0), model.backbone(without_features(x, c), t, y).velocity, atol=1e-6)
        assert not torch.allclose(field(x, t, 0), model.backbone(x, t, y).velocity, atol=1e-3)


@pytest.mark.parametrize("override, rg, match", [((), 0.0, "--rg=0: a representation guidance weight below 1"),
                                                 (("redi.rg_scale=0.5",), None, "redi.rg_scale=0.5")])
def test_an_rg_weight_below_one_is_refused_not_ignored(micro_cfg, override, rg, match):
    """The official sampler guides only above 1, so a smaller weight would silently change nothing."""
    method, model, _ = redi(micro_cfg, *override, setup=False)
    with pytest.raises(ConfigError, match=match):
        method.velocity_field(model, torch.tensor([0]), Guidance(), rg=rg)


# ------------------------------------------------------------------ PCA identity, config errors
def test_a_pca_file_fitted_on_another_encoder_is_refused(micro_cfg, tmp_path):
    method, _, cfg = redi(micro_cfg)
    encoder = dict(method.pca.identity["encoder"], teacher="another-teacher")
    other = save_pca(fit_pca([torch.randn(500, cfg.teacher.width)], pca_identity(encoder, method.pca.identity["data"])),
                     tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="another encoder"):
        redi(micro_cfg, f"redi.pca={other}")
    right = save_pca(method.pca, tmp_path / "right.pt")
    again, _, _ = redi(micro_cfg, f"redi.pca={right}")
    assert torch.equal(again.pca.components, method.pca.components)


@pytest.mark.parametrize("override, match", [("redi.encoder=builtin,builtin", "exactly one encoder"),
                                             ("redi.rank=0", "at least one"),
                                             ("redi.feature_dropout=1.5", "not a probability"),
                                             ("redi.pca_images=1", "at least 2 images"),
                                             ("redi.rank=1000", "choose 1..")])
def test_bad_options_are_clear_errors(micro_cfg, override, match):
    with pytest.raises(ConfigError, match=match):
        redi(micro_cfg, override)


# ------------------------------------------------------------------ zoo eval / zoo sample plumbing
def test_zoo_eval_takes_rg_and_each_setting_gets_its_own_record(micro_cfg, monkeypatch):
    from zoo.cli import build_parser
    from zoo.cli.commands.eval import settings_from
    from zoo.config import to_dict
    from zoo.eval import evaluate

    args = build_parser().parse_args(["eval", "--ckpt", "x.pt", "--rg", "1.5", "--rg-interval", "0", "0.7"])
    settings = settings_from(args)
    assert settings.options == {"rg": 1.5, "rg_interval": [0.0, 0.7]}
    assert settings_from(build_parser().parse_args(["eval", "--ckpt", "x.pt"])).options == {}

    state = {"config": to_dict(micro_cfg("redi")), "step": 2, "path": "/run/checkpoints/step_0000002.pt"}

    def record(options):
        ev = evaluate.Evaluator(evaluate.EvalSettings(options=options), device="cpu", progress=False)
        monkeypatch.setattr(ev, "extractor", lambda data_cfg: SimpleNamespace(identity={"weights": "judge"}))
        return ev.record_path(state)

    paths = {record({}), record({"rg": 1.5}), record({"rg": 2.0}), record({"rg": 1.5, "rg_interval": [0.0, 0.7]})}
    assert len(paths) == 4
    # without options, a record's key (and a comparison's protocol) is what it was before options existed
    from zoo.compare.runner import Comparison

    plain = evaluate.PROTOCOL
    assert "options" not in plain.key_fields() and "options" in evaluate.EvalSettings(options={"rg": 2}).key_fields()
    before = {k: v for k, v in dataclasses.asdict(plain).items() if k not in ("options", "last_step", "ref")}
    assert Comparison(["redi"], 10, 5, "out").protocol()["settings"] == before
    # the options reach generation
    seen = {}
    monkeypatch.setattr("zoo.training.generate.iter_generate", lambda *a, **k: seen.update(k) or iter([torch.zeros(1, 3, 4, 4)]))
    evaluate.sample_uint8(None, None, torch.tensor([0]), evaluate.EvalSettings(
        sampler="ode", solver="euler", steps=2, cfg_scale=1.0, cfg_interval=(0, 1), options={"rg": 1.5}), "cpu", False)
    assert seen["rg"] == 1.5


def test_eval_refuses_an_option_the_checkpoints_method_does_not_take(micro_cfg):
    from zoo.eval.evaluate import method_options

    with pytest.raises(ConfigError, match="--rg: not a sampling option of method 'sit'"):
        method_options("sit", {"rg": 1.5})
    assert method_options("redi", {"rg": 1.5, "rg_interval": [0, 1]}) == {"rg": 1.5, "rg_interval": [0, 1]}


def test_guide_at_decides_which_guidance_applies():
    """REPA's Heun corrector runs at t_{i+1} but is guided when t_i is in the interval (`guide_at`)."""
    x, y = guide_inputs()
    inside, outside = torch.full((4,), 0.5), torch.full((4,), 0.9)
    cfg, rg = Guidance(2.0, 0.0, 0.7), Guidance(1.5, 0.0, 0.7)
    at_inside = guided_velocity(toy_model, x, outside, y, NULL, 3, cfg, rg, guide_at=inside)
    expected = paper_cfg_plus_rg(toy_model, x, outside, y, 2.0, 1.5)
    assert torch.allclose(at_inside, expected, atol=1e-5)
    assert torch.equal(guided_velocity(toy_model, x, inside, y, NULL, 3, cfg, rg, guide_at=outside),
                       toy_model(x, inside, y))
