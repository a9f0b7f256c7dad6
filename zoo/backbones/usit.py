"""SiT-down: a U-shaped SiT, the backbone of U-REPA (Tian et al., NeurIPS 2025).

Stages of the shared SiT blocks (zoo/backbones/layers.py) run at a token grid that halves after
each encoder stage and doubles again before each decoder stage; every decoder stage first fuses
the output of the encoder stage at its resolution (a long skip connection). The width never
changes: unlike a convolutional U-Net, the channels are not doubled after downsampling, so a
stage at half resolution costs a quarter of the attention-free FLOPs of a full-resolution one.

    stages (2, 2, 2), 8x8 tokens:   [2 blocks @ 8x8] -down-> [2 blocks @ 4x4] -up, skip-> [2 blocks @ 8x8]

Blocks are numbered from 1 through all stages, as in SiT: with stages (2, 2, 2), blocks 3-4 are the
middle (lowest-resolution) stage. `hidden_layers=(k,)` returns block k's output tokens **on its own
stage's grid**: [B, 16, C] for a block of the 4x4 middle stage above, not [B, 64, C].

Choices (the paper gives no code-level detail we could verify; docs/methods/urepa.md):
- downsampling merges each 2x2 group of tokens, concatenated to 4C, through Linear(4C, C) (Swin's
  patch merging; U-DiT, the same authors' U-shaped DiT, uses a conv and pixel-unshuffle to the same
  effect); upsampling is Linear(C, 4C) then a pixel shuffle into the 2x2 children. Learned maps
  rather than average pooling / nearest copies, so that nothing is lost before the skip arrives;
- a skip is fused as in U-ViT: concatenate the decoder tokens with the skip, Linear(2C, C);
- every stage adds the fixed 2D sin-cos position embedding of its own grid on entry (2D RoPE, when
  on, also uses the stage's grid).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from zoo.backbones.layers import (BlockOptions, LabelEmbedder, PatchEmbed, RoPE2D, TimeEmbedding, init_weights,
                                  position_table, unpatchify)
from zoo.backbones.sit import (SIT_SIZES, BackboneOutput, architecture, check_block_numbers, count_parameters,
                               resolve_size)
from zoo.errors import ConfigError

# Blocks per stage for each of SiT's sizes, at SiT's depth (B: 12, XL: 28; micro has one more block
# than SiT's 2 because a U needs three stages). One downsampling: at patch 2 on 32x32 latents,
# 16x16 -> 8x8 tokens. The zoo's choice: the paper's stage split is not given in a form we could check.
USIT_STAGES = {
    "micro": (1, 1, 1),
    "tiny": (2, 2, 2),
    "S": (4, 4, 4),
    "B": (4, 4, 4),
    "L": (8, 8, 8),
    "XL": (9, 10, 9),
}


class TokenDownsample(nn.Module):
    """[B, g*g, C] -> [B, (g/2)^2, C]: each 2x2 group of tokens, concatenated (4C), through Linear(4C, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduce = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, grid: int) -> Tensor:
        b, _, c = x.shape
        half = grid // 2
        groups = x.reshape(b, half, 2, half, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, half * half, 4 * c)
        return self.reduce(groups)


class TokenUpsample(nn.Module):
    """[B, g*g, C] -> [B, (2g)^2, C]: Linear(C, 4C), then each token's 4C become its 2x2 children (pixel shuffle)."""

    def __init__(self, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 4 * dim)

    def forward(self, x: Tensor, grid: int) -> Tensor:
        b, _, c = x.shape
        children = self.expand(x).reshape(b, grid, grid, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return children.reshape(b, 4 * grid * grid, c)


class SkipFusion(nn.Module):
    """A long skip connection (U-ViT): concatenate the decoder's tokens with the encoder stage's, Linear(2C, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, tokens: Tensor, skip: Tensor) -> Tensor:
        return self.linear(torch.cat([tokens, skip], dim=-1))


def check_stages(stages: Sequence[int], key: str = "stages") -> tuple[int, ...]:
    stages = tuple(int(d) for d in stages)
    if len(stages) < 3 or len(stages) % 2 == 0 or min(stages) < 1:
        raise ConfigError(f"{key}={list(stages)} must be an odd number (>= 3) of block counts >= 1: "
                          "encoder stages, the middle stage, decoder stages, e.g. [2, 2, 2]")
    return stages


def middle_block(stages: Sequence[int]) -> int:
    """Number (from 1) of the last block of the middle, lowest-resolution stage."""
    stages = check_stages(stages)
    return sum(stages[:len(stages) // 2 + 1])


class USiT(nn.Module):
    """SiT-down: SiT blocks in stages (encoder, middle, decoder) with token down/upsampling and long skips."""

    def __init__(self, *, input_size: int, in_channels: int, num_classes: int, stages: Sequence[int] = (2, 2, 2),
                 patch: int = 2, hidden: int = 1152, heads: int = 16, rope: bool = False, rope_extent: float = 0.0,
                 pos_embed: str = "sincos", time: TimeEmbedding = TimeEmbedding(), init: str = "dit",
                 out_channels: int | None = None, **block):
        super().__init__()
        options = BlockOptions(**block)
        self.time = time
        self.stage_depths = check_stages(stages)
        levels = len(self.stage_depths) // 2
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch, self.num_classes, self.hidden_size = patch, num_classes, hidden
        self.depth = sum(self.stage_depths)
        self.x_embedder = PatchEmbed(input_size, patch, in_channels, hidden)
        grid = self.x_embedder.grid
        if grid % 2 ** levels:
            raise ConfigError(f"a {grid}x{grid} token grid cannot be halved {levels} time(s) "
                              f"({len(self.stage_depths)} stages); use fewer stages or a smaller patch")
        last = len(self.stage_depths) - 1
        self.grids = tuple(grid >> min(i, last - i) for i in range(len(self.stage_depths)))
        self.t_embedder = time.embedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        for g in sorted(set(self.grids)):
            self.register_buffer(f"pos_embed_{g}", position_table(pos_embed, hidden, g), persistent=False)
        self.ropes = nn.ModuleDict({str(g): RoPE2D(hidden // heads, g, extent=rope_extent)
                                    for g in sorted(set(self.grids))}) if rope else None
        self.stages = nn.ModuleList(nn.ModuleList(options.block(hidden, heads) for _ in range(d))
                                    for d in self.stage_depths)
        self.downsamplers = nn.ModuleList(TokenDownsample(hidden) for _ in range(levels))   # after encoder stage i
        self.upsamplers = nn.ModuleList(TokenUpsample(hidden) for _ in range(levels))       # before decoder stage j
        self.skips = nn.ModuleList(SkipFusion(hidden) for _ in range(levels))
        self.final_layer = options.final_layer(hidden, patch, self.out_channels)
        init_weights(self, init)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def middle_stage(self) -> int:
        return len(self.stage_depths) // 2

    def block_grid(self, k: int) -> int:
        """Side of the token grid of block k's output."""
        self.check_layers((k,))
        return self.grids[next(i for i in range(len(self.stage_depths)) if k <= sum(self.stage_depths[:i + 1]))]

    def condition(self, t: Tensor, y: Tensor) -> Tensor:
        return self.t_embedder(self.time.network_time(t)) + self.y_embedder(y)

    def check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        return check_block_numbers(layers, self.depth, f"stages {list(self.stage_depths)}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_layers: Iterable[int] = (),
                stop_after: int | None = None) -> BackboneOutput:
        """Velocity at (x_t, t, y); `hidden_layers` selects block outputs (each on its stage's grid).

        `stop_after=k` runs blocks 1..k only and returns no velocity.
        """
        wanted = set(self.check_layers(hidden_layers))
        c = self.condition(t, y)
        tokens = self.x_embedder(x)
        hidden, skips, k = {}, [], 0
        mid = self.middle_stage
        for i, blocks in enumerate(self.stages):
            grid = self.grids[i]
            if i > mid:  # decoder stage: back up to its resolution, then fuse the encoder stage of that resolution
                j = i - mid - 1
                tokens = self.skips[j](self.upsamplers[j](tokens, self.grids[i - 1]), skips.pop())
            tokens = tokens + getattr(self, f"pos_embed_{grid}").to(tokens.dtype)
            rope = self.ropes[str(grid)] if self.ropes is not None else None
            for block in blocks:
                k += 1
                tokens = block(tokens, c, rope)
                if k in wanted:
                    hidden[k] = tokens
                if stop_after is not None and k >= stop_after:
                    return BackboneOutput(None, hidden)
            if i < mid:
                skips.append(tokens)
                tokens = self.downsamplers[i](tokens, grid)
        velocity = unpatchify(self.final_layer(tokens, c), self.patch, self.out_channels)
        return BackboneOutput(self.time.velocity(velocity), hidden)


def resolve_stages(model_cfg, stages: Sequence[int] = (), key: str = "stages") -> tuple[int, ...]:
    """Blocks per stage: `stages` if given, else the layout of `model.size`; checked against `model.depth`.

    `key` names the config key that holds `stages`, for the error messages.
    """
    if stages:
        stages = check_stages(stages, key)
    elif model_cfg.size in USIT_STAGES:
        stages = USIT_STAGES[model_cfg.size]
    else:
        raise ConfigError(f"model.size={model_cfg.size!r} has no stage layout; set {key} (blocks per stage, "
                          f"e.g. [2, 2, 2]) or model.size to one of {', '.join(USIT_STAGES)}")
    if model_cfg.depth and model_cfg.depth != sum(stages):
        raise ConfigError(f"model.depth={model_cfg.depth} but the stages {list(stages)} have {sum(stages)} blocks; "
                          "set model.depth=0 or stages that add up to it")
    return stages


def build_usit(model_cfg, *, stages: Sequence[int] = (), input_size: int, in_channels: int, num_classes: int,
               stages_key: str = "stages", **extra) -> USiT:
    """SiT-down with `model`'s width, heads and block options; depth is the sum of the stages."""
    stages = resolve_stages(model_cfg, stages, stages_key)
    dims = resolve_size(OmegaConf.merge(model_cfg, {"depth": sum(stages)}))
    return USiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, stages=stages,
                patch=model_cfg.patch, hidden=dims["hidden"], heads=dims["heads"], **architecture(model_cfg), **extra)


def usit_parameter_count(size: str, stages: Sequence[int] = (), patch: int = 2, input_size: int = 32,
                         in_channels: int = 4, num_classes: int = 1000) -> int:
    """Parameters of SiT-down at SiT's width and heads for `size`, counted on the meta device."""
    dims = SIT_SIZES[size]
    with torch.device("meta"):
        model = USiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                     stages=stages or USIT_STAGES[size], patch=patch, hidden=dims["hidden"], heads=dims["heads"])
    return count_parameters(model)
