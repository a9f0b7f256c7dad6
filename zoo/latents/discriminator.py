"""The PatchGAN discriminator and its hinge loss, shared by the methods that train a decoder adversarially
(REPA-E tunes its VAE with it; SVG's autoencoder from its GAN start)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (pix2pix, taming): strided 4x4 convolutions with BatchNorm and LeakyReLU, one logit per patch.

    Initialised as taming's `weights_init` (REPA-E's and SVG's): convolution weights N(0, 0.02), BatchNorm scales
    N(1, 0.02) and shifts 0; the biases of the first and last convolution keep PyTorch's default."""

    def __init__(self, channels: int = 64, layers: int = 3):
        mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            mods += [nn.Conv2d(c, out, 4, 2 if i < layers else 1, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            c = out
        super().__init__(*mods, nn.Conv2d(c, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)


def hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's hinge loss 0.5 * (E relu(1 - D(x)) + E relu(1 + D(x_rec))) (taming, REPA-E, SVG)."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
