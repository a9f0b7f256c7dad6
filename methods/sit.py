"""Vanilla SiT (Ma et al., 2024): flow matching on the velocity, the baseline of every comparison.

Everything it does is the `Method` base's default: L = E || v_theta(x_t, t, y) - v* ||^2 with label
dropout for classifier-free guidance. See docs/methods/sit.md.
"""
from zoo.training.method import Method
from zoo.training.registry import register


@register
class SiT(Method):
    name = "sit"
    description = "vanilla SiT: velocity flow matching, no alignment (the baseline)"
