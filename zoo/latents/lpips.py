"""LPIPS (Zhang et al., 2018), VGG variant v0.1, from local weights: the perceptual term of VAE training.

d(x, x0) = sum_l mean_hw || w_l * (phi_l(x) / |phi_l(x)| - phi_l(x0) / |phi_l(x0)|) ||^2 over VGG16's
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, with learned per-channel weights w_l. Nothing is
downloaded: a folder must hold torchvision's `vgg16-397923af.pth` and LPIPS's `vgg.pth`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from zoo.errors import MissingWeightsError

VGG_FILE, VGG_URL = "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
SLICES = (4, 9, 16, 23, 30)           # ends of VGG16's feature slices: relu1_2 ... relu5_3
CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        self.slices = nn.ModuleList(features[a:b] for a, b in zip((0, *SLICES[:-1]), SLICES))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        """Images in [-1, 1] -> distance per image [B]; gradients flow to both inputs, never to the weights."""
        h, h0 = (x - self.shift) / self.scale, (x0 - self.shift) / self.scale
        total = 0.0
        for block, lin in zip(self.slices, self.lins):
            h, h0 = block(h), block(h0)
            unit = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            unit0 = h0 / (h0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((unit - unit0) ** 2).mean(dim=(2, 3))
        return total.flatten()


def load_lpips(folder) -> LPIPS:
    """LPIPS-VGG from `folder`/vgg16-397923af.pth and `folder`/vgg.pth, frozen and in eval mode."""
    folder = Path(folder).expanduser()
    for name, url in ((VGG_FILE, VGG_URL), (LIN_FILE, LIN_URL)):
        if not (folder / name).exists():
            raise MissingWeightsError(f"LPIPS weights file {name}", folder / name, f"curl -L -o {name} {url}")
    net = LPIPS()
    vgg = torch.load(folder / VGG_FILE, map_location="cpu", weights_only=True)
    net.slices.load_state_dict(_slice_state(vgg))
    lin = torch.load(folder / LIN_FILE, map_location="cpu", weights_only=True)
    net.lins.load_state_dict({f"{i}.weight": lin[f"lin{i}.model.1.weight"] for i in range(len(CHANNELS))})
    return net.eval().requires_grad_(False)


def _slice_state(vgg_state: dict) -> dict:
    """torchvision's `features.<n>.<param>` -> `<slice>.<n>.<param>` (slices of a Sequential keep its indices)."""
    out = {}
    for key, value in vgg_state.items():
        if key.startswith("features."):
            _, n, param = key.split(".")
            out[f"{next(i for i, end in enumerate(SLICES) if int(n) < end)}.{n}.{param}"] = value
    return out
