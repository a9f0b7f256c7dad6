"""Official state dicts -> the zoo's backbones, by renaming keys (and re-laying out a few tensors).

The zoo's SiT uses the official key names (willisma/SiT, REPA, REPA-E, SRA, LayerSync and ReDi all share
them), its time embedding and position table follow the official ones, so a SiT checkpoint maps almost
one to one; DDT and DeepFlow need renaming. Each function takes the official model's `state_dict()` and
returns (the zoo backbone's state dict, the official keys it did not use). Methods add their heads
(`Method.from_official`); the golden tests (tests/official/) load the official weights through them.
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



def ddt_state(official: dict, encoder_depth: int, channels: int) -> tuple[dict, list]:
    """The released DDT (decoupled_improved_dit.py) of `channels` latent channels -> zoo/backbones/ddt.py.

    Its patch embeddings are Linears over `unfold`ed patches (channel-major: c, i, j), the zoo's convolutions
    hold the same numbers; its output is `fold`ed from (c, i, j) rows, the zoo unpatchifies (i, j, c) rows;
    `blocks.{k}` are the encoder's for k < E, the decoder's after; SwiGLU's w1, w3 are the zoo's fused w12,
    its w2 the zoo's w3; adaLN modulations (no SiLU) sit at index 0 officially, 1 in the zoo.
    """
    state, used = {}, set()

    def put(new: str, old: str, value: Tensor | None = None) -> None:
        state[new] = official[old] if value is None else value
        used.add(old)

    for name in ("x_embedder", "s_embedder"):
        weight = official[f"{name}.proj.weight"]
        patch = round((weight.shape[1] // channels) ** 0.5)
        put(f"{name}.proj.weight", f"{name}.proj.weight", weight.reshape(weight.shape[0], channels, patch, patch))
        put(f"{name}.proj.bias", f"{name}.proj.bias")
    for key in official:
        if key.startswith(("t_embedder.", "y_embedder.")):
            put(key, key)
    weight, bias = official["final_layer.linear.weight"], official["final_layer.linear.bias"]
    pixels = weight.shape[0] // channels  # p * p
    put("final_layer.linear.weight", "final_layer.linear.weight",
        weight.reshape(channels, pixels, -1).transpose(0, 1).reshape(weight.shape))
    put("final_layer.linear.bias", "final_layer.linear.bias", bias.reshape(channels, pixels).T.flatten())
    for p in ("weight", "bias"):
        put(f"final_layer.adaLN_modulation.1.{p}", f"final_layer.adaLN_modulation.0.{p}")
    renamed = {"mlp.w2.weight": "mlp.w3.weight", "adaLN_modulation.0.weight": "adaLN_modulation.1.weight",
               "adaLN_modulation.0.bias": "adaLN_modulation.1.bias"}
    for k in sorted({int(key.split(".")[1]) for key in official if key.startswith("blocks.")}):
        old = f"blocks.{k}."
        new = f"encoder_blocks.{k}." if k < encoder_depth else f"decoder_blocks.{k - encoder_depth}."
        for key in [key for key in official if key.startswith(old)]:
            rest = key[len(old):]
            if rest not in ("mlp.w1.weight", "mlp.w3.weight"):
                put(new + renamed.get(rest, rest), key)
        put(new + "mlp.w12.weight", old + "mlp.w1.weight",
            torch.cat([official[old + "mlp.w1.weight"], official[old + "mlp.w3.weight"]]))
        used.add(old + "mlp.w3.weight")
    return state, [k for k in official if k not in used]


def deepflow_state(official: dict) -> tuple[dict, list]:
    """The official DeepFlow (models/deepflow.py) -> zoo/backbones/deepflow.py: the SiT part keeps its keys;
    `df_blocks` are the VeRA blocks (`acc_norm` the time-gap modulation and refining MLP, `cross_attention` with
    PyTorch's MultiheadAttention packing q, k, v in one matrix), `dt_embedder` the gap embedder, `final_layer.0`
    the shared intermediate head, `final_layer.1` the last branch's, `final_acc_layer` the acceleration head."""
    renames = {"dt_embedder.": "gap_embedder.", "final_layer.0.": "intermediate_head.", "final_layer.1.": "final_layer.",
               "final_acc_layer.": "acceleration_head."}
    inner = {"acc_norm.adaLN_modulation.": "gap_modulation.", "acc_norm.mlp.fc1.": "refine.0.",
             "acc_norm.mlp.fc2.": "refine.2.", "cross_attention.multihead_attn.out_proj.": "cross_attention.proj.",
             "cross_attention.layer_norm.": "cross_attention.norm.", "acc_mlp.": "acc_mlp."}
    state, used = {}, set()
    for key, value in official.items():
        new = None
        if key.startswith(("x_embedder.", "t_embedder.", "y_embedder.", "blocks.")):
            new = key
        for old, to in renames.items():
            if key.startswith(old):
                new = to + key[len(old):]
        if key.startswith("df_blocks."):
            _, j, rest = key.split(".", 2)
            for old, to in inner.items():
                if rest.startswith(old):
                    new = f"vera.{j}.{to}{rest[len(old):]}"
            if rest.startswith("cross_attention.multihead_attn.in_proj_"):  # [q; k; v] -> q and [k; v]
                kind = rest.rsplit("_", 1)[1]
                dim = value.shape[0] // 3
                state[f"vera.{j}.cross_attention.q.{kind}"] = value[:dim]
                state[f"vera.{j}.cross_attention.kv.{kind}"] = value[dim:]
                used.add(key)
                continue
        if new is not None:
            state[new] = value
            used.add(key)
    if "pos_embed" in official:
        check_position_table(official["pos_embed"])
        used.add("pos_embed")
    return state, [k for k in official if k not in used]
