"""Pretrained teachers (zoo/teachers/pretrained.py) on tiny, randomly initialised models of the real classes:
preprocessing, token selection and grid, freezing, weight files (timm, original DINOv2, torch.hub clone,
open_clip) and the errors for missing weights or bad names. Nothing is downloaded."""
import importlib.util
import os

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zoo.teachers import build_encoders, encoder_dims, encoder_specs, match_grid
from zoo.teachers import pretrained as P
from zoo.errors import ConfigError, MissingWeightsError

TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2)
TIMM_NAME = "timm:vit_small_patch16_224.augreg_in21k"  # its pretrained config: mean = std = 0.5
OPENAI = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
IMAGENET = (P.IMAGENET_MEAN, P.IMAGENET_STD)
# name -> (pixels fed at grid g, prefix tokens, (mean, std))
FAMILIES = {
    "dinov2-vit-b": (lambda g: 14 * g, 1, IMAGENET),
    "dinov2-vit-s-reg": (lambda g: 14 * g, 5, IMAGENET),  # CLS + 4 registers
    "clip-vit-l": (lambda g: 224, 1, OPENAI),  # native 16x16 tokens
    "clip-vit-b": (lambda g: 224, 1, OPENAI),  # native 14x14 tokens
    TIMM_NAME: (lambda g: 16 * g, 1, ((0.5,) * 3, (0.5,) * 3)),
}


def tiny_clip_cfg(name):
    patch = open_clip.get_model_config(P.CLIP_ARCHS[name][0])["vision_cfg"]["patch_size"]
    return dict(embed_dim=16, vision_cfg=dict(image_size=224, layers=1, width=32, head_width=16, patch_size=patch),
                text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


def tiny(name, grid, weights="", random_init=True):
    torch.manual_seed(0)
    if name.startswith("clip"):
        return P.build_clip(name, weights, grid, random_init=random_init, **tiny_clip_cfg(name))
    build = P.build_timm if name.startswith("timm:") else P.build_dinov2
    return build(name, weights, grid, random_init=random_init, **TINY_VIT)


def first_layer(encoder):
    return encoder.net.conv1 if encoder.name.startswith("clip") else encoder.net.patch_embed.proj


def images(n=2, size=32, requires_grad=False):
    return (torch.rand(n, 3, size, size) * 2 - 1).requires_grad_(requires_grad)


@pytest.mark.parametrize("name", FAMILIES)
def test_preprocessing_resolution_normalisation_bicubic(name):
    pixels_at, _, (mean, std) = FAMILIES[name]
    for grid in (16, 8):
        enc = tiny(name, grid)
        fed = []
        first_layer(enc).register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[-1]))
        enc(images(1))
        assert fed == [pixels_at(grid)] and enc.size == pixels_at(grid)
    grey = enc.preprocess(torch.zeros(1, 3, 32, 32))  # 0 in [-1, 1] is mid-grey 0.5
    expected = ((0.5 - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1)
    assert (grey - expected).abs().max() < 1e-5
    x = images(1)  # upscaled from 32 px: plain bicubic, no antialiasing
    bicubic = F.interpolate((x + 1) / 2, size=pixels_at(8), mode="bicubic", align_corners=False)
    assert (enc.preprocess(x) - (bicubic - enc.mean) / enc.std).abs().max() < 1e-5
    bilinear = F.interpolate((x + 1) / 2, size=pixels_at(8), mode="bilinear", align_corners=False)
    assert (enc.preprocess(x) - (bilinear - enc.mean) / enc.std).abs().max() > 1e-3


@pytest.mark.parametrize("name", [n for n in FAMILIES if not n.startswith("clip")])
@pytest.mark.parametrize("grid", [16, 8])
def test_timm_tokens_drop_prefix_on_native_grid(name, grid):
    _, prefix, _ = FAMILIES[name]
    enc = tiny(name, grid)
    x = images()
    out = enc(x)
    assert out.shape == (2, grid * grid, 32) and enc.dim == 32
    assert enc.net.num_prefix_tokens == prefix
    full = enc.net.forward_features(enc.preprocess(x))  # after the final norm
    assert full.shape[1] == grid * grid + prefix
    torch.testing.assert_close(out, full[:, prefix:])


@pytest.mark.parametrize("name", ["clip-vit-l", "clip-vit-b"])
@pytest.mark.parametrize("grid", [16, 8])
def test_clip_tokens_after_ln_post_without_cls_then_match_grid(name, grid):
    enc = tiny(name, grid)
    x = images()
    out = enc(x)
    assert out.shape == (2, grid * grid, 32) and enc.dim == 32
    visual = enc.net
    hidden = visual.ln_post(visual.transformer(visual._embeds(enc.preprocess(x))))
    native = 224 // enc.patch
    assert hidden.shape[1] == native * native + 1
    torch.testing.assert_close(out, match_grid(hidden[:, 1:], grid))


@pytest.mark.parametrize("name", FAMILIES)
def test_frozen(name):
    enc = tiny(name, 8)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    out = enc(images(requires_grad=True))
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("name", FAMILIES)
def test_missing_weights_names_file_and_fetch_command(name, zoo_cache, tmp_path):
    with pytest.raises(MissingWeightsError) as err:  # no path: the default under the cache
        tiny(name, 16, random_init=False)
    message = str(err.value)
    assert str(zoo_cache / "weights") in message and ("curl -L -o" in message or "huggingface-cli download" in message)
    if name.startswith("dinov2"):
        expected = "dinov2_vits14_reg4_pretrain.pth" if name.endswith("-reg") else "dinov2_vitb14_pretrain.pth"
        assert f"{expected} https://dl.fbaipublicfiles.com/dinov2/" in message
    if name.startswith("clip"):
        assert f"{'vit_large_patch14' if name == 'clip-vit-l' else 'vit_base_patch16'}_clip_224.openai" in message
    missing = tmp_path / "absent.bin"
    with pytest.raises(MissingWeightsError, match=str(missing)):
        tiny(name, 16, str(missing), random_init=False)


def to_original_dinov2(state):
    """timm layout -> facebookresearch/dinov2 layout: the inverse of timm's _convert_dinov2 (S/B/L)."""
    state = {k: v.clone() for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    state["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in state:  # the original adds the class position embedding to the CLS token itself
        class_pos = torch.randn(1, 1, dim)
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - class_pos
        state["pos_embed"] = torch.cat([class_pos, state["pos_embed"]], 1)
    return state


@pytest.mark.parametrize("name", ["dinov2-vit-b", "dinov2-vit-s-reg"])
@pytest.mark.parametrize("layout", ["timm", "original"])
def test_dinov2_loads_timm_and_original_files(name, layout, zoo_cache):
    source = tiny(name, 16)
    for p in source.net.parameters():  # nonzero everywhere, so a key that is not loaded shows
        p.data.add_(torch.randn_like(p) * 0.1)
    state = source.net.state_dict()
    default = P.cache_dir("weights") / (P.dinov2_file("s").replace("_pretrain", "_reg4_pretrain")
                                       if name.endswith("-reg") else P.dinov2_file("b"))
    if layout == "timm":
        save_file({k: v.contiguous() for k, v in state.items()}, str(zoo_cache / "model.safetensors"))
        loaded = tiny(name, 16, str(zoo_cache / "model.safetensors"), random_init=False)
    else:  # found under the cache when no path is given
        torch.save(to_original_dinov2(state), default)
        loaded = tiny(name, 16, "", random_init=False)
    x = images()
    torch.testing.assert_close(loaded(x), source(x))
    assert loaded.identity()["weights"]["size"] > 0 and loaded.identity()["input_size"] == 224
    if layout == "original":  # the 16x16 position embedding resampled to another grid at load time
        assert tiny(name, 8, "", random_init=False)(x).shape == (2, 64, 32)
        before = loaded.identity()
        stat = default.stat()  # the file replaced: a new modification time
        os.utime(default, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert tiny(name, 16, "", random_init=False).identity() != before


HUBCONF = '''
import timm, torch
dependencies = ["torch", "timm"]

class DinoVisionTransformer(torch.nn.Module):
    """Stands in for the dinov2 clone's model: its forward_features dict, any multiple of 14 px."""
    def __init__(self):
        super().__init__()
        self.vit = timm.create_model("vit_base_patch14_dinov2", num_classes=0, dynamic_img_size=True,
                                     embed_dim=32, depth=1, num_heads=2)
        self.embed_dim = 32

    def forward_features(self, x):
        tokens = self.vit.forward_features(x)
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}

def dinov2_vitb14(pretrained=True):
    assert not pretrained
    return DinoVisionTransformer()
'''


def test_dinov2_from_a_torch_hub_clone(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hubconf.py").write_text(HUBCONF)
    spec = importlib.util.spec_from_file_location("fake_hubconf", tmp_path / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    with pytest.raises(MissingWeightsError, match="dinov2_vitb14_pretrain.pth"):
        P.build_dinov2("dinov2-vit-b", str(tmp_path), 16)
    torch.manual_seed(1)
    reference = hubconf.dinov2_vitb14(pretrained=False).eval()
    torch.save(reference.state_dict(), tmp_path / "dinov2_vitb14_pretrain.pth")
    enc = P.build_dinov2("dinov2-vit-b", str(tmp_path), 16)
    assert isinstance(enc, P.DINOv2HubEncoder) and enc.dim == 32
    x = images()
    pixels = enc.preprocess(x)
    assert pixels.shape[-1] == 224
    torch.testing.assert_close(enc(x), reference.forward_features(pixels)["x_norm_patchtokens"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="hubconf.py"):
        P.build_dinov2("dinov2-vit-b", str(tmp_path / "plain"), 16)


def test_clip_and_timm_load_local_files(tmp_path):
    for name in ("clip-vit-l", "clip-vit-b"):
        torch.manual_seed(2)
        model = open_clip.create_model(P.CLIP_ARCHS[name][0], force_quick_gelu=True, **tiny_clip_cfg(name))
        torch.save(model.state_dict(), tmp_path / f"{name}.bin")
        loaded = tiny(name, 8, str(tmp_path / f"{name}.bin"), random_init=False)
        x = images()
        model.visual.output_tokens = True
        torch.testing.assert_close(loaded(x), match_grid(model.visual.eval()(loaded.preprocess(x))[1], 8))
    arch = TIMM_NAME[len("timm:"):]
    source = timm.create_model(arch, img_size=128, num_classes=10, **TINY_VIT).eval()  # a classifier head
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = tiny(TIMM_NAME, 8, str(tmp_path / "model.safetensors"), random_init=False)
    x = images()
    torch.testing.assert_close(loaded(x), source.forward_features(loaded.preprocess(x))[:, 1:])


def test_registry_names_dims_and_errors(zoo_cache):
    with pytest.raises(ConfigError, match="dinov2-vit-b-reg.*timm:<name>"):
        build_encoders("nope", grid=16)
    with pytest.raises(ConfigError, match="2 encoder.*1 weights path"):
        encoder_specs("dinov2-vit-b,clip-vit-l", "/w/a.pth")
    with pytest.raises(ConfigError, match="unknown timm model"):
        encoder_dims("timm:not_a_model")
    names = "dinov2-vit-s,dinov2-vit-g-reg,clip-vit-b,clip-vit-l,timm:vit_large_patch16_224"
    assert encoder_dims(names) == [384, 1536, 768, 1024, 1024]
    with pytest.raises(MissingWeightsError, match="clip_224.openai"):
        build_encoders("clip-vit-l", grid=16)


def test_match_grid():
    tokens = torch.randn(2, 256, 5)
    assert match_grid(tokens, 16) is tokens
    fmap = tokens.transpose(1, 2).reshape(2, 5, 16, 16)
    pooled = F.avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(match_grid(tokens, 8), pooled)
    assert match_grid(tokens, 32).shape == (2, 1024, 5)
