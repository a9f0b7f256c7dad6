"""Typed configs: presets, overrides, and one-line errors that list the valid keys."""
import pytest
import torch

from zoo.config import config_from_dict, load_config, to_dict, with_overrides
from zoo.errors import ConfigError


def test_defaults_and_preset():
    cfg = load_config("sit")
    assert cfg.method == "sit" and cfg.preset == "tiny" and cfg.model.size == "tiny"
    xl = load_config("sit", preset="XL")
    assert xl.model.size == "XL" and xl.train.batch_size == 256 and xl.optim.lr == 1e-4


def test_overrides_have_the_last_word_and_are_typed():
    cfg = load_config("sit", ["train.steps=7", "optim.lr=0.01", "sample.cfg_interval=[0,0.7]", "preset=micro"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and list(cfg.sample.cfg_interval) == [0, 0.7]
    assert cfg.preset == "micro" and cfg.model.size == "micro"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("sit", ["train.stepz=3"])
    msg = str(err.value)
    assert "train.stepz" in msg and "did you mean train.steps" in msg and "batch_size" in msg
    assert "\n" not in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="valid keys: .*model.*train"):
        load_config("sit", ["modle.size=B"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("sit", ["train.steps=many"])


def test_unknown_method_and_preset_list_the_valid_ones():
    with pytest.raises(ConfigError, match="known methods: .*sit"):
        load_config("nope")
    with pytest.raises(ConfigError, match="valid: .*XL"):
        load_config("sit", preset="XXL")


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("sit", ["train.steps"])


def test_round_trip_through_a_plain_dict():
    cfg = load_config("sit", ["train.steps=11"])
    again = config_from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    assert with_overrides(again, ["train.steps=12"]).train.steps == 12


def test_a_token_grid_beyond_max_tokens_is_refused_in_one_line_unless_lifted(micro_cfg):
    """ImageNet 256 in pixel space at patch 2 is a 128x128 grid: almost always a forgotten data.vae."""
    from zoo.training.generate import build_method

    method = build_method(micro_cfg("repa", "model.patch=2", "data.image_size=256"))
    with pytest.raises(ConfigError, match=r"128x128 = 16384 tokens .* exceed model.max_tokens=4096: for latent "
                                          r"diffusion set data.vae"):
        method.build_model()
    with torch.device("meta"):
        build_method(micro_cfg("repa", "model.patch=2", "data.image_size=256", "model.max_tokens=0")).build_model()
        build_method(micro_cfg("repa", "model.patch=2", "data.image_size=128")).build_model()   # 64x64: allowed


def test_a_paper_recipe_is_its_base_preset_plus_its_own_settings():
    """imagenet256-XL lays the ImageNet data and each method's official settings over XL (and XL's method section)."""
    repa = load_config("repa", [], "imagenet256-XL")
    assert (repa.model.size, repa.model.patch, repa.train.batch_size, repa.optim.lr) == ("XL", 2, 256, 1e-4)
    assert (repa.data.dataset, repa.data.image_size, repa.data.num_classes) == ("folder", 256, 1000)
    assert (repa.repa.encoder, repa.repa.encoder_depth, repa.repa.proj_coeff) == ("dinov2-vit-b", 8, 0.5)
    assert (repa.sample.sampler, repa.sample.steps, repa.sample.cfg_scale, list(repa.sample.cfg_interval)) == \
        ("sde", 250, 1.8, [0.0, 0.7])
    ddt = load_config("ddt", [], "imagenet256-XL")   # its XL section (the released sampler) and its own encoder
    assert (ddt.ddt.decoder_depth, ddt.sample.sampler, ddt.sample.last_step, ddt.ddt.encoder) == (6, "ode", 0.04,
                                                                                                  "dinov2-vit-b")
    assert load_config("deepflow", [], "imagenet256-XL").model.depth == 24
    assert load_config("repa", ["sample.cfg_scale=1.0"], "imagenet256-XL").sample.cfg_scale == 1.0


def test_every_method_with_official_code_has_an_imagenet_recipe_with_its_record():
    from zoo.config import recipes

    found = recipes()
    for method in ("sit", "repa", "repa_e", "ddt", "redi", "deepflow", "sra", "layersync"):
        record = found[method]["imagenet256-XL"]
        assert {"paper", "train", "sample", "evaluate", "needs", "released", "command"} <= set(record), method
        assert record["needs"] and record["released"].startswith("https://"), method


def test_a_recipe_without_a_vae_is_refused_as_pixel_space(tmp_path):
    from zoo.training.generate import build_method

    for name in ("n01440764", "n01443537"):
        (tmp_path / name).mkdir()
    cfg = load_config("repa", ["train.device=cpu", f"data.root={tmp_path}"], "imagenet256-XL")
    with pytest.raises(ConfigError, match=r"128x128 = 16384 tokens .*set data.vae"):
        build_method(cfg).build_model()


def test_an_unknown_preset_or_base_is_one_line(tmp_path, monkeypatch):
    import zoo.config

    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; valid: .*imagenet256-XL"):
        load_config("sit", [], "nope")
    (tmp_path / "child.yaml").write_text("base: missing\n")
    monkeypatch.setattr(zoo.config, "PRESET_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown preset 'missing' \(the base of 'child'\)"):
        load_config("sit", [], "child")


def test_the_quick_preset_is_tiny_at_16_pixels_with_16_tokens_each_narrower_than_the_model():
    """quick keeps tiny's model and changes what makes it cheap: 16 px at patch 4 is a 4x4 grid, and a token's
    4*4*3 = 48 values stay below the 128-wide model (patch 8 at 32 px, 192 values, does not learn); its shapes are
    1.5x as large, so that round and straight edges differ by more than a pixel."""
    from zoo.training.generate import build_method

    quick, tiny = load_config("sit", preset="quick"), load_config("sit")
    assert (quick.model.size, quick.model.patch, quick.data.num_images) == (tiny.model.size, 4, tiny.data.num_images)
    assert (quick.data.image_size, quick.train.batch_size, quick.train.steps, quick.flow.time) == (16, 128, 1500,
                                                                                                   "logit_normal")
    # the rate every method trains stably at, with Adam's second moment following the gradient within ~20 steps
    assert (quick.optim.lr, quick.optim.beta2, quick.optim.warmup_steps, quick.optim.schedule) == (4e-3, 0.95, 200,
                                                                                                  "constant")
    # its built-in VAE: one halving (8x8x4 latents at 16 px) with the perceptual term; REPA-E diffuses it at patch 2
    ae = quick.autoencoder
    assert (list(ae.channels), ae.latent_channels, ae.steps, ae.perceptual_weight) == ([16, 32], 4, 4000, 1.0)
    assert load_config("repa_e", preset="quick").model.patch == 2
    assert (quick.data.shape_scale, tiny.data.shape_scale) == (1.5, 1.0)  # shapes large enough to learn at 16 px
    repa = load_config("repa", preset="quick")  # the teacher recipe measured best at 16 px (docs/benchmarks.md)
    assert (repa.teacher.steps, repa.teacher.center_tokens, repa.teacher.patch) == (3000, True, 4)
    with torch.device("meta"):
        model = build_method(quick).build_model()
    sit = model.backbone
    assert sit.x_embedder.num_patches == 16 and 4 * 4 * 3 < sit.hidden_size
