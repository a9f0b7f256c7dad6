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
