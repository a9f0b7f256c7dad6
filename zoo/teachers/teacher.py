"""The frozen teacher an aligning method holds: its encoders and their token cache, as one component.

    teacher = Teacher(self.options, cfg, grid=16, owner="repa")   # options: TeacherOptions fields
    teacher.setup(device, training)                               # sampling needs no teacher: it holds none
    tokens = teacher.tokens(batch)                                # [y*_e for each encoder e], [B, grid^2, D_e]

A method that aligns builds one in `__init__` (on `Method.token_grid()`), calls `setup` from its own `setup` and
`tokens` from its
`targets`; a method that does not align holds none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.data import build_dataset
from zoo.errors import ConfigError
from zoo.teachers import build_encoders, encoder_dims
from zoo.teachers.feature_cache import cacheable, load_or_build

CACHE_MODES = ("auto", "always", "never")


@dataclass
class TeacherOptions:
    """The teacher's options; an aligning method's config dataclass inherits them (cfg.<method>.encoder, ...)."""
    encoder: str = "builtin"        # one or more encoders, comma-separated (zoo.teachers.encoder_names())
    encoder_weights: str = ""       # local weights file or folder per encoder, comma-separated, same order
    feature_cache: str = "auto"     # auto: cache teacher tokens for in-memory data | always | never


def check_options(options, owner: str) -> None:
    """One clear line for a bad teacher option, whether or not the teacher is used in this run."""
    if options.feature_cache not in CACHE_MODES:
        raise ConfigError(f"{owner}.feature_cache={options.feature_cache!r}; valid: {', '.join(CACHE_MODES)}")


class Teacher:
    """Frozen encoders on the backbone's token grid, with a cache of their tokens of the training set.

    The encoders live here, not in the model: they are never optimised, EMA'd or saved in checkpoints.
    """

    def __init__(self, options, cfg, grid: int, owner: str):
        check_options(options, owner)
        self.options, self.cfg, self.grid, self.owner = options, cfg, grid, owner
        self.device = torch.device("cpu")
        self.encoders, self.caches = [], []

    def dims(self) -> list[int]:
        """Each encoder's token width D_e (known without loading its weights): what the projectors map to."""
        return encoder_dims(self.options.encoder, self.cfg)

    def setup(self, device, training: bool = True) -> None:
        """Load the encoders onto `device` and, where the data allows, their token cache (built on first use);
        `training=False` (only sampling) holds none."""
        self.encoders, self.caches = [], []
        if not training:
            return
        self.hold_encoders(device)
        mode = self.options.feature_cache
        if mode == "never":
            return
        dataset = build_dataset(self.cfg.data)
        if mode == "always" or cacheable(dataset):
            self.caches = [load_or_build(encoder, self.cfg.data, dataset) for encoder in self.encoders]

    def hold_encoders(self, device) -> None:
        """Load the encoders onto `device`, without their token cache (what `setup` does first; ReDi's
        `--features real` needs only this at sampling time)."""
        if self.cfg.data.dataset == "prepared":
            from zoo.data.store import read_meta

            if not read_meta(self.cfg.data.root)["images_stored"]:
                raise ConfigError(f"{self.owner}'s teacher needs the images, and the store {self.cfg.data.root} holds "
                                  "only latents (--no-images): prepare it again without --no-images")
        self.device = torch.device(device)
        self.encoders = self.load_encoders()

    def describe(self) -> str:
        """The teacher in a few words, for the comparison table: its encoders, and whether the built-in one is
        centred and how long it was trained (its cache key changes with the recipe, so the table must say it)."""
        names = [n.strip() for n in self.options.encoder.split(",")]
        recipe = self.cfg.teacher
        return ", ".join(f"builtin ViT ({recipe.steps} steps{', centred' if recipe.center_tokens else ''})"
                         if n == "builtin" else n for n in names)

    def load_encoders(self) -> list:
        """The frozen encoders on `self.device`, before any cache is built from them: a subclass may wrap them (REG
        puts each one's class token before its patch tokens, methods/reg.py), and the cache then holds what they return."""
        return build_encoders(self.options.encoder, self.options.encoder_weights, grid=self.grid, cfg=self.cfg,
                              device=self.device)

    def tokens(self, batch: dict) -> list:
        """y*: each encoder's patch tokens of the clean (possibly flipped) images, cached or computed now."""
        if self.caches:
            return [cache.lookup(batch["index"], batch["flip"]).to(self.device) for cache in self.caches]
        return [encoder(batch["image"]) for encoder in self.encoders]
