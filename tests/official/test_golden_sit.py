"""SiT (willisma/SiT models.py): the official model's weights in the zoo's backbone give the official outputs.

The official network sees t = 1 as data and predicts the velocity towards the data; the zoo's SiT does the
same with `model.time_convention=data` (and t unscaled, `model.time_scale=1`), feeding it 1 - t and negating
its output, so that the zoo's samplers keep t = 1 as noise.
"""
import pytest
import torch

from golden import assert_close, fixture, loaded, official_method, sit_overrides
from zoo.config import load_config
from zoo.errors import CheckpointError
from zoo.training.method import DataInfo

GOLDEN = fixture("sit_forward")
SIT = [*sit_overrides(GOLDEN["config"]), "model.time_scale=1", "model.time_convention=data"]


@pytest.fixture(scope="module")
def golden():
    return GOLDEN


def test_the_official_sit_loads_by_key_names_and_gives_its_velocity_and_block_outputs(golden):
    method = official_method("sit", DataInfo(4, 8, 10), *SIT)
    model = loaded(method, golden["state_dict"])   # pos_embed checked against the zoo's table, learn_sigma dropped
    x, t, y = golden["inputs"]["x"], golden["inputs"]["t"], golden["inputs"]["y"]
    out = model.backbone(x, 1 - t, y, hidden_layers=(1, 2, 3))  # the zoo's time of the official t
    assert_close(out.velocity, -golden["outputs"]["velocity"], what="velocity (the zoo's points to the noise)")
    for k, expected in enumerate(golden["outputs"]["block_outputs"], start=1):
        assert_close(out.hidden[k], expected, what=f"block {k}")
    assert_close(model.backbone.t_embedder(model.backbone.time.network_time(1 - t)),
                 golden["outputs"]["t_emb"], what="time embedding")


def test_the_position_table_is_the_official_one(golden):
    model = loaded(official_method("sit", DataInfo(4, 8, 10), *SIT), golden["state_dict"])
    assert_close(model.backbone.pos_embed, golden["state_dict"]["pos_embed"], tol=1e-6, what="pos_embed")
    swapped = golden["state_dict"]["pos_embed"].clone()
    half = swapped.shape[-1] // 2
    swapped = torch.cat([swapped[..., half:], swapped[..., :half]], dim=-1)  # rows and columns exchanged
    with pytest.raises(CheckpointError, match="sin-cos table"):
        official_method("sit", DataInfo(4, 8, 10), *SIT).from_official({**golden["state_dict"], "pos_embed": swapped})


def test_the_zoos_own_time_embedding_differs(golden):
    """The CPU presets' 1000 t (DiT's range) is a different network: the official weights do not fit it."""
    model = loaded(official_method("sit", DataInfo(4, 8, 10), *SIT[:-2], "model.time_convention=data"),
                   golden["state_dict"])
    x, t, y = golden["inputs"]["x"], golden["inputs"]["t"], golden["inputs"]["y"]
    assert (model.backbone(x, 1 - t, y).velocity + golden["outputs"]["velocity"]).abs().max() > 1e-2


@pytest.mark.parametrize("preset", ["B", "XL"])
def test_the_paper_presets_embed_time_as_the_official_code(preset):
    cfg = load_config("sit", [f"preset={preset}"])
    model = cfg.model
    assert (model.time_scale, model.time_max_period, model.time_convention) == (1.0, 10000.0, "data")
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.train.batch_size, cfg.train.ema_decay) == (1e-4, 0.0, 256, 0.9999)
    assert (model.pos_embed, model.norm, model.final_norm or model.norm, model.init) == \
        ("sincos", "layernorm", "layernorm", "dit")
