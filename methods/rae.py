"""rae: TODO one sentence on what the method changes. See docs/methods/rae.md.

    L = L_v + weight * L_rae        <- TODO: the method's equations, as in the paper

Everything else is vanilla flow matching (zoo/training/method.py): override only the hooks the method changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoo.training.method import Method, Term  # noqa: F401  (Term: what extra_losses returns)
from zoo.training.registry import register


@dataclass
class RaeConfig:
    """The method's options, at cfg.rae (defaults mirrored in configs/rae.yaml)."""
    depth: int = 8          # the block (counted from 1) whose output tokens the loss reads
    weight: float = 0.5     # the weight of the method's loss


@register
class Rae(Method):
    name = "rae"
    description = "rae: TODO one line for `zoo list`"
    config_class = RaeConfig
    # next to this file, so the method also works from another package (docs/extending.md)
    config_file = Path(__file__).resolve().parents[1] / "configs" / "rae.yaml"

    def hidden_layers(self) -> tuple:
        """The backbone returns the tokens after these blocks in `state.output.hidden`."""
        return (self.options.depth,)

    # TODO: trainable modules beside the backbone (a projector, a head) are EMA'd and saved with it:
    # def build_extras(self, backbone) -> dict:
    #     return {"projector": projector(backbone.hidden_size, 512, 256)}   # from zoo.teachers.alignment

    # TODO: frozen helpers (a teacher encoder) are loaded here, onto `device`, never saved:
    # def setup(self, device, training=True):
    #     super().setup(device, training)

    def extra_losses(self, model, state, ctx) -> dict:
        """The method's losses beside the flow loss, as {name: Term(value, weight)}."""
        hidden = state.output.hidden[self.options.depth]  # [B, N, C] tokens after block `depth`, noisy input
        # TODO: the method's loss on `hidden` (and state.x, state.t, state.targets, ctx.ema, ...), e.g.
        #   return {"rae": Term(my_loss(hidden, state.targets["tokens"]), self.options.weight)}
        del hidden
        return {}
