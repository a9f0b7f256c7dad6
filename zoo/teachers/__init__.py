"""Frozen vision encoders that give patch tokens on the diffusion model's token grid.

Any aligning method (REPA, REPA-E, DDT, U-REPA, ReDi, ...) asks for teachers by name:

    encoders = build_encoders("dinov2-vit-b,clip-vit-l", weights="/w/dinov2.pth,/w/clip.bin", grid=16)
    tokens = encoders[0](images)          # images in [-1, 1] -> [B, grid * grid, D], patch tokens only

Names (`encoder_names()` lists them):
  builtin            the zoo's own small self-supervised ViT, trained on the run's data (zoo/teachers/builtin.py)
  builtin-cluster    a small CNN trained without labels on clusters of builtin's features (zoo/teachers/cluster.py)
  dinov2-vit-{s,b,l,g}[-reg]   DINOv2 (timm), from a timm weights file, the original .pth, or a torch.hub dir
  clip-vit-{b,l}     CLIP image towers (open_clip), from a local weights file
  timm:<model name>  any timm ViT, from a local weights file

Every encoder has its own preprocessing (resize method and resolution, normalisation), returns
patch tokens without the CLS or register tokens, and matches the token grid to the diffusion
model's: ViTs whose position embedding can be resampled are fed an image of exactly
`grid * patch` pixels; otherwise the token map is resized (`match_grid`). Encoders are frozen:
no parameter requires grad, they stay in eval mode, and their forward runs under no_grad.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError


def match_grid(tokens: Tensor, grid: int) -> Tensor:
    """[B, g*g, D] tokens of a square grid -> [B, grid*grid, D]: area-averaged down, bilinear up."""
    b, n, d = tokens.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    if g == grid:
        return tokens
    fmap = tokens.transpose(1, 2).reshape(b, d, g, g)
    if grid < g:
        fmap = F.adaptive_avg_pool2d(fmap, grid)
    else:
        fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


def resize_images(images: Tensor, size: int, mode: str) -> Tensor:
    """Plain F.interpolate without antialiasing, as REPA resizes for DINOv2 (`224 * resolution // 256`, bicubic)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))


class Encoder(nn.Module):
    """A frozen teacher. Subclasses set `name` and `dim` and implement `preprocess` and `patch_tokens`.

    `forward(images)` takes images in [-1, 1] at any resolution and returns [B, grid*grid, dim].
    """

    name: str = ""
    dim: int = 0

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> the encoder's input (resized and normalised its own way)."""
        raise NotImplementedError

    def patch_tokens(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels -> [B, N, dim] patch tokens (no CLS, no registers) on the encoder's grid."""
        raise NotImplementedError

    def freeze(self) -> "Encoder":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)  # a teacher never leaves eval mode (dropout, BatchNorm statistics)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return match_grid(self.patch_tokens(self.preprocess(images)), self.grid)

    def identity(self) -> dict:
        """What determines this encoder's outputs (name, weights, resolution), for feature-cache keys."""
        return {"name": self.name, "grid": self.grid}


# name -> (factory(name, weights, grid, cfg) -> Encoder, dim(name, cfg) -> int); cfg: the run config, whose
# `teacher` section is the built-in teacher's recipe and `data` the data it is trained on
_FAMILIES: dict[str, tuple[Callable, Callable]] = {}
_PREFIXES: dict[str, tuple[Callable, Callable]] = {}


def register_encoder(names, factory: Callable, dim: Callable, prefix: bool = False) -> None:
    """Make encoder names available; `prefix=True` registers a family such as `timm:<model>`."""
    for name in ([names] if isinstance(names, str) else names):
        (_PREFIXES if prefix else _FAMILIES)[name] = (factory, dim)


def _load_families() -> None:
    from zoo.teachers import builtin, cluster, pretrained  # noqa: F401  (each registers its names)


def encoder_names() -> list[str]:
    _load_families()
    return sorted(_FAMILIES) + [f"{p}<name>" for p in sorted(_PREFIXES)]


def _family(name: str):
    _load_families()
    if name in _FAMILIES:
        return _FAMILIES[name]
    for prefix, family in _PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return family
    raise ConfigError(f"unknown encoder {name!r}; valid: {', '.join(encoder_names())}")


def check_encoder_names(text: str) -> None:
    """Refuse an unknown name in a comma-separated encoder list before anything is built (one line with the
    valid names); a known name's weights are checked when the teacher is built."""
    for name in split_list(text):
        _family(name)


def split_list(text: str) -> list[str]:
    return [part.strip() for part in str(text or "").split(",") if part.strip()]


def require_one_encoder(method: str, encoders: str, why: str) -> None:
    """Methods whose latent or token is built from one encoder's features (ReDi, REG, RAE, SVG) refuse a list:
    `why` completes "<why> exactly one encoder" in the error, e.g. "RAE diffuses the tokens of"."""
    if len(split_list(encoders)) != 1:
        raise ConfigError(f"{method}.encoder={encoders!r}: {why} exactly one encoder")


def encoder_specs(names: str, weights: str = "") -> list[tuple[str, str]]:
    """Pair each comma-separated encoder name with its comma-separated weights path ('' where not given)."""
    names_, weights_ = split_list(names), split_list(weights)
    if not names_:
        raise ConfigError(f"no encoder given; valid: {', '.join(encoder_names())}")
    if weights_ and len(weights_) != len(names_):
        raise ConfigError(f"{len(names_)} encoder(s) ({', '.join(names_)}) but {len(weights_)} weights path(s); "
                          "give one path per encoder, comma-separated, in the same order")
    return list(zip(names_, weights_ or [""] * len(names_)))


def encoder_dims(names: str, cfg=None) -> list[int]:
    """Token width of each named encoder, known without loading any weights (for building projectors)."""
    return [_family(name)[1](name, cfg) for name, _ in encoder_specs(names)]


def build_encoders(names: str, weights: str = "", *, grid: int, cfg=None, device="cpu") -> list[Encoder]:
    """Frozen encoders on `device`, each returning [B, grid*grid, D] patch tokens for images in [-1, 1]."""
    encoders = []
    for name, path in encoder_specs(names, weights):
        encoder = _family(name)[0](name, path, grid, cfg)
        encoders.append(encoder.freeze().to(device))
    return encoders
