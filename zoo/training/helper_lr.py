"""The learning-rate schedule of the helper networks the zoo trains for itself (judge, teacher, VAE)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int) -> float:
    """Fraction of the peak learning rate at `step`: linear warm-up over 5% of `steps`, then cosine to zero."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
