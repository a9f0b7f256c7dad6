"""A perceptual distance that needs no download: LPIPS's form on the built-in teacher's features.

LPIPS (zoo/latents/lpips.py) compares VGG16 features of two images after normalising each position's feature
vector to unit length. VGG's weights cannot be fetched on an offline machine, and an ImageNet network knows
little of 16-32 px procedural shapes, so the built-in VAE and REPA-E's CPU presets use the zoo's own built-in
teacher (zoo/teachers/builtin.py: a small ViT trained self-supervised on the run's data, never the judge) in VGG's
place:

    d(x, x0) = 1/L sum_l mean_positions || phi_l(x) / |phi_l(x)| - phi_l(x0) / |phi_l(x0)| ||^2

over the teacher's feature maps phi_l: each ReLU of its convolutional stem (full and half resolution, where
edges and textures live) and each transformer layer's tokens (where shapes are). The layers weigh the same
(LPIPS's learned per-channel weights need human judgements to fit; this is LPIPS's "baseline" form). The teacher
is colour-invariant by training, so this term sees structure and the L1 term beside it sees colour.
"""
from __future__ import annotations

from torch import Tensor, nn

from zoo.errors import ConfigError

PERCEPTUAL_NETWORKS = ("auto", "builtin", "lpips", "none")


def _unit(features: Tensor, dim: int) -> Tensor:
    return features / (features.pow(2).sum(dim, keepdim=True).sqrt() + 1e-10)


class TeacherPerceptual(nn.Module):
    """d(x, x0) per image [B] on a frozen built-in teacher (`TeacherViT`); gradients reach both images only."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.layers = sum(isinstance(m, nn.ReLU) for m in teacher.embed) + len(teacher.blocks.layers)

    def train(self, mode: bool = True) -> "TeacherPerceptual":
        return super().train(False)  # BatchNorm keeps its running statistics whatever the owner's mode

    def feature_maps(self, images: Tensor) -> list[tuple[Tensor, int]]:
        """[(features, channel dim)]: the stem's ReLU outputs [B, C, H, W], then each layer's tokens [B, N, D]."""
        out, h = [], images
        for layer in self.teacher.embed:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                out.append((h, 1))
        tokens = h.flatten(2).transpose(1, 2) + self.teacher.pos
        for block in self.teacher.blocks.layers:
            tokens = block(tokens)
            out.append((tokens, 2))
        return out

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        total = 0.0
        for (a, dim), (b, _) in zip(self.feature_maps(x), self.feature_maps(x0)):
            diff = (_unit(a, dim) - _unit(b, dim)).pow(2).sum(dim)          # [B, H, W] or [B, N]
            total = total + diff.flatten(1).mean(1)
        return total / self.layers


def builtin_perceptual(cfg, progress: bool = True) -> TeacherPerceptual:
    """The distance on the run's built-in teacher (cfg.teacher; trained once and cached, like any aligning method's)."""
    from zoo.teachers.builtin import ensure_teacher, load_teacher

    net, _ = load_teacher(ensure_teacher(cfg, progress))
    return TeacherPerceptual(net)


def check_perceptual(choice: str, key: str) -> None:
    if choice not in PERCEPTUAL_NETWORKS:
        raise ConfigError(f"{key}={choice!r}; valid: {', '.join(PERCEPTUAL_NETWORKS)}")


def perceptual_network(choice: str, lpips_weights: str, cfg, owner: str):
    """The network of a perceptual term (frozen, eval mode), or None for `none`: LPIPS-VGG from `lpips_weights`
    (`lpips`, the papers'), the built-in teacher's stand-in (`builtin`), or `auto`: lpips when weights are given."""
    if choice == "auto":
        choice = "lpips" if lpips_weights else "builtin"
    if choice == "none":
        return None
    if choice == "lpips":
        if not lpips_weights:
            raise ConfigError(f"{owner}.perceptual=lpips needs {owner}.lpips_weights: a folder with LPIPS-VGG's "
                              f"weights (or {owner}.perceptual=builtin: the built-in teacher, no download)")
        from zoo.latents.lpips import load_lpips

        return load_lpips(lpips_weights)
    return builtin_perceptual(cfg)
