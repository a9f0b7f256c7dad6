"""DeepFlow's branched SiT: deep supervision with VeRA blocks between branches (Shin et al., ICCV 2025).

The transformer's blocks are cut into K branches at `splits` (block numbers, from 1). After each
split a shared intermediate velocity head reads the branch's last tokens, and a VeRA block
("velocity refiner with acceleration") turns them into the hidden state entering the next branch:

  1. acceleration features  a = ACC_MLP(h)                          (4 linear layers, SiLU)
  2. refinement             r = MLP( LN([h ; a]) * (1 + scale) + shift ), shift/scale from an
                            embedding of the time gap t_{i+1} - t_i (LN without affine, modulation zero-init)
  3. cross-attention        h' = LN(q) + Attn(LN(q), LN(r)), q = the patch-embedded noisy input
A zero-initialised head, shared by every VeRA block, maps `a` to a latent-space acceleration.
The last branch has its own velocity head. Branch i is conditioned on its own time t_i; at
sampling every branch gets the same t (a zero gap), and only the final velocity is computed.

Built from the shared blocks of zoo/backbones/layers.py. Returns `BranchOutput`, a
`BackboneOutput` whose `velocity` is the final branch's, so samplers and methods that know
nothing of branches use it like SiT.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.backbones.layers import (BlockOptions, LabelEmbedder, PatchEmbed, RoPE2D, TimeEmbedding, init_weights,
                                  modulate, position_table, unpatchify)
from zoo.backbones.sit import BackboneOutput, check_block_numbers
from zoo.errors import ConfigError


@dataclass
class BranchOutput(BackboneOutput):
    """The final velocity and requested block outputs, plus what deep supervision needs (training only)."""
    velocities: list = field(default_factory=list)     # v_1..v_K, one per branch (when branch_times is given)
    accelerations: list = field(default_factory=list)  # a_1..a_{K-1}, one per VeRA block, latent space
    refined: list = field(default_factory=list)        # the K-1 post-VeRA hidden states [B, N, H]


def acceleration_mlp(dim: int, hidden: int) -> nn.Sequential:
    """ACC_MLP: dim -> P -> 2P -> P -> dim with SiLU, as in the official code."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * hidden), nn.SiLU(),
                         nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))


class CrossAttention(nn.Module):
    """Queries from one token set, keys/values from another; one affine LayerNorm for both (official code),
    and the residual is the normalised query."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        b, n, d = query.shape
        query, context = self.norm(query), self.norm(context)
        q = self.q(query).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return query + self.proj(out)


class VeRABlock(nn.Module):
    """Velocity refiner with acceleration: (branch tokens, input tokens, gap embedding) -> (a features, next hidden)."""

    def __init__(self, dim: int, heads: int, acc_dim: int, clamp_scale: bool = False):
        super().__init__()
        self.clamp_scale = clamp_scale   # the official `legacy_scaling`: the modulation's scale kept in [-5, 5]
        self.acc_mlp = acceleration_mlp(dim, acc_dim)
        self.norm = nn.LayerNorm(2 * dim, elementwise_affine=False, eps=1e-6)
        self.gap_modulation = nn.Sequential(nn.SiLU(), nn.Linear(2 * dim, 4 * dim))
        self.refine = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.cross_attention = CrossAttention(dim, heads)

    def forward(self, h: Tensor, query: Tensor, gap: Tensor) -> tuple[Tensor, Tensor]:
        a = self.acc_mlp(h)
        shift, scale = self.gap_modulation(gap).unsqueeze(1).chunk(2, dim=-1)
        if self.clamp_scale:
            scale = scale.clamp(-5.0, 5.0)
        refined = self.refine(modulate(self.norm(torch.cat([h, a], dim=-1)), shift, scale))
        return a, self.cross_attention(query, refined)


def check_splits(splits: Sequence[int], depth: int) -> tuple[int, ...]:
    splits = tuple(int(k) for k in splits)
    if not splits or list(splits) != sorted(set(splits)) or splits[0] < 1 or splits[-1] >= depth:
        raise ConfigError(f"deepflow.splits={list(splits)} must be one or more strictly increasing block numbers "
                          f"in 1..{depth - 1} (this backbone has {depth} blocks; a split after block k starts a "
                          f"new branch at block k + 1)")
    return splits


class DeepFlowSiT(nn.Module):
    def __init__(self, *, input_size: int, in_channels: int, num_classes: int, splits: Sequence[int],
                 patch: int = 2, hidden: int = 1152, depth: int = 24, heads: int = 16, acc_dim: int = 2048,
                 legacy_scaling: bool = False, rope: bool = False, rope_extent: float = 0.0, pos_embed: str = "sincos",
                 time: TimeEmbedding = TimeEmbedding(), init: str = "dit", **block):
        super().__init__()
        options = BlockOptions(**block)
        self.splits = check_splits(splits, depth)
        self.in_channels = self.out_channels = in_channels
        self.patch, self.depth, self.num_classes, self.hidden_size = patch, depth, num_classes, hidden
        self.time = time
        self.x_embedder = PatchEmbed(input_size, patch, in_channels, hidden)
        self.t_embedder = time.embedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.gap_embedder = time.embedder(2 * hidden)   # t_{i+1} - t_i, modulating the 2H-wide [h ; a]
        self.register_buffer("pos_embed", position_table(pos_embed, hidden, self.x_embedder.grid), persistent=False)
        self.rope = RoPE2D(hidden // heads, self.x_embedder.grid, extent=rope_extent) if rope else None
        self.blocks = nn.ModuleList(options.block(hidden, heads) for _ in range(depth))
        self.vera = nn.ModuleList(VeRABlock(hidden, heads, acc_dim, legacy_scaling) for _ in self.splits)
        self.intermediate_head = options.final_layer(hidden, patch, self.out_channels)  # shared by branches 1..K-1
        self.acceleration_head = options.final_layer(hidden, patch, self.out_channels)  # shared by every VeRA block
        self.final_layer = options.final_layer(hidden, patch, self.out_channels)
        init_weights(self, init)  # zero adaLN and zero heads: velocity and acceleration heads output 0 at init
        for vera in self.vera:
            nn.init.zeros_(vera.gap_modulation[-1].weight)
            nn.init.zeros_(vera.gap_modulation[-1].bias)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def num_branches(self) -> int:
        return len(self.splits) + 1

    def check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        return check_block_numbers(layers, self.depth)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_layers: Iterable[int] = (),
                stop_after: int | None = None, branch_times: Sequence[Tensor] | None = None) -> BranchOutput:
        """Velocity at (x_t, t, y) from the final branch; every branch at the same t (sampling).

        `branch_times=[t_2, ..., t_K]` (training) conditions branch i > 1 on its own time and also
        computes every branch's velocity and every VeRA block's acceleration (`BranchOutput`); `t`
        is the time of the input `x_t` and of branch 1. `hidden_layers` returns block outputs (a
        block that ends a branch: its output before the VeRA block; the post-VeRA states are
        `refined`). `stop_after=k` runs blocks 1..k only and returns no velocity.
        """
        deep = branch_times is not None
        times = [t, *branch_times] if deep else [t] * self.num_branches
        times = [self.time.network_time(s) for s in times]
        if len(times) != self.num_branches:
            raise ValueError(f"branch_times needs {self.num_branches - 1} times (branches 2..{self.num_branches}), "
                             f"got {len(times) - 1}")
        wanted = set(self.check_layers(hidden_layers))
        query = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # also the queries of every VeRA block
        label = self.y_embedder(y)
        conds = [self.t_embedder(s) + label for s in times] if deep else [self.t_embedder(t) + label] * len(times)
        out = BranchOutput(None)
        tokens, branch = query, 0
        for k, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, conds[branch], self.rope)
            if k in wanted:
                out.hidden[k] = tokens
            if stop_after is not None and k >= stop_after:
                return out
            if branch < len(self.splits) and k == self.splits[branch]:
                c = conds[branch]
                if deep:
                    out.velocities.append(self.time.velocity(self.to_image(self.intermediate_head(tokens, c))))
                a, tokens = self.vera[branch](tokens, query, self.gap_embedder(times[branch + 1] - times[branch]))
                if deep:  # d^2 x / dt^2 keeps its sign when t is reversed
                    out.accelerations.append(self.to_image(self.acceleration_head(a, c)))
                out.refined.append(tokens)
                branch += 1
        out.velocity = self.time.velocity(self.to_image(self.final_layer(tokens, conds[-1])))
        if deep:
            out.velocities.append(out.velocity)
        return out

    def to_image(self, tokens: Tensor) -> Tensor:
        return unpatchify(tokens, self.patch, self.out_channels)


def build_deepflow_sit(model_cfg, *, splits: Sequence[int], acc_dim: int, input_size: int, in_channels: int,
                       num_classes: int, legacy_scaling: bool = False) -> DeepFlowSiT:
    from zoo.backbones.sit import architecture, resolve_size

    return DeepFlowSiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, splits=splits,
                       acc_dim=acc_dim, legacy_scaling=legacy_scaling, patch=model_cfg.patch,
                       **architecture(model_cfg), **resolve_size(model_cfg))
