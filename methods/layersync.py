"""LayerSync (Haghighi, van Delft et al., 2025): a shallow block aligns to a deeper block of the same model.
See docs/methods/layersync.md.

    L = L_v + lambda * L_sync,   L_sync = - 1/N sum_n cos( h_s[n], sg(h_d[n]) )

`h_s` and `h_d` are the tokens after the shallow block s and the deep block d (s < d) of one forward
on the noisy input; `sg` stops the gradient, so the deep block is the teacher and only the shallow one
(and everything before it) is pulled. No projector, no external encoder, no second forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoo.teachers.alignment import negative_cosine
from zoo.errors import ConfigError
from zoo.training.method import Method, Term
from zoo.training.registry import register


@dataclass
class LayerSyncConfig:
    """The method's options, at cfg.layersync (defaults mirrored in configs/layersync.yaml)."""
    shallow_block: int = 8      # s: the student block (counted from 1); 8 of 28 in the paper's SiT-XL
    deep_block: int = 16        # d: the teacher block, detached; 16 of 28
    weight: float = 0.2         # lambda


@register
class LayerSync(Method):
    name = "layersync"
    description = "LayerSync: a shallow block aligns to a detached deeper block of the same model (negative cosine)"
    config_class = LayerSyncConfig
    # next to this file, so the method also works from another package (docs/extending.md)
    config_file = Path(__file__).resolve().parents[1] / "configs" / "layersync.yaml"

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        o = self.options
        if not o.shallow_block < o.deep_block:
            raise ConfigError(f"layersync.shallow_block ({o.shallow_block}) must come before "
                              f"layersync.deep_block ({o.deep_block})")

    def hidden_layers(self) -> tuple:
        return (self.options.shallow_block, self.options.deep_block)

    def used(self) -> dict:
        return {**super().used(), "teacher": f"own block {self.options.deep_block}, detached"}

    def extra_losses(self, model, state, ctx) -> dict:
        o = self.options
        hidden = state.output.hidden
        return {"layersync": Term(layersync_loss(hidden[o.shallow_block], hidden[o.deep_block]), o.weight)}


def layersync_loss(shallow, deep):
    """L_sync: negative token-wise cosine of the shallow tokens to the detached deep tokens (fp32)."""
    return negative_cosine(shallow, deep.detach())
