"""Transformer building blocks shared by every backbone in the zoo.

The block options that later methods need (RMSNorm, SwiGLU, QK-norm, 2D RoPE, biases, norm weights)
are switches on these classes, not copies of them (`BlockOptions`). Modulation tensors may be per
sample ([B, C]) or per token ([B, N, C], DDT's decoder); both broadcast the same way. The time
embedding (`TimeEmbedding`) and the position table follow the official code of SiT, REPA and DDT,
so that their weights load by renaming keys (zoo/backbones/official.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def as_tokens(mod: Tensor) -> Tensor:
    """[B, C] -> [B, 1, C] so that per-sample and per-token modulation broadcast alike."""
    return mod.unsqueeze(1) if mod.dim() == 2 else mod


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
TIME_CONVENTIONS = ("noise", "data")
POS_EMBEDS = ("sincos", "none")
INITS = ("dit", "ddt")


@dataclass(frozen=True)
class BlockOptions:
    """The switches every transformer block of a backbone shares (the `model.*` block keys)."""
    mlp_ratio: float = 4.0
    norm: str = "layernorm"     # the blocks' two norms: layernorm | rmsnorm
    norm_affine: bool = False   # a learned scale in the blocks' norms (DDT: RMSNorm with a weight)
    mlp: str = "gelu"           # gelu | swiglu
    qk_norm: bool = False
    qkv_bias: bool = True       # DDT's attention and SwiGLU have no biases
    mlp_bias: bool = True
    final_norm: str = ""        # the final layer's norm (never affine); "": the blocks' `norm`

    def __post_init__(self):
        for key, value, valid in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                  ("final_norm", self.final_norm or self.norm, NORMS)):
            if value not in valid:
                raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")

    def block(self, dim: int, heads: int, condition_silu: bool = True) -> "Block":
        kwargs = {k: v for k, v in asdict(self).items() if k != "final_norm"}
        return Block(dim, heads, condition_silu=condition_silu, **kwargs)

    def final_layer(self, dim: int, patch: int, out_channels: int, condition_silu: bool = True) -> "FinalLayer":
        return FinalLayer(dim, patch, out_channels, self.final_norm or self.norm, condition_silu)


@dataclass(frozen=True)
class TimeEmbedding:
    """How a backbone sees t (the `model.time_*` keys).

    The zoo's samplers and losses use t = 1 as noise. `convention="data"` is for networks written with
    t = 1 as data (SiT's and DDT's own code): the network is fed 1 - t and predicts the velocity towards
    the data, which the backbone negates, so official weights of such a network work unchanged.
    The sinusoid is of `scale * t` with periods up to `max_period`: SiT, REPA and DeepFlow use 1 and
    10000, DDT 1 and 10, DiT's diffusion steps 1000 and 10000 (the zoo's CPU presets).
    """
    scale: float = 1000.0
    max_period: float = 10000.0
    convention: str = "noise"   # noise | data

    def __post_init__(self):
        if self.convention not in TIME_CONVENTIONS:
            raise ValueError(f"unknown time convention {self.convention!r}; valid: {', '.join(TIME_CONVENTIONS)}")

    def network_time(self, t: Tensor) -> Tensor:
        """The time the network is fed."""
        return 1 - t if self.convention == "data" else t

    def velocity(self, v: Tensor) -> Tensor:
        """The network's output as the zoo's velocity d x_t / d t (t = 1 is noise)."""
        return -v if self.convention == "data" else v

    def embedder(self, hidden: int) -> "TimestepEmbedder":
        return TimestepEmbedder(hidden, scale=self.scale, max_period=self.max_period)


def make_norm(kind: str, dim: int, affine: bool = False) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, elementwise_affine=affine, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")


class TimestepEmbedder(nn.Module):
    """Sinusoidal features [cos, sin] of scale * t at periods up to max_period, then a 2-layer MLP (DiT/SiT).

    With scale 1 (SiT, REPA, DDT) t in [0, 1] leaves most of the 128 frequencies nearly constant; DiT's
    scale 1000 spreads them over the unit interval (the zoo's CPU presets).
    """

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.scale, self.max_period = freq_dim, scale, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def frequencies(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.float() * self.scale)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, index num_classes, for the null (unconditional) label."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, row-major over the patch grid."""

    def __init__(self, input_size: int, patch: int, in_channels: int, hidden: int):
        super().__init__()
        if input_size % patch:
            raise ConfigError(f"model.patch={patch} does not divide the diffusion state's size {input_size} "
                              f"(the image, or its VAE latent): choose a divisor of {input_size}")
        self.patch, self.grid = patch, input_size // patch
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sin-cos position embedding [grid*grid, dim] for row-major tokens (MAE/DiT/SiT/REPA).

    The first dim/2 channels encode the token's column, the last dim/2 its row, each as
    [sin(pos * omega), cos(pos * omega)] with omega = 10000^(-k / (dim/4)): the official channel order,
    so an official `pos_embed` equals this table.
    """
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float()


def position_table(kind: str, dim: int, grid: int) -> Tensor:
    """[1, grid*grid, dim]: the sin-cos table, or zeros for a backbone without absolute positions (DDT)."""
    if kind not in POS_EMBEDS:
        raise ValueError(f"unknown position embedding {kind!r}; valid: {', '.join(POS_EMBEDS)}")
    return (sincos_pos_embed_2d(dim, grid) if kind == "sincos" else torch.zeros(grid * grid, dim))[None]


class RoPE2D(nn.Module):
    """2D rotary position embedding on consecutive channel pairs: pair 2i rotates with the column, pair
    2i + 1 with the row, both at frequency theta^(-4i / head_dim) (DDT's layout).

    Positions are the integers 0..grid-1, or with `extent` > 0 `grid` points spread evenly over
    [0, extent] (DDT: `linspace(0, 16, grid)` at every resolution).
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0, extent: float = 0.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        pos = torch.linspace(0, extent, grid) if extent > 0 else torch.arange(grid, dtype=torch.float32)
        rows, cols = torch.meshgrid(pos, pos, indexing="ij")
        angles = torch.stack([cols.reshape(-1, 1) * freqs, rows.reshape(-1, 1) * freqs], dim=-1)
        angles = angles.reshape(grid * grid, 2 * quarter)  # [N, head_dim/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, heads, N, head_dim]; rotates consecutive channel pairs."""
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = self.cos.to(x.device), self.sin.to(x.device)
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return out.type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch's SDPA (flash / memory-efficient kernels on GPU)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope: RoPE2D | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU (tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """SiLU-gated MLP with 2/3 of the hidden width, so its size matches the GELU MLP (LightningDiT, DDT)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def make_mlp(kind: str, dim: int, hidden: int, bias: bool = True) -> nn.Module:
    if kind == "gelu":
        return Mlp(dim, hidden, bias)
    if kind == "swiglu":
        return SwiGLU(dim, hidden, bias)
    raise ValueError(f"unknown mlp {kind!r}; valid: gelu, swiglu")


def modulation(dim: int, chunks: int, silu: bool = True) -> nn.Sequential:
    """adaLN's map from the condition to `chunks` modulation vectors: SiLU, then Linear (DiT).

    `silu=False` leaves out the SiLU for a condition that arrives already activated (DDT's
    z = SiLU(t_emb + encoder tokens)); an Identity keeps the state-dict layout of the DiT version.
    """
    return nn.Sequential(nn.SiLU() if silu else nn.Identity(), nn.Linear(dim, chunks * dim))


class Block(nn.Module):
    """Transformer block with adaLN-Zero conditioning; `c` is [B, C] or per token [B, N, C]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, norm: str = "layernorm",
                 mlp: str = "gelu", qk_norm: bool = False, condition_silu: bool = True, norm_affine: bool = False,
                 qkv_bias: bool = True, mlp_bias: bool = True):
        super().__init__()
        self.norm1, self.norm2 = make_norm(norm, dim, norm_affine), make_norm(norm, dim, norm_affine)
        self.attn = Attention(dim, heads, qk_norm, qkv_bias)
        self.mlp = make_mlp(mlp, dim, int(dim * mlp_ratio), mlp_bias)
        self.adaLN_modulation = modulation(dim, 6, condition_silu)

    def forward(self, x: Tensor, c: Tensor, rope: RoPE2D | None = None) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = as_tokens(self.adaLN_modulation(c)).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from tokens to patches of the output."""

    def __init__(self, dim: int, patch: int, out_channels: int, norm: str = "layernorm", condition_silu: bool = True):
        super().__init__()
        self.norm_final = make_norm(norm, dim)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = modulation(dim, 2, condition_silu)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = as_tokens(self.adaLN_modulation(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(tokens: Tensor, patch: int, channels: int) -> Tensor:
    """[B, N, p*p*C] -> [B, C, H, W] for a square grid."""
    b, n, _ = tokens.shape
    g = int(round(n ** 0.5))
    x = tokens.reshape(b, g, g, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, g * patch, g * patch)


def init_weights(module: nn.Module, scheme: str = "dit") -> None:
    """A backbone's initialisation (`model.init`).

    dit: DiT's -- xavier linears and zero biases everywhere, then the patch embeddings xavier, the label
         table and time MLP weights N(0, 0.02), the adaLN modulation of every block and the output layer zero.
    ddt: DDT's official -- only the patch embeddings, the label table, the time MLP weights and the output
         layer as above; everything else keeps PyTorch's default initialisation, the blocks' adaLN included.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; valid: {', '.join(INITS)}")
    if scheme == "dit":
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, PatchEmbed):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)
        elif isinstance(m, LabelEmbedder):
            nn.init.normal_(m.embedding_table.weight, std=0.02)
        elif isinstance(m, TimestepEmbedder):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)
        elif isinstance(m, Block) and scheme == "dit":
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        elif isinstance(m, FinalLayer):
            for linear in (m.adaLN_modulation[-1], m.linear):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
