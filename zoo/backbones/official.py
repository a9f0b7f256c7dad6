"""Official state dicts -> the zoo's backbones, by renaming keys (and re-laying out a few tensors).

The zoo's SiT uses the official key names (willisma/SiT, REPA, REPA-E, SRA, LayerSync and ReDi all share
them), its time embedding and position table follow the official ones, so a SiT checkpoint maps almost
one to one; DDT and DeepFlow need renaming. Each function takes the official model's `state_dict()` and
returns (the zoo backbone's state dict, the official keys it did not use). Methods add their heads
(`Method.from_official`); `zoo import` and the golden tests (tests/official/) use the same functions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from zoo.backbones.layers import sincos_pos_embed_2d
from zoo.errors import CheckpointError


def check_position_table(table: Tensor) -> None:
    """An official fixed `pos_embed` [1, N, D] must be the zoo's sin-cos table: nothing else is loaded for it."""
    n, dim = table.shape[-2:]
    grid = round(n ** 0.5)
    expected = sincos_pos_embed_2d(dim, grid)
    if grid * grid != n or not torch.allclose(table.reshape(n, dim).float(), expected, atol=1e-5):
        raise CheckpointError(f"the checkpoint's pos_embed [{n}, {dim}] is not the 2D sin-cos table of a "
                              f"{grid}x{grid} grid, which this backbone uses")


def drop_sigma(weight: Tensor, bias: Tensor, patch: int, channels: int) -> tuple[Tensor, Tensor]:
    """learn_sigma's final linear predicts 2C channels per pixel of a patch, laid out (p, q, c); keep c < C, the
    velocity (the official forward discards the rest)."""
    rows = weight.shape[0]
    if rows == patch * patch * channels:
        return weight, bias
    if rows != 2 * patch * patch * channels:
        raise CheckpointError(f"final_layer.linear has {rows} outputs; a patch-{patch} model of {channels} "
                              f"channels has {patch * patch * channels} (or twice that with learn_sigma)")
    keep = weight.reshape(patch * patch, 2 * channels, -1)[:, :channels]
    return keep.reshape(patch * patch * channels, -1), bias.reshape(patch * patch, 2 * channels)[:, :channels].flatten()


def sit_state(official: dict, channels: int) -> tuple[dict, list]:
    """A SiT of willisma/SiT, REPA and their forks: the same keys; `pos_embed` checked and dropped, learn_sigma's
    half of the output layer dropped. Keys outside the backbone (projectors, heads, BN) are returned unused."""
    prefixes = ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.", "final_layer.")
    state = {k: v for k, v in official.items() if k.startswith(prefixes)}
    if "pos_embed" in official:
        check_position_table(official["pos_embed"])
    patch = official["x_embedder.proj.weight"].shape[-1]
    state["final_layer.linear.weight"], state["final_layer.linear.bias"] = drop_sigma(
        official["final_layer.linear.weight"], official["final_layer.linear.bias"], patch, channels)
    return state, [k for k in official if k not in state and k != "pos_embed"]


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def take(official: dict, old: str, new: str) -> tuple[dict, list]:
    """The keys under `old` renamed to be under `new`, and the other keys."""
    mapped = {new + k[len(old):]: v for k, v in official.items() if k.startswith(old)}
    return mapped, [k for k in official if not k.startswith(old)]
