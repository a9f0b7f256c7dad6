"""SiT: a DiT-style transformer that predicts the velocity of the flow (Ma et al., 2024).

`forward` returns the velocity and, on request, the hidden states after chosen blocks, so
aligning methods read features without hooks or global state. Blocks are numbered from 1:
`hidden_layers=(8,)` returns the tokens after the 8th block (REPA's "encoder depth 8").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from zoo.backbones.layers import (INITS, MLPS, NORMS, POS_EMBEDS, TIME_CONVENTIONS, BlockOptions, LabelEmbedder,
                                  PatchEmbed, RoPE2D, TimeEmbedding, init_weights, position_table, unpatchify)
from zoo.errors import ConfigError

# width, depth, heads. The paper sizes are SiT's/DiT's; tiny and micro are the zoo's CPU sizes.
SIT_SIZES = {
    "micro": dict(hidden=32, depth=2, heads=2),
    "tiny": dict(hidden=128, depth=6, heads=4),
    "S": dict(hidden=384, depth=12, heads=6),
    "B": dict(hidden=768, depth=12, heads=12),
    "L": dict(hidden=1024, depth=24, heads=16),
    "XL": dict(hidden=1152, depth=28, heads=16),
}


@dataclass
class BackboneOutput:
    velocity: Optional[Tensor]                           # None when the forward stopped early
    hidden: dict[int, Tensor] = field(default_factory=dict)  # block number -> tokens [B, N, C]


class SiT(nn.Module):
    """`**block` are the `BlockOptions` (norm, mlp, qk_norm, biases, ...); `time` how t is embedded."""

    def __init__(self, *, input_size: int, in_channels: int, num_classes: int, patch: int = 2, hidden: int = 1152,
                 depth: int = 28, heads: int = 16, rope: bool = False, rope_extent: float = 0.0,
                 pos_embed: str = "sincos", time: TimeEmbedding = TimeEmbedding(), init: str = "dit",
                 out_channels: Optional[int] = None, **block):
        super().__init__()
        options = BlockOptions(**block)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch, self.depth, self.num_classes, self.hidden_size = patch, depth, num_classes, hidden
        self.time = time
        self.x_embedder = PatchEmbed(input_size, patch, in_channels, hidden)
        self.t_embedder = time.embedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.register_buffer("pos_embed", position_table(pos_embed, hidden, self.x_embedder.grid), persistent=False)
        self.rope = RoPE2D(hidden // heads, self.x_embedder.grid, extent=rope_extent) if rope else None
        self.blocks = nn.ModuleList(options.block(hidden, heads) for _ in range(depth))
        self.final_layer = options.final_layer(hidden, patch, self.out_channels)
        init_weights(self, init)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def condition(self, t: Tensor, y: Tensor) -> Tensor:
        """c = t_emb + y_emb, with t as the network is fed it (`TimeEmbedding.network_time`)."""
        return self.t_embedder(self.time.network_time(t)) + self.y_embedder(y)

    def check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        return check_block_numbers(layers, self.depth)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_layers: Iterable[int] = (),
                stop_after: Optional[int] = None) -> BackboneOutput:
        """Velocity at (x_t, t, y); `hidden_layers` selects block outputs to return.

        `stop_after=k` runs blocks 1..k only and returns no velocity (for losses that need just
        early features, e.g. REPA-E's VAE update).
        """
        wanted = set(self.check_layers(hidden_layers))
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.condition(t, y)
        hidden = {}
        for k, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c, self.rope)
            if k in wanted:
                hidden[k] = tokens
            if stop_after is not None and k >= stop_after:
                return BackboneOutput(None, hidden)
        velocity = unpatchify(self.final_layer(tokens, c), self.patch, self.out_channels)
        return BackboneOutput(self.time.velocity(velocity), hidden)


def check_block_numbers(layers: Iterable[int], depth: int, layout: str = "") -> tuple[int, ...]:
    """`layers` as a tuple, or a ConfigError naming those outside 1..depth (and the backbone's `layout`)."""
    layers = tuple(layers)
    bad = [k for k in layers if not 1 <= k <= depth]
    if bad:
        raise ConfigError(f"hidden layer(s) {bad} out of range: this backbone has blocks 1..{depth}"
                          + (f" ({layout})" if layout else ""))
    return layers


def resolve_size(model_cfg) -> dict:
    """Width, depth and heads from `model.size`, with any explicit non-zero value taking precedence."""
    if model_cfg.size not in SIT_SIZES and model_cfg.size != "custom":
        raise ConfigError(f"unknown model.size {model_cfg.size!r}; valid: {', '.join(SIT_SIZES)}, custom")
    dims = dict(SIT_SIZES.get(model_cfg.size, {}))
    for key in ("hidden", "depth", "heads"):
        if model_cfg[key]:
            dims[key] = model_cfg[key]
    missing = [k for k in ("hidden", "depth", "heads") if not dims.get(k)]
    if missing:
        raise ConfigError(f"model.size=custom needs model.{', model.'.join(missing)} set")
    return dims


def architecture(model_cfg) -> dict:
    """The backbone keyword arguments every backbone shares, from `model.*`, checked: block options, positions,
    time embedding and initialisation."""
    for key, valid in (("norm", NORMS), ("mlp", MLPS), ("pos_embed", POS_EMBEDS), ("init", INITS),
                       ("time_convention", TIME_CONVENTIONS)):
        if model_cfg[key] not in valid:
            raise ConfigError(f"unknown model.{key} {model_cfg[key]!r}; valid: {', '.join(valid)}")
    if model_cfg.final_norm not in ("", *NORMS):
        raise ConfigError(f"unknown model.final_norm {model_cfg.final_norm!r}; valid: '' (model.norm), "
                          f"{', '.join(NORMS)}")
    if model_cfg.time_max_period <= 1 or model_cfg.time_scale <= 0:
        raise ConfigError(f"model.time_scale={model_cfg.time_scale} must be > 0 and model.time_max_period="
                          f"{model_cfg.time_max_period} > 1")
    return dict(mlp_ratio=model_cfg.mlp_ratio, norm=model_cfg.norm, norm_affine=model_cfg.norm_affine,
                mlp=model_cfg.mlp, qk_norm=model_cfg.qk_norm, qkv_bias=model_cfg.qkv_bias,
                mlp_bias=model_cfg.mlp_bias, final_norm=model_cfg.final_norm, rope=model_cfg.rope,
                rope_extent=model_cfg.rope_extent, pos_embed=model_cfg.pos_embed, init=model_cfg.init,
                time=TimeEmbedding(model_cfg.time_scale, model_cfg.time_max_period, model_cfg.time_convention))


def build_sit(model_cfg, *, input_size: int, in_channels: int, num_classes: int, **extra) -> SiT:
    return SiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, patch=model_cfg.patch,
               **architecture(model_cfg), **resolve_size(model_cfg), **extra)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sit_parameter_count(size: str, patch: int = 2, input_size: int = 32, in_channels: int = 4,
                        num_classes: int = 1000) -> int:
    """Parameters of a paper-sized SiT, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = SiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, patch=patch,
                    **SIT_SIZES[size])
    return count_parameters(model)
