"""Pieces every representation-aligning method shares: the MLP projector, the token-wise cosine, REPA's loss;
iREPA's convolutional projector and spatial normalisation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """REPA's projector h_phi: Linear -> SiLU -> Linear -> SiLU -> Linear (hidden -> 2048 -> 2048 -> D)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


def negative_cosine(projected: Tensor, target: Tensor) -> Tensor:
    """-mean over batch and tokens of cos(target[n], projected[n]), computed in fp32.

    The normalisation runs in fp32 whatever the autocast dtype: REPA's official code normalises in
    fp16 and its loss turns NaN after 70k-160k steps.
    """
    with torch.autocast(projected.device.type, enabled=False):
        p = F.normalize(projected.float(), dim=-1)
        y = F.normalize(target.float(), dim=-1)
        return -(p * y).sum(dim=-1).mean()


def projectors(hidden_size: int, projector_dim: int, dims) -> nn.ModuleList:
    """One projector per teacher encoder, from the backbone's width to each encoder's token width."""
    return nn.ModuleList(projector(hidden_size, projector_dim, d) for d in dims)


def repa_loss(hidden: Tensor, projectors, targets: list) -> Tensor:
    """L_REPA: the negative token-wise cosine of each projector's output to its encoder's tokens, averaged
    over encoders."""
    return torch.stack([negative_cosine(proj(hidden), y) for proj, y in zip(projectors, targets)]).mean()


def spatial_zscore(tokens: Tensor, alpha: float, eps: float = 1e-6) -> Tensor:
    """iREPA's spatial normalisation of a teacher's tokens [B, N, D], per image over its N tokens:
    (y - alpha * mean_n y) / (std_n y + eps), std with Bessel's correction (torch's default, as the official code).

    It removes (alpha of) what all tokens of an image share, so the target is the image's spatial structure
    rather than one global descriptor repeated at every position. Computed in fp32 whatever the tokens' dtype (a
    teacher run under bf16 autocast): a standard deviation over 256 tokens in bf16 keeps about two significant digits."""
    tokens = tokens.float()
    return (tokens - alpha * tokens.mean(dim=1, keepdim=True)) / (tokens.std(dim=1, keepdim=True) + eps)


class ConvProjector(nn.Module):
    """iREPA's projector: one k x k convolution over the token grid in place of REPA's token-wise MLP, so each
    projected token sees its neighbours. [B, N, C] -> [B, N, D], tokens in row-major grid order."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=kernel, padding=kernel // 2)

    def forward(self, hidden: Tensor) -> Tensor:
        batch, count, width = hidden.shape
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"the conv projector needs a square token grid, got {count} tokens")
        grid = hidden.transpose(1, 2).reshape(batch, width, side, side)
        return self.conv(grid).flatten(2).transpose(1, 2)
