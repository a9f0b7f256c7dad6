"""Pieces every representation-aligning method shares: the MLP projector, the token-wise cosine, REPA's loss."""
from __future__ import annotations

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
