"""An example of your own denoiser: any torch.nn.Module (here a fixed HU-to-HU smoothing filter).

Point ``denoisers.custom.<name>.module`` of a params file at it (``params.yaml`` beside this
file does) and give ``weights`` a state-dict file when your module has trained parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GaussianSmoother(nn.Module):
    """Gaussian smoothing with standard deviation ``sigma_px`` (reflect padding), HU in, HU out."""

    def __init__(self, sigma_px: float = 1.5) -> None:
        super().__init__()
        r = max(1, int(3 * sigma_px + 0.5))
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigma_px) ** 2)
        self.register_buffer("kernel", (k / k.sum()).view(1, 1, 1, -1))
        self.radius = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.radius
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), self.kernel)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), self.kernel.transpose(2, 3))
