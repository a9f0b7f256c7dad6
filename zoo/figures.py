"""Image grids and plots written as PNG files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zoo.training.checkpoint import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C] (the layout of ADM's .npz files)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path, nrow: int, padding: int = 2, scale: int = 1) -> Path:
    """Tile images row by row (`nrow` per row) on a white background and write a PNG."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y:y + h, x:x + w] = arr[i]
    image = Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return path


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path, out_path) -> Path | None:
    """One curve per logged loss against the step (log scale), from a run's metrics.jsonl."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"step", "lr", "steps_per_sec", "elapsed", "grad_norm"}
    names = sorted({k for r in rows for k in r if k not in skip and not k.startswith("grad_norm")})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        pts = [(r["step"], r[name]) for r in rows if name in r]
        ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(r.get(n, 1) > 0 for r in rows for n in names):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return Path(out_path)
