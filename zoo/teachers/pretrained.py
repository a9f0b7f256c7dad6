"""Pretrained teachers: DINOv2 (timm, or a local clone of facebookresearch/dinov2), OpenAI CLIP image
towers (open_clip) and any timm ViT (`timm:<model name>`).

Nothing is downloaded: weights come from a local file, and a missing one raises MissingWeightsError with
the command that fetches it on an online machine. The builders take keyword overrides used by the tests:
`random_init=True` skips the weights and size overrides (embed_dim=32, depth=1, ...) give a tiny model of
the real class, so preprocessing and token selection are tested on the code that runs for real.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from zoo.cache import cache_dir, weights_identity
from zoo.teachers import Encoder, register_encoder, resize_images
from zoo.errors import CheckpointError, ConfigError, MissingWeightsError

DINOV2_TIMM = {"s": "vit_small_patch14_dinov2", "b": "vit_base_patch14_dinov2",
               "l": "vit_large_patch14_dinov2", "g": "vit_giant_patch14_dinov2"}


def dinov2_file(size: str) -> str:
    return f"dinov2_vit{size}14_pretrain.pth"


def dinov2_url(size: str) -> str:
    return f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{dinov2_file(size)}"


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINOV2_DIMS = {"s": 384, "b": 768, "l": 1024, "g": 1536}
DINOV2_NAMES = [f"dinov2-vit-{size}{reg}" for reg in ("", "-reg") for size in DINOV2_TIMM]
CLIP_ARCHS = {"clip-vit-b": ("ViT-B-16", 768), "clip-vit-l": ("ViT-L-14", 1024)}  # name -> (open_clip, width)


class PretrainedEncoder(Encoder):
    """A frozen network behind its own resize (`size` px, `mode`) and normalisation ([0, 1] pixels, mean/std)."""

    def __init__(self, name: str, net, grid: int, *, dim: int, patch: int, size: int, mode: str, mean, std,
                 weights: Path | None):
        super().__init__(grid)
        self.name, self.net, self.dim, self.patch = name, net, dim, patch
        self.size, self.mode, self.weights = size, mode, weights
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        pixels = resize_images((images.float() + 1) / 2, self.size, self.mode)
        return (pixels - self.mean) / self.std

    def identity(self) -> dict:
        return {**super().identity(), "input_size": self.size, "resize": self.mode,
                "weights": weights_identity(self.weights)}


class TimmEncoder(PretrainedEncoder):
    def patch_tokens(self, pixels: Tensor) -> Tensor:
        # after the final norm (DINOv2's x_norm_patchtokens); the prefix is CLS (+ registers, distillation token)
        return self.net.forward_features(pixels)[:, self.net.num_prefix_tokens:]


class DINOv2HubEncoder(PretrainedEncoder):
    def patch_tokens(self, pixels: Tensor) -> Tensor:
        return self.net.forward_features(pixels)["x_norm_patchtokens"]


class CLIPEncoder(PretrainedEncoder):
    def patch_tokens(self, pixels: Tensor) -> Tensor:
        return self.net(pixels)[1]  # output_tokens=True: (pooled, patch tokens after ln_post, no CLS)


def _existing(path: str, default: Path, what: str, fetch: str) -> Path:
    path = Path(path).expanduser() if path else default
    if not path.exists():
        raise MissingWeightsError(what, path, fetch)
    return path


def _load_timm_weights(net, path: Path, **filter_kwargs) -> None:
    """A timm, original (DINOv2, OpenAI CLIP, ...) or fine-tuned checkpoint, converted by the model's own
    `checkpoint_filter_fn`, which also resamples the position embedding to the model's grid."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=False)
    except Exception as exc:  # not a weights file at all (truncated, text, another format)
        raise CheckpointError(f"encoder weights {path} are not a readable weights file ({type(exc).__name__}); "
                              "fetch the file again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"encoder weights {path} hold a {type(state).__name__}, not a state dict")
    filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, net, **filter_kwargs)
    heads = net.pretrained_cfg.get("classifier") or "head"
    heads = tuple(f"{h}." for h in ([heads] if isinstance(heads, str) else heads))
    state = {k: v for k, v in state.items() if not k.startswith(heads)}  # built with num_classes=0
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: weights of another model size
        raise CheckpointError(f"{path} does not fit {type(net).__name__}: {err}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {type(net).__name__}: missing keys {missing[:4]}, "
                              f"unexpected keys {unexpected[:4]}")


def build_dinov2(name: str, weights: str = "", grid: int = 16, *, random_init=False, **timm_overrides):
    """DINOv2 as REPA feeds it: bicubic to grid*14 px (224 for grid 16), ImageNet normalisation, so its
    patch tokens lie on the diffusion model's grid. `weights`: a timm or original .pth file, a local
    dinov2 clone (torch.hub layout), or '' for zoo.cache.cache_dir('weights')/<original file name>."""
    import timm

    size, reg = name.split("-")[2], name.endswith("-reg")
    arch, file, url = DINOV2_TIMM[size], dinov2_file(size), dinov2_url(size)
    if reg:  # vit_base_patch14_reg4_dinov2, dinov2_vitb14_reg4_pretrain.pth
        arch = arch.replace("_dinov2", "_reg4_dinov2")
        file, url = (s.replace("_pretrain", "_reg4_pretrain") for s in (file, url))
    what, fetch = f"DINOv2 ViT-{size.upper()}/14{' with registers' if reg else ''} weights", f"curl -L -o {file} {url}"
    common = dict(patch=14, size=grid * 14, mode="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    path = None if random_init else _existing(weights, cache_dir("weights") / file, what, fetch)
    if path is not None and path.is_dir():
        if not (path / "hubconf.py").exists():
            raise ConfigError(f"{path} is a folder without hubconf.py: give the DINOv2 weights file "
                              "or a local clone of facebookresearch/dinov2")
        found = [p for p in (path / file, Path(torch.hub.get_dir()) / "checkpoints" / file) if p.exists()]
        if not found:
            raise MissingWeightsError(what, path / file, fetch)
        # the hub model interpolates its position embedding itself (any multiple of 14 px)
        net = torch.hub.load(str(path), f"dinov2_vit{size}14{'_reg' if reg else ''}", source="local",
                             pretrained=False)
        try:
            net.load_state_dict(torch.load(found[0], map_location="cpu", weights_only=True))
        except Exception as exc:
            raise CheckpointError(f"encoder weights {found[0]} cannot be read ({type(exc).__name__}); fetch the "
                                  "file again") from None
        return DINOv2HubEncoder(name, net, grid, dim=net.embed_dim, weights=found[0], **common)
    net = timm.create_model(arch, pretrained=False, img_size=grid * 14, num_classes=0, **timm_overrides)
    if path is not None:
        # no antialiasing when resampling the 37x37 position embedding: as the hub model (REPA's teacher) does
        _load_timm_weights(net, path, antialias=False)
    return TimmEncoder(name, net, grid, dim=net.num_features, weights=path, **common)


def build_clip(name: str, weights: str = "", grid: int = 16, *, random_init=False, **clip_overrides):
    """OpenAI CLIP image tower: bicubic to its own 224 px, CLIP normalisation. Its position embedding is
    not resampled: the native 14x14 (B/16) or 16x16 (L/14) token map is resized by `match_grid`."""
    import open_clip

    arch = CLIP_ARCHS[name][0]
    path = None
    if not random_init:
        repo = open_clip.get_pretrained_cfg(arch, "openai")["hf_hub"].strip("/")
        file = open_clip.pretrained.HF_WEIGHTS_NAME
        path = _existing(weights, cache_dir("weights") / repo.split("/")[-1] / file, f"CLIP {arch} (OpenAI) weights",
                         f"huggingface-cli download {repo} {file} --local-dir .")
    # OpenAI trained with QuickGELU; open_clip only switches it on for its hub tags, not for a file
    model = open_clip.create_model(arch, pretrained=str(path) if path else None, force_quick_gelu=True,
                                   **clip_overrides)
    visual = model.visual
    visual.output_tokens = True
    return CLIPEncoder(name, visual, grid, dim=visual.transformer.width, patch=visual.patch_size[0],
                       size=visual.image_size[0], mode="bicubic", mean=open_clip.OPENAI_DATASET_MEAN,
                       std=open_clip.OPENAI_DATASET_STD, weights=path)


def _timm_meta(name: str, **timm_overrides):
    """The timm model of `timm:<arch>` on the meta device: its architecture without memory or init cost."""
    import timm

    arch = name[len("timm:"):]
    if not timm.is_model(arch):
        raise ConfigError(f"unknown timm model {arch!r} in encoder {name!r} (timm.list_models() lists them)")
    with torch.device("meta"):
        return arch, timm.create_model(arch, pretrained=False, num_classes=0, **timm_overrides)


def build_timm(name: str, weights: str = "", grid: int = 16, *, random_init=False, **timm_overrides):
    """Any timm ViT, fed grid*patch px (its position embedding resampled to the grid) when it can be built
    at that size, with its own normalisation and interpolation. `weights`: '' for
    zoo.cache.cache_dir('weights')/<arch>/model.safetensors."""
    import timm
    from timm.data import resolve_data_config

    arch, meta = _timm_meta(name, **timm_overrides)
    path = None
    if not random_init:
        repo = meta.pretrained_cfg.get("hf_hub_id") or f"timm/{arch}"
        path = _existing(weights, cache_dir("weights") / arch / "model.safetensors", f"timm {arch} weights",
                         f"huggingface-cli download {repo} model.safetensors --local-dir .")
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0,
                                img_size=grid * meta.patch_embed.patch_size[0], **timm_overrides)
    except TypeError:  # no img_size argument: fed its own resolution, its tokens resized by match_grid
        net = timm.create_model(arch, pretrained=False, num_classes=0, **timm_overrides)
    if path is not None:
        _load_timm_weights(net, path)
    data = resolve_data_config({}, model=net)
    return TimmEncoder(name, net, grid, dim=net.num_features, patch=net.patch_embed.patch_size[0],
                       size=net.patch_embed.img_size[0], mode=data["interpolation"], mean=data["mean"],
                       std=data["std"], weights=path)


register_encoder(DINOV2_NAMES, lambda name, weights, grid, cfg: build_dinov2(name, weights, grid),
                 lambda name, cfg: DINOV2_DIMS[name.split("-")[2]])
register_encoder(list(CLIP_ARCHS), lambda name, weights, grid, cfg: build_clip(name, weights, grid),
                 lambda name, cfg: CLIP_ARCHS[name][1])
register_encoder("timm:", lambda name, weights, grid, cfg: build_timm(name, weights, grid),
                 lambda name, cfg: _timm_meta(name)[1].num_features, prefix=True)
