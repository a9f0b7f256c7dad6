"""The built-in data: procedural class-conditional images, generated deterministically from a seed.

Ten classes whose identity needs global structure -- the outline of a shape, filled or hollow,
a texture inside it, or the layout of two parts -- while position, size, rotation and colours are
random nuisances, so no single pixel or colour gives the class away. Images are rendered with
anti-aliased signed distance functions, one class at a time with array operations, so 20,000
images take a second or two and nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import torch

CLASSES = ("disc", "ring", "square", "square outline", "triangle", "triangle outline", "plus",
           "two discs", "striped disc", "checkered square")
OUTLINE = 0.09  # half-thickness of outlines, in units where the image spans [-1, 1]
RADIUS = (0.35, 0.55)  # the shapes' size range at scale 1, same units
JITTER = 0.35          # how far the centre moves from the middle at scale 1


def _rotate(px, py, cx, cy, angle):
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    dx, dy = px - cx[:, None, None], py - cy[:, None, None]
    return c * dx + s * dy, -s * dx + c * dy


def _signed_distance(kind: int, qx, qy, r):
    """Signed distance (negative inside) of class `kind`, in the shape's rotated frame."""
    r = r[:, None, None]

    def disc():
        return np.hypot(qx, qy) - r

    def square():
        return np.maximum(np.abs(qx), np.abs(qy)) - 0.85 * r

    def triangle():  # equilateral, inradius r / 2: the largest of three half-plane distances
        normals = [np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
        return np.max([np.cos(a) * qx + np.sin(a) * qy for a in normals], axis=0) - 0.5 * r

    if kind in (0, 8):
        return disc()
    if kind == 1:
        return np.abs(disc()) - OUTLINE
    if kind in (2, 9):
        return square()
    if kind == 3:
        return np.abs(square()) - OUTLINE
    if kind == 4:
        return triangle()
    if kind == 5:
        return np.abs(triangle()) - OUTLINE
    if kind == 6:
        arm, half = r, 0.3 * r
        return np.minimum(np.maximum(np.abs(qx) - arm, np.abs(qy) - half), np.maximum(np.abs(qx) - half, np.abs(qy) - arm))
    if kind == 7:
        return np.minimum(np.hypot(qx - 0.6 * r, qy), np.hypot(qx + 0.6 * r, qy)) - 0.45 * r
    raise ValueError(kind)


def _texture(kind: int, qx, qy, r):
    """1 where the second colour shows inside textured classes, else 0."""
    r = r[:, None, None]
    if kind == 8:  # three stripes across the disc
        return (np.sin(qy / r * 1.5 * np.pi) > 0).astype(np.float32)
    if kind == 9:  # a 4 x 4 checkerboard over the square
        cell = 0.425 * r
        return ((np.floor(qx / cell) + np.floor(qy / cell)) % 2).astype(np.float32)
    return np.zeros_like(qx, dtype=np.float32)


def _contrasting_colours(rng, n, other, min_gap=0.3):
    """Random RGB colours whose luminance differs from `other`'s by at least `min_gap`."""
    weights = np.array([0.299, 0.587, 0.114])
    colours = rng.random((n, 3))
    for _ in range(100):
        bad = np.abs((colours - other) @ weights) < min_gap
        if not bad.any():
            break
        colours[bad] = rng.random((bad.sum(), 3))
    return colours


def placement(scale: float) -> tuple[float, float, float]:
    """(smallest radius, largest radius, centre jitter) for shapes `scale` times the default size. Larger
    shapes move less, keeping the farthest a shape reaches (jitter + 1.1 x radius) where it is at scale 1."""
    if scale <= 0:
        raise ValueError(f"the shapes' scale must be positive, got {scale}")
    low, high = RADIUS[0] * scale, RADIUS[1] * scale
    jitter = JITTER + 1.1 * (RADIUS[1] - high)
    if jitter < 0:
        raise ValueError(f"shapes {scale} times the default size do not fit in the image (largest scale: "
                         f"{(JITTER / 1.1 + RADIUS[1]) / RADIUS[1]:.2f})")
    return low, high, jitter


def render_class(kind: int, n: int, size: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """n images of class `kind` as float32 [n, 3, size, size] in [0, 1], shapes `scale` times the default size."""
    low, high, jitter = placement(scale)
    coords = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
    px, py = np.meshgrid(coords, coords, indexing="xy")
    cx, cy = rng.uniform(-jitter, jitter, n).astype(np.float32), rng.uniform(-jitter, jitter, n).astype(np.float32)
    r = rng.uniform(low, high, n).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    qx, qy = _rotate(px, py, cx, cy, angle)
    # anti-aliased coverage: distance in pixels, blended over one pixel
    alpha = np.clip(0.5 - _signed_distance(kind, qx, qy, r) * size / 2, 0, 1)[:, None]
    background = rng.random((n, 3), dtype=np.float32)
    foreground = _contrasting_colours(rng, n, background).astype(np.float32)
    second = _contrasting_colours(rng, n, foreground).astype(np.float32)
    tex = _texture(kind, qx, qy, r)[:, None]
    fill = foreground[:, :, None, None] * (1 - tex) + second[:, :, None, None] * tex
    image = background[:, :, None, None] * (1 - alpha) + fill * alpha
    image += 0.02 * rng.standard_normal(image.shape, dtype=np.float32)  # light sensor-like noise
    return np.clip(image, 0, 1)


def generate_shapes(num_images: int, seed: int, num_classes: int = 10, size: int = 32, scale: float = 1.0):
    """Deterministic (images uint8 [N, 3, size, size], labels int64 [N]), classes balanced and interleaved;
    `scale` multiplies the shapes' size (see `placement`)."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"the shapes data has 1..{len(CLASSES)} classes, asked for {num_classes}")
    placement(scale)  # fails before any work when the shapes would not fit
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % num_classes
    images = np.empty((num_images, 3, size, size), dtype=np.uint8)
    for kind in range(num_classes):
        where = np.flatnonzero(labels == kind)
        images[where] = np.round(render_class(kind, len(where), size, rng, scale) * 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
