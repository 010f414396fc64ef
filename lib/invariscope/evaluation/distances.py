"""Differentiable image distances, one value per image, for invariances found by optimization
(talk 003, :mod:`invariscope.stages.optimized`).

* ``mse``: mean squared difference in normalized units;
* ``ssim``: structural dissimilarity (1 − SSIM) / 2 with scikit-image's SSIM conventions (7×7
  uniform window, sample covariance, K1 = 0.01, K2 = 0.03, mean over the pixels whose window
  lies inside the image), ``data_range`` in normalized units;
* ``vgg``: mean L1 distance of VGG16 feature maps (:class:`~invariscope.models.backbones.VGGPerceptualLoss`
  layers; the authors' "repeat" input mapping), per image and averaged over the layers.

Inputs are ``(B, 1, H, W)`` tensors; every function returns ``(B,)``. How the talk bounds the
MSE ("bounded by +1") is applied by the caller (:func:`invariscope.stages.optimized.objective`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from invariscope.models.backbones import VGGPerceptualLoss

__all__ = ["DISTANCES", "mse", "ssim", "ssim_dissimilarity", "VGGDistance", "distance"]

#: The distances of the talk, by the names params and the comparison table use.
DISTANCES: tuple[str, ...] = ("mse", "ssim", "vgg")

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 1:
        raise ValueError(f"expected two (B, 1, H, W) tensors of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per image."""
    _check(a, b)
    return (a - b).pow(2).flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM per image, equal to ``skimage.metrics.structural_similarity(a, b,
    data_range=data_range)`` (its defaults) for each image of the batch."""
    _check(a, b)
    if win_size % 2 != 1 or min(a.shape[-2:]) < win_size:
        raise ValueError(f"win_size {win_size} must be odd and fit the {tuple(a.shape[-2:])} images")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    kernel = a.new_full((1, 1, win_size, win_size), 1.0 / win_size**2)
    mean = lambda t: F.conv2d(t, kernel)  # noqa: E731 - valid part = skimage's cropped result
    n = win_size**2
    cov_norm = n / (n - 1)  # sample covariance
    ux, uy = mean(a), mean(b)
    vx = cov_norm * (mean(a * a) - ux * ux)
    vy = cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def ssim_dissimilarity(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Structural dissimilarity (1 − SSIM) / 2 per image, in [0, 1]."""
    return (1.0 - ssim(a, b, data_range)) / 2.0


class VGGDistance(nn.Module):
    """Mean over ``layers`` of the mean |φ_l(a) − φ_l(b)| per image, φ a frozen VGG16.

    ``weights_path``: torchvision's ``vgg16-397923af.pth`` (local file); None = the fixed random
    VGG16 that :class:`~invariscope.models.backbones.VGGPerceptualLoss` documents (not the talk's
    ImageNet network: its features are random filters, still a multi-scale texture distance).
    """

    def __init__(self, layers: Sequence[str] = ("relu1_2", "relu2_2"),
                 weights_path: str | os.PathLike[str] | None = None,
                 params_key: str | None = None) -> None:
        super().__init__()
        self.vgg = VGGPerceptualLoss(layers=list(layers), weights_path=weights_path, kind="vgg16",
                                     params_key=params_key)
        self.pretrained = self.vgg.pretrained

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check(a, b)
        n = a.shape[0]
        feats = self.vgg.extract(torch.cat((a, b)))
        per = [(f[:n] - f[n:]).abs().flatten(1).mean(1) for f in feats]
        return torch.stack(per).mean(0)

    def train(self, mode: bool = True) -> "VGGDistance":
        """Always in eval mode (a frozen feature extractor)."""
        return super().train(False)


def distance(name: str, data_range: float = 1.0, vgg: VGGDistance | None = None) -> Distance:
    """The per-image distance called ``name`` (one of :data:`DISTANCES`); ``vgg`` is required for
    ``"vgg"``, ``data_range`` (normalized units) is SSIM's."""
    if name == "mse":
        return mse
    if name == "ssim":
        return lambda a, b: ssim_dissimilarity(a, b, data_range)
    if name == "vgg":
        if vgg is None:
            raise ValueError("the vgg distance needs a VGGDistance (vgg=...)")
        return vgg
    raise ValueError(f"unknown distance {name!r}; allowed: {', '.join(DISTANCES)}")
