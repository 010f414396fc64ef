"""Networks of the natural (on-manifold) invariances (talk 003): a conditional generator that
perturbs a low-dose crop, and a patch critic for its Wasserstein loss.

Both are fully convolutional (any crop size divisible by 2 for the generator; the critic averages
its score map), small enough to train per denoiser on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NaturalGenerator", "PatchCritic"]


def _conv(ch_in: int, ch_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch_in, ch_out, 3, stride, 1), nn.LeakyReLU(0.2))


class NaturalGenerator(nn.Module):
    """x_inv = G(x, z) = x + r(x, z): two scales (full and half resolution, a skip between them),
    z ~ N(0, I) with ``noise_channels`` maps of the crop's size.

    The last layer starts small (weights × 0.1), so training starts near x_inv = x + small r:
    not at r = 0 exactly, where the squared input change has no gradient.
    """

    def __init__(self, width: int = 16, noise_channels: int = 4) -> None:
        super().__init__()
        self.noise_channels = int(noise_channels)
        w = int(width)
        self.head = nn.Sequential(_conv(1 + self.noise_channels, w), _conv(w, w))
        self.down = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))
        self.up = nn.Sequential(nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.LeakyReLU(0.2))
        self.tail = nn.Sequential(_conv(2 * w, w), nn.Conv2d(w, 1, 3, 1, 1))
        with torch.no_grad():
            self.tail[-1].weight.mul_(0.1)
            self.tail[-1].bias.zero_()

    def noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I) for the crops ``x`` (drawn on the CPU with ``generator``, then moved)."""
        shape = (x.shape[0], self.noise_channels, *x.shape[-2:])
        return torch.randn(shape, generator=generator).to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"expected (B, 1, H, W) crops with even H and W, got {tuple(x.shape)}")
        z = self.noise(x) if z is None else z
        h = self.head(torch.cat((x, z), 1))
        u = self.up(self.down(h))
        return x + self.tail(torch.cat((h, u), 1))


class PatchCritic(nn.Module):
    """Wasserstein critic: stride-2 3×3 convolutions (``width``, 2·width, ... up to 8·width,
    LeakyReLU 0.2, no normalization: WGAN-GP), a 1×1 score map, averaged to ``(B, 1)``."""

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 1
        for i in range(depth):
            out = int(width) * min(2**i, 8)
            layers.append(_conv(ch, out, stride=2))
            ch = out
        self.features = nn.Sequential(*layers)
        self.score = nn.Conv2d(ch, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x)).mean(dim=(2, 3))
