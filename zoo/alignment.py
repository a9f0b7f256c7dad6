"""Pieces every representation-aligning method shares: the MLP projector and the token-wise cosine loss."""
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
