"""DiT^DH: a DiT with a wide, shallow DDT head, the diffusion backbone of RAE (Zheng et al., 2025).

    c = SiLU(t_emb + y_emb)                                     t_emb: Gaussian Fourier features of t, then an MLP
    s = Enc(PatchEmbed_s(x_t) + pos, c)                         E blocks of width W, per-sample adaLN from c
    s = Proj(SiLU(t_emb + s))                                   per token; Linear W -> W_h (Identity when equal)
    v = Final(Head(PatchEmbed_x(x_t), s), s)                    D blocks of width W_h, per-token adaLN from s

The head is wider than the body (RAE-XL: 28 blocks of 1152, then 2 of 2048), so a high-dimensional latent
(a 768-wide DINOv2 token per position) passes through a layer at least as wide as itself. The time is fed as
the zoo's t (t = 1 is noise, as in RAE's transport), unscaled, into fixed Gaussian frequencies W ~ N(0, 1):
[sin(2 pi t W), cos(2 pi t W)]. Every adaLN applies its own SiLU, so the body's blocks see SiLU(SiLU(t + y)), as
officially. Positions: a fixed sin-cos table on the body's input only, and 2D RoPE in every block whose channel
layout is EVA's (first half of each head's channel pairs rotate with the row, second half with the column).
Module names follow the official `DiTwDDTHead`, so its state dict loads by dropping the fixed buffers.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.backbones.layers import Block, LabelEmbedder, PatchEmbed, modulate, as_tokens, sincos_pos_embed_2d, unpatchify
from zoo.backbones.sit import BackboneOutput, check_block_numbers
from zoo.errors import ConfigError


class GaussianFourierTime(nn.Module):
    """t -> MLP([sin(2 pi t W), cos(2 pi t W)]) with W ~ N(0, scale^2) drawn once and never trained."""

    def __init__(self, hidden: int, features: int = 256, scale: float = 1.0):
        super().__init__()
        self.register_buffer("W", torch.randn(features) * scale)   # saved: it is part of the network
        self.mlp = nn.Sequential(nn.Linear(2 * features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        angles = t.float()[:, None] * self.W[None, :] * 2 * math.pi
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class EvaRoPE2D(nn.Module):
    """2D rotary positions with EVA's layout (RAE's and LightningDiT's `VisionRotaryEmbeddingFast`).

    For a head of `head_dim` channels, frequencies f_k = theta^(-4k / head_dim), k < head_dim / 4, each used by two
    consecutive channel pairs; the first head_dim / 2 channels rotate with the token's row, the rest with its column.
    Positions are arange(grid) / grid * grid, computed in float32 as officially.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ConfigError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        pos = torch.arange(grid) / grid * grid
        axis = torch.einsum("i,f->if", pos, freqs).repeat_interleave(2, dim=-1)         # [grid, half]
        rows = axis[:, None, :].expand(grid, grid, half)
        cols = axis[None, :, :].expand(grid, grid, half)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
        self.register_buffer("freqs_cos", angles.cos(), persistent=False)
        self.register_buffer("freqs_sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, heads, N, head_dim]; out = x cos + rotate_half(x) sin, rotate_half(a, b) = (-b, a) per pair."""
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * self.freqs_cos + rotated * self.freqs_sin


class HeadFinalLayer(nn.Module):
    """RMSNorm with a weight, per-token shift and scale from s (no gate), then a linear map to the output channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.RMSNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = as_tokens(self.adaLN_modulation(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTDH(nn.Module):
    """The DiT^DH velocity network on a [C, g, g] latent at patch 1 (the official setting)."""

    def __init__(self, *, input_size: int, in_channels: int, num_classes: int, hidden: int = 1152, depth: int = 28,
                 heads: int = 16, head_hidden: int = 2048, head_depth: int = 2, head_heads: int = 16,
                 mlp_ratio: float = 4.0, time_features: int = 256):
        super().__init__()
        if depth < 1 or head_depth < 1:
            raise ConfigError(f"DiT^DH needs at least one body and one head block, got {depth} + {head_depth}")
        self.in_channels = self.out_channels = in_channels
        self.num_classes, self.hidden_size, self.head_hidden = num_classes, hidden, head_hidden
        self.num_encoder_blocks, self.num_blocks = depth, depth + head_depth
        self.s_embedder = PatchEmbed(input_size, 1, in_channels, hidden)
        self.x_embedder = PatchEmbed(input_size, 1, in_channels, head_hidden)
        self.s_projector = nn.Linear(hidden, head_hidden) if hidden != head_hidden else nn.Identity()
        self.t_embedder = GaussianFourierTime(hidden, time_features)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        grid = self.s_embedder.grid
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, grid)[None], persistent=False)
        self.enc_feat_rope = EvaRoPE2D(hidden // heads, grid)
        self.dec_feat_rope = EvaRoPE2D(head_hidden // head_heads, grid)
        block = dict(mlp_ratio=mlp_ratio, norm="rmsnorm", norm_affine=True, mlp="swiglu", qk_norm=False,
                     qkv_bias=True, mlp_bias=True)
        self.blocks = nn.ModuleList([Block(hidden, heads, **block) for _ in range(depth)] +
                                    [Block(head_hidden, head_heads, **block) for _ in range(head_depth)])
        self.final_layer = HeadFinalLayer(head_hidden, in_channels)
        self.initialize_weights()

    @property
    def null_label(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        """The official initialisation: PyTorch's defaults, except the patch embeddings (xavier, zero bias), the label
        table and the time MLP's weights (N(0, 0.02)), and zeros in every adaLN and in the final linear map."""
        for embed in (self.x_embedder, self.s_embedder):
            w = embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for linear in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        return check_block_numbers(layers, self.num_blocks, f"body 1..{self.num_encoder_blocks}, "
                                                            f"head {self.num_encoder_blocks + 1}..{self.num_blocks}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_layers: Iterable[int] = (),
                stop_after: Optional[int] = None) -> BackboneOutput:
        wanted, hidden = set(self.check_layers(hidden_layers)), {}
        t_emb = self.t_embedder(t)
        c = F.silu(t_emb + self.y_embedder(y))
        s = self.s_embedder(x) + self.pos_embed.to(x.dtype)
        for k in range(self.num_encoder_blocks):
            s = self.blocks[k](s, c, self.enc_feat_rope)
            if k + 1 in wanted:
                hidden[k + 1] = s
            if stop_after is not None and k + 1 >= stop_after:
                return BackboneOutput(None, hidden)
        s = self.s_projector(F.silu(t_emb.unsqueeze(1) + s))
        tokens = self.x_embedder(x)
        for k in range(self.num_encoder_blocks, self.num_blocks):
            tokens = self.blocks[k](tokens, s, self.dec_feat_rope)
            if k + 1 in wanted:
                hidden[k + 1] = tokens
            if stop_after is not None and k + 1 >= stop_after:
                return BackboneOutput(None, hidden)
        return BackboneOutput(unpatchify(self.final_layer(tokens, s), 1, self.out_channels), hidden)


ROPE_TABLES = ("enc_feat_rope.", "dec_feat_rope.")


def official_ddt_head_state(official: dict) -> tuple[dict, list]:
    """The official `DiTwDDTHead` state dict as DiTDH's (the same names) and the keys left unused. Its fixed position
    table and RoPE tables are checked against the ones DiTDH computes and dropped (nothing is loaded for them)."""
    from zoo.backbones.official import check_position_table
    from zoo.errors import CheckpointError

    if "pos_embed" in official:
        check_position_table(official["pos_embed"])
    for prefix in ROPE_TABLES:
        if f"{prefix}freqs_cos" in official:
            cos = official[f"{prefix}freqs_cos"]
            rope = EvaRoPE2D(cos.shape[1], int(round(cos.shape[0] ** 0.5)))
            if (rope.freqs_cos - cos).abs().max() > 1e-5 or (rope.freqs_sin - official[f"{prefix}freqs_sin"]).abs().max() > 1e-5:
                raise CheckpointError(f"the checkpoint's {prefix}freqs_* are not the 2D RoPE tables of EVA's layout")
    fixed = lambda key: key == "pos_embed" or key.startswith(ROPE_TABLES)  # noqa: E731
    return {k: v for k, v in official.items() if not fixed(k)}, []
