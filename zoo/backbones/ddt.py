"""DDT: the decoupled diffusion transformer, a condition encoder and a velocity decoder (Wang et al., 2025).

    encoder   c = t_emb + y_emb;  h = EncBlocks(PatchEmbed_enc(x_t) + pos, c)     (per-sample adaLN)
              z = SiLU(t_emb + h)                                                  (one vector per token)
    decoder   v = Final(DecBlocks(PatchEmbed_dec(x_t) + pos, z), z)               (per-token adaLN from z)

The split is exposed as `encode_condition(x_t, t, y) -> z` and `decode_velocity(x_t, t, z) -> v`, which
is all that encoder sharing at sampling (methods/ddt_sharing.py) needs: z of one step can be reused by later ones.
`forward` runs both, so plain sampling and `decode_velocity(encode_condition(...))` are the same
computation. Blocks are the zoo's shared `Block` (RMSNorm, SwiGLU, QK-norm and 2D RoPE are its switches);
the decoder's blocks and final layer take z as it is, already through its SiLU. Blocks are numbered from 1
across the whole stack: 1..E are the encoder's (REPA aligns one of them), E+1..E+D the decoder's.

The constructor's defaults are the released DDT's: no absolute positions (2D RoPE over linspace(0, 16,
grid) only), RMSNorm with a weight in the blocks, LayerNorm without affine in the final layer, no bias
in attention's qkv and in SwiGLU, PyTorch's default initialisation inside the blocks, and t = 1 as data
with the time embedded at periods up to 10 (configs/ddt.yaml sets the same through `model.*`).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.backbones.layers import (BlockOptions, LabelEmbedder, PatchEmbed, RoPE2D, TimeEmbedding, init_weights,
                                  position_table, unpatchify)
from zoo.backbones.sit import (SIT_SIZES, BackboneOutput, architecture, check_block_numbers, count_parameters,
                               resolve_size)

# The released DDT's architecture (decoupled_improved_dit.py), the defaults of `DDT`.
OFFICIAL_BLOCKS = dict(norm="rmsnorm", norm_affine=True, final_norm="layernorm", mlp="swiglu", qk_norm=True,
                       qkv_bias=False, mlp_bias=False)
OFFICIAL_TIME = TimeEmbedding(scale=1.0, max_period=10.0, convention="data")
from zoo.errors import ConfigError


class DDT(nn.Module):
    def __init__(self, *, input_size: int, in_channels: int, num_classes: int, patch: int = 2, hidden: int = 1152,
                 encoder_depth: int = 22, decoder_depth: int = 6, heads: int = 16, rope: bool = True,
                 rope_extent: float = 16.0, pos_embed: str = "none", time: TimeEmbedding = OFFICIAL_TIME,
                 init: str = "ddt", **block):
        super().__init__()
        if encoder_depth < 1 or decoder_depth < 1:
            raise ConfigError(f"a DDT needs at least one encoder and one decoder block, got {encoder_depth} + "
                              f"{decoder_depth}")
        options = BlockOptions(**{**OFFICIAL_BLOCKS, **block})
        self.in_channels = self.out_channels = in_channels
        self.patch, self.num_classes, self.hidden_size = patch, num_classes, hidden
        self.encoder_depth, self.decoder_depth = encoder_depth, decoder_depth
        self.depth = encoder_depth + decoder_depth
        self.time = time
        self.s_embedder = PatchEmbed(input_size, patch, in_channels, hidden)   # the encoder's patch embedding
        self.x_embedder = PatchEmbed(input_size, patch, in_channels, hidden)   # the decoder's own
        self.t_embedder = time.embedder(hidden)                                # one, as in the released DDT
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.register_buffer("pos_embed", position_table(pos_embed, hidden, self.x_embedder.grid), persistent=False)
        self.rope = RoPE2D(hidden // heads, self.x_embedder.grid, extent=rope_extent) if rope else None
        self.encoder_blocks = nn.ModuleList(options.block(hidden, heads) for _ in range(encoder_depth))
        self.decoder_blocks = nn.ModuleList(options.block(hidden, heads, condition_silu=False)
                                            for _ in range(decoder_depth))
        self.final_layer = options.final_layer(hidden, patch, self.out_channels, condition_silu=False)
        init_weights(self, init)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        return check_block_numbers(layers, self.depth, f"encoder 1..{self.encoder_depth}, "
                                                       f"decoder {self.encoder_depth + 1}..{self.depth}")

    # ------------------------------------------------------------------ the split
    def _encode(self, x, t, y, wanted=frozenset(), stop_after=None, hidden=None):
        """(z, hidden): z is None when `stop_after` stops inside the encoder."""
        t_emb = self.t_embedder(self.time.network_time(t))
        c = t_emb + self.y_embedder(y)
        tokens = self.s_embedder(x) + self.pos_embed.to(x.dtype)
        for k, block in enumerate(self.encoder_blocks, start=1):
            tokens = block(tokens, c, self.rope)
            if k in wanted:
                hidden[k] = tokens
            if stop_after is not None and k >= stop_after:
                return None, hidden
        return F.silu(t_emb.unsqueeze(1) + tokens), hidden

    def _decode(self, x, z, wanted=frozenset(), stop_after=None, hidden=None):
        """The velocity, or None when `stop_after` stops inside the decoder."""
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        for k, block in enumerate(self.decoder_blocks, start=self.encoder_depth + 1):
            tokens = block(tokens, z, self.rope)
            if k in wanted:
                hidden[k] = tokens
            if stop_after is not None and k >= stop_after:
                return None
        return self.time.velocity(unpatchify(self.final_layer(tokens, z), self.patch, self.out_channels))

    def encode_condition(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """z = SiLU(t_emb + Enc(x_t, t, y)): the per-token self-condition [B, N, C], the part sharing reuses."""
        return self._encode(x, t, y, hidden={})[0]

    def decode_velocity(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """v = Dec(x_t, z). `t` is unused: z already carries the time of the step it was computed at."""
        return self._decode(x, z)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_layers: Iterable[int] = (),
                stop_after: Optional[int] = None) -> BackboneOutput:
        """Velocity at (x_t, t, y) with the encoder's fresh z; `hidden_layers` selects block outputs to return."""
        wanted = set(self.check_layers(hidden_layers))
        z, hidden = self._encode(x, t, y, wanted, stop_after, {})
        if z is None:
            return BackboneOutput(None, hidden)
        return BackboneOutput(self._decode(x, z, wanted, stop_after, hidden), hidden)


def split_depth(model_cfg, decoder_depth: int) -> tuple[dict, int, int]:
    """(width/heads, encoder blocks, decoder blocks): `model.size` gives the total depth, split E + D."""
    dims = resolve_size(model_cfg)
    total = dims.pop("depth")
    if not 1 <= decoder_depth < total:
        raise ConfigError(f"ddt.decoder_depth={decoder_depth} must be in 1..{total - 1}: model.depth is {total} "
                          f"blocks in all, encoder + decoder")
    return dims, total - decoder_depth, decoder_depth


def build_ddt(model_cfg, *, decoder_depth: int, input_size: int, in_channels: int, num_classes: int) -> DDT:
    dims, enc, dec = split_depth(model_cfg, decoder_depth)
    return DDT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, patch=model_cfg.patch,
               encoder_depth=enc, decoder_depth=dec, **architecture(model_cfg), **dims)


def ddt_parameter_count(size: str = "XL", decoder_depth: int = 6, patch: int = 2, input_size: int = 32,
                        in_channels: int = 4, num_classes: int = 1000, **block_options) -> int:
    """Parameters of a DDT whose total depth is SiT's `size` (XL: 22 + 6), counted on the meta device; the
    released architecture unless `block_options` say otherwise."""
    dims = dict(SIT_SIZES[size])
    total = dims.pop("depth")
    with torch.device("meta"):
        model = DDT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, patch=patch,
                    encoder_depth=total - decoder_depth, decoder_depth=decoder_depth, **dims, **block_options)
    return count_parameters(model)
