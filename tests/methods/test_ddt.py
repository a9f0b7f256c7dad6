"""DDT: the encoder-decoder split, per-token modulation, REPA on the encoder, and encoder sharing at sampling."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import ddt_sharing as sharing
from zoo.backbones.ddt import DDT, ddt_parameter_count
from zoo.backbones.layers import Block, FinalLayer, unpatchify
from zoo.backbones.sit import count_parameters
from zoo.errors import ConfigError
from zoo.flow.guidance import Guidance
from zoo.flow.samplers import build_sampler
from zoo.training.generate import build_method, generate

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods" / "ddt.md"


def small_ddt(**kw):
    torch.manual_seed(0)
    args = dict(input_size=16, in_channels=3, num_classes=5, patch=4, hidden=32, encoder_depth=2, decoder_depth=2,
                heads=2)
    args.update(kw)
    model = DDT(**args)
    for p in model.parameters():  # leave the zero initialisation, so every block does something
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def micro_ddt(micro_cfg, *overrides):
    method = build_method(micro_cfg("ddt", *overrides))
    method.setup("cpu", training=False)
    torch.manual_seed(0)
    model = method.build_model().eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return method, model


# ---------------------------------------------------------------- the backbone
def test_encoder_output_is_silu_of_time_plus_encoder_tokens_and_forward_is_encode_then_decode():
    model = small_ddt()
    x, t, y = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 4, 5])
    t_emb = model.t_embedder(1 - t)  # the released DDT's network sees t = 1 as data
    c = t_emb + model.y_embedder(y)
    tokens = model.s_embedder(x) + model.pos_embed
    for block in model.encoder_blocks:
        tokens = block(tokens, c, model.rope)
    z = model.encode_condition(x, t, y)
    assert torch.allclose(z, F.silu(t_emb[:, None, :] + tokens), atol=1e-6)
    assert z.shape == (3, 16, 32)  # one self-condition per token
    v = model.decode_velocity(x, t, z)
    assert v.shape == x.shape
    assert torch.equal(model(x, t, y).velocity, v)


def transcribed_decoder_block(block, x, z):
    """One decoder block written out per token n: [shift, scale, gate] x 2 = W z[n] + b (z is already SiLU'd)."""
    w, b = block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias
    mods = torch.einsum("oc,bnc->bno", w, z) + b
    sa, ca, ga, sm, cm, gm = mods.chunk(6, dim=-1)
    x = x + ga * block.attn(block.norm1(x) * (1 + ca) + sa)
    return x + gm * block.mlp(block.norm2(x) * (1 + cm) + sm)


def test_decoder_blocks_are_modulated_per_token_by_z():
    model = small_ddt(rope=False)
    block = model.decoder_blocks[0]
    assert isinstance(block.adaLN_modulation[0], torch.nn.Identity)  # z arrives through its SiLU already
    x = torch.randn(2, 1, 32).expand(2, 6, 32).contiguous()         # every token of a sample the same
    z = torch.randn(2, 1, 32).expand(2, 6, 32).clone()
    same = block(x, z)
    assert torch.allclose(same, same[:, :1].expand_as(same), atol=1e-6)  # same z: same output everywhere
    z[:, 0] += 1.0                                                       # token 0 gets another z
    out = block(x, z)
    assert torch.allclose(out, transcribed_decoder_block(block, x, z), atol=1e-5)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3                   # ...and is modulated differently
    assert torch.allclose(out[:, 1:], out[:, 1:2].expand_as(out[:, 1:]), atol=1e-6)


def dit_stack(model):
    """The decoder's blocks and final layer as plain class/time-conditioned DiT modules with the same weights."""
    blocks = torch.nn.ModuleList(Block(32, 2, norm="rmsnorm", mlp="swiglu", qk_norm=True, norm_affine=True,
                                       qkv_bias=False, mlp_bias=False) for _ in model.decoder_blocks)
    final = FinalLayer(32, model.patch, model.out_channels, norm="layernorm")
    blocks.load_state_dict(model.decoder_blocks.state_dict())  # same layout: SiLU/Identity hold no weights
    final.load_state_dict(model.final_layer.state_dict())
    return blocks, final


@pytest.mark.parametrize("encoder_output", ["zero", "class_embedding"])
def test_without_token_information_the_decoder_is_a_class_time_conditioned_dit(encoder_output):
    """z = SiLU(t_emb + h): with h = 0 the decoder is a DiT conditioned on t; with h = y_emb (the same for every
    token), exactly SiT's conditioning c = t_emb + y_emb."""
    model = small_ddt()
    blocks, final = dit_stack(model)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 3])
    t_emb = model.t_embedder(1 - t)
    c = t_emb if encoder_output == "zero" else t_emb + model.y_embedder(y)   # [B, C], per sample
    h = torch.zeros(2, 16, 32) if encoder_output == "zero" else model.y_embedder(y)[:, None].expand(2, 16, 32)
    v = model.decode_velocity(x, t, F.silu(t_emb[:, None] + h))
    tokens = model.x_embedder(x) + model.pos_embed
    for block in blocks:
        tokens = block(tokens, c, model.rope)
    expected = -unpatchify(final(tokens, c), model.patch, model.out_channels)  # the velocity towards data, negated
    assert torch.allclose(v, expected, atol=1e-5)


def test_hidden_states_number_encoder_blocks_first_and_stop_early():
    model = small_ddt(encoder_depth=3, decoder_depth=2)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])
    out = model(x, t, y, hidden_layers=(2, 4))
    assert set(out.hidden) == {2, 4}
    early = model(x, t, y, hidden_layers=(2,), stop_after=2)
    assert early.velocity is None and torch.equal(early.hidden[2], out.hidden[2])
    with pytest.raises(ConfigError, match=r"encoder 1..3, decoder 4..5"):
        model(x, t, y, hidden_layers=(6,))


def test_xl_parameter_count_matches_the_paper_and_the_docs():
    """DDT-XL/2 (22 + 6 blocks, 1152 wide) on 32x32x4 latents, 1000 classes, counted on the meta device."""
    n = ddt_parameter_count("XL", decoder_depth=6)
    assert abs(n - 675e6) / 675e6 < 0.01
    docs = DOCS.read_text()
    assert f"{n:,}" in docs


def test_tiny_preset_is_sit_tiny_sized_and_documented():
    from zoo.config import load_config

    ddt = build_method(load_config("ddt", ["preset=tiny"]))
    sit = build_method(load_config("sit", ["preset=tiny"]))
    with torch.device("meta"):
        ddt_backbone, sit_backbone = ddt.build_backbone(), sit.build_backbone()
    assert (ddt_backbone.encoder_depth, ddt_backbone.decoder_depth, ddt_backbone.hidden_size) == (4, 2, 128)
    n, m = count_parameters(ddt_backbone), count_parameters(sit_backbone)
    assert abs(n - m) / m < 0.02
    assert f"{n / 1e6:.2f}M" in DOCS.read_text() and f"{m / 1e6:.2f}M" in DOCS.read_text()


def test_presets_follow_the_paper():
    from zoo.config import load_config

    xl = load_config("ddt", ["preset=XL"])
    assert (xl.model.size, xl.ddt.decoder_depth, xl.ddt.encoder_depth, xl.ddt.projector_dim) == ("XL", 6, 8, 1152)
    assert (xl.model.norm, xl.model.mlp, xl.model.qk_norm, xl.model.rope) == ("rmsnorm", "swiglu", True, True)
    assert xl.flow.time == "logit_normal" and xl.ddt.proj_coeff == 0.5


# ---------------------------------------------------------------- training: REPA on the encoder
def test_repa_aligns_the_chosen_encoder_block(micro_cfg, seeded_loss):
    from zoo.data import BatchLoader, build_dataset

    cfg = micro_cfg("ddt", "ddt.feature_cache=never", "model.class_dropout=0")
    method = build_method(cfg)
    method.setup("cpu")
    model = method.build_model()
    batch = next(BatchLoader(build_dataset(cfg.data), cfg.data, cfg.train.batch_size, cfg.train.seed).iterate(0))
    terms, t, x, x_t = seeded_loss(method, model, batch)
    bb = model.backbone
    h = bb.encoder_blocks[0](bb.s_embedder(x_t) + bb.pos_embed, bb.t_embedder(1 - t) + bb.y_embedder(batch["label"]),
                             bb.rope)
    from methods.repa import repa_loss

    expected = repa_loss(h, model.extras["projectors"], [enc(x) for enc in method.teacher.encoders])
    assert set(terms) == {"flow", "repa"}
    assert torch.allclose(terms["repa"].value, expected, atol=1e-5)


def test_config_errors_name_the_problem(micro_cfg):
    with pytest.raises(ConfigError, match=r"encoder has blocks 1..1"):
        build_method(micro_cfg("ddt", "ddt.encoder_depth=2")).build_model()
    with pytest.raises(ConfigError, match=r"decoder_depth=2 must be in 1..1"):
        build_method(micro_cfg("ddt", "ddt.decoder_depth=2")).build_model()
    for bad in ("dp", "dp:0", "every:0", "often:2", "uniform:x"):
        with pytest.raises(ConfigError, match="none, uniform:K, dp:K .* every:R"):
            sharing.ShareSpec.parse(bad)
    method, model = micro_ddt(micro_cfg)
    with pytest.raises(ConfigError, match="1 <= K <= the 4 sampler steps"):
        generate(method, model, torch.tensor([0]), steps=4, share="uniform:5")
    with pytest.raises(ConfigError, match="fixed-step sampler"):
        generate(method, model, torch.tensor([0]), solver="dopri5", share="uniform:2")


# ---------------------------------------------------------------- schedules
def test_uniform_schedules():
    assert sharing.uniform_schedule(8, 4) == [0, 2, 4, 6]
    assert sharing.uniform_schedule(8, 2) == [0, 4]
    assert sharing.uniform_schedule(10, 3) == [0, 3, 6]
    assert sharing.uniform_schedule(5, 1) == [0]
    assert sharing.uniform_schedule(6, 6) == list(range(6))


def reference_cost(sim, schedule):
    """sum over segments [s, e] of sum_{m=s..e} (1 - sim[m][s]), written out."""
    n, total = len(sim), 0.0
    bounds = list(schedule) + [n]
    for s, nxt in zip(bounds[:-1], bounds[1:]):
        for m in range(s, nxt):
            total += 1.0 - sim[m][s]
    return total


def random_similarity(n, rng, symmetric):
    if symmetric:  # a real one: cosines of random unit vectors, drifting from step to step
        v = np.cumsum(rng.normal(size=(n, 5)), axis=0)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v @ v.T
    return rng.uniform(-1, 1, size=(n, n))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_dp_schedule_is_optimal_against_brute_force(n):
    rng = np.random.default_rng(n)
    for trial in range(6):
        sim = random_similarity(n, rng, symmetric=trial % 2 == 0)
        for k in range(1, n + 1):
            schedule = sharing.dp_schedule(sim, k)
            assert len(schedule) == k and schedule[0] == 0 and schedule == sorted(set(schedule))
            best = min(reference_cost(sim, [0, *rest]) for rest in itertools.combinations(range(1, n), k - 1))
            assert reference_cost(sim, schedule) == pytest.approx(best, abs=1e-9)
            assert sharing.schedule_cost(sim, schedule) == pytest.approx(best, abs=1e-9)
    assert sharing.dp_schedule(np.ones((6, 6)), 6) == list(range(6))


def test_dp_recomputes_where_z_changes():
    # z is constant on steps 0-4, then jumps and stays: two recomputations belong at 0 and 5
    sim = np.ones((8, 8))
    sim[:5, 5:] = sim[5:, :5] = 0.0
    assert sharing.dp_schedule(sim, 2) == [0, 5]


def test_similarity_matrix_is_the_token_averaged_cosine():
    zs = torch.randn(4, 2, 3, 5)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for a, b in itertools.product(range(4), repeat=2):
        expected[a, b] = sum(F.cosine_similarity(zs[a, i, n], zs[b, i, n], dim=0) for i in range(2) for n in range(3)) / 6
    assert torch.allclose(sharing.similarity_matrix(zs), expected, atol=1e-6)


# ---------------------------------------------------------------- sharing at sampling
SAMPLERS = [dict(sampler="ode", solver="euler"), dict(sampler="ode", solver="heun"), dict(sampler="sde"),
            dict(sampler="ode", solver="euler", cfg_scale=2.0, cfg_interval=(0.0, 0.5)),
            dict(sampler="sde", cfg_scale=3.0, cfg_interval=(0.5, 1.0))]


@pytest.mark.parametrize("kwargs", SAMPLERS)
def test_sharing_off_or_every_step_equals_plain_sampling_exactly(micro_cfg, kwargs):
    method, model = micro_ddt(micro_cfg)
    labels = torch.tensor([0, 1, 2, 3, 4])
    plain = generate(method, model, labels, steps=5, seed=3, **kwargs)
    for share in ("none", "uniform:5", "dp:5"):
        assert torch.equal(generate(method, model, labels, steps=5, seed=3, share=share, **kwargs), plain), share
    assert not torch.equal(generate(method, model, labels, steps=5, seed=3, share="uniform:2", **kwargs), plain)


def reference_shared_euler(model, noise, labels, steps, recompute, guidance):
    """Euler with z of the conditional and the unconditional batch recomputed at `recompute` (the released
    sharing sampler, which always runs both halves), guided inside the interval only, written out."""
    bb, null = model.backbone, torch.full_like(labels, model.backbone.null_label)
    x, z = noise, None
    for i in range(steps):
        t_cur, t_next = 1 - i / steps, 1 - (i + 1) / steps
        t = torch.full((len(x),), t_cur)
        if i in recompute:
            z = bb.encode_condition(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        doubled = guidance.scale > 1 and guidance.low <= t_cur <= guidance.high
        y = torch.cat([labels, null]) if doubled else labels
        xx, tt = (torch.cat([x, x]), torch.cat([t, t])) if doubled else (x, t)
        v = bb.decode_velocity(xx, tt, z[:len(y)])
        if doubled:
            cond, uncond = v.chunk(2)
            v = uncond + guidance.scale * (cond - uncond)
        x = x + (t_next - t_cur) * v
    return x


@pytest.mark.parametrize("interval, share, calls", [
    ((0.0, 0.5), "uniform:3", [(0, 6), (2, 6), (5, 6)]),   # enter the interval at step 4: both halves are cached
    ((0.0, 0.5), "uniform:2", [(0, 6), (4, 6)]),           # a scheduled step enters it
    ((0.5, 1.0), "uniform:2", [(0, 6), (4, 6)]),           # leave it: the conditional half is reused
    ((0.0, 0.5), "every:3", [(0, 6), (3, 6), (6, 6)]),     # the released code's refresh rate: steps 0, 3, 6
])
def test_sharing_with_cfg_and_a_guidance_interval(micro_cfg, interval, share, calls):
    method, model = micro_ddt(micro_cfg)
    labels, guidance = torch.tensor([0, 1, 2]), Guidance(2.5, *interval)
    sampler = build_sampler("ode", 8, "euler")
    noise = torch.randn(3, *method.state_shape(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        field = method.velocity_field(model, labels, guidance, sampler=sampler, share=share)
        got = sampler.sample(field, noise, method.path)
        kind, k = share.split(":")
        schedule = sharing.every_schedule(8, int(k)) if kind == "every" else sharing.uniform_schedule(8, int(k))
        expected = reference_shared_euler(model, noise, labels, 8, schedule, guidance)
    assert field.encoder_calls == calls
    assert torch.allclose(got, expected, atol=1e-5)


def test_heun_recomputes_both_evaluations_of_a_scheduled_step_only(micro_cfg):
    method, model = micro_ddt(micro_cfg)
    sampler = build_sampler("ode", 6, "heun")
    with torch.no_grad():
        field = method.velocity_field(model, torch.tensor([0, 1]), Guidance(), sampler=sampler, share="uniform:2")
        sampler.sample(field, torch.randn(2, *method.state_shape()), method.path)
    assert field.encoder_calls == [(0, 2), (0, 2), (3, 2), (3, 2)]


def test_dp_schedule_is_saved_beside_the_checkpoint_and_reused(micro_cfg, tmp_path, monkeypatch):
    from zoo.training.checkpoint import latest_checkpoint
    from zoo.config import load_config
    from zoo.training.generate import load_for_sampling
    from zoo.training.trainer import Trainer

    cfg = load_config("ddt", ["preset=micro", "train.device=cpu", "train.steps=2", "sample.num=0"])
    Trainer(cfg, run_dir=tmp_path / "run", progress=False).fit()
    ckpt = latest_checkpoint(tmp_path / "run")
    method, model, _, _ = load_for_sampling(ckpt)
    rng = torch.get_rng_state()
    sim = sharing.calibrate(model.backbone, build_sampler("sde", 6), method.path, Guidance(), method.state_shape())
    assert torch.equal(torch.get_rng_state(), rng)   # calibration draws from its own generator
    assert sim.shape == (6, 6) and torch.allclose(sim.diagonal(), torch.ones(6, dtype=sim.dtype))
    first = generate(method, model, torch.tensor([0, 1, 2]), steps=6, share="dp:3")
    files = list(ckpt.parent.glob(f"{ckpt.stem}-share-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    schedule = record["schedules"]["3"]["steps"]
    assert record["weights"] == "ema" and record["steps"] == 6 and len(record["similarity"]) == 6
    assert schedule == sharing.dp_schedule(record["similarity"], 3)
    # a new process: the schedule comes from the file, for this K and (from the stored similarity) for another
    monkeypatch.setattr(sharing, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    method, model, _, _ = load_for_sampling(ckpt)
    assert torch.equal(generate(method, model, torch.tensor([0, 1, 2]), steps=6, share="dp:3"), first)
    generate(method, model, torch.tensor([0]), steps=6, share="dp:2")
    assert set(json.loads(files[0].read_text())["schedules"]) == {"2", "3"}


def test_eval_passes_sampling_options_and_keys_records_by_them(micro_cfg):
    from zoo.cli import build_parser
    from zoo.cli.commands.eval import settings_from
    from zoo.eval.evaluate import EvalSettings, sample_uint8

    args = build_parser().parse_args(["eval", "--ckpt", "x", "--share", "dp:4"])
    assert settings_from(args).options == {"share": "dp:4"}
    assert settings_from(build_parser().parse_args(["eval", "--ckpt", "x"])).options == {}
    sample_cfg = micro_cfg("ddt").sample
    keys = {s: EvalSettings(options=o).resolved(sample_cfg, "ddt").key_fields().get("options")
            for s, o in [("none", {}), ("none-explicit", {"share": "none"}), ("dp4", {"share": "dp:4"}),
                         ("u4", {"share": "uniform:4"})]}
    assert keys == {"none": None, "none-explicit": None, "dp4": {"share": "dp:4"}, "u4": {"share": "uniform:4"}}
    with pytest.raises(ConfigError, match="not a sampling option of method 'sit'"):
        EvalSettings(options={"share": "dp:4"}).resolved(sample_cfg, "sit")
    method, model = micro_ddt(micro_cfg)
    settings = EvalSettings(num_samples=3, options={"share": "uniform:1"}).resolved(sample_cfg, "ddt")
    got = sample_uint8(method, model, torch.tensor([0, 1, 2]), settings, "cpu", progress=False)
    expected = generate(method, model, torch.tensor([0, 1, 2]), steps=sample_cfg.steps, batch_size=100,
                        share="uniform:1")
    assert torch.equal(got, ((expected + 1) * 127.5).round().to(torch.uint8))
