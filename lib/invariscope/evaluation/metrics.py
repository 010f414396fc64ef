"""Image-quality metrics with the authors' evaluation conventions (ldct-benchmark ``compute_metric``).

* SSIM and PSNR on full 2D slices windowed to the lung window (center -600 HU, width 1500 HU)
  and mapped to [0, 1]; SSIM is scikit-image's ``structural_similarity(t, p, data_range=1.0)``
  with its defaults (7x7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03, no Gaussian
  weights); PSNR = 10 log10(1 / MSE).
* RMSE in HU after clipping both images to [-1024, 1900] HU.

Inputs are numpy arrays in HU. Computations run in float64 (the authors pass float32 arrays;
the difference is at the 1e-6 level).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.metrics import structural_similarity

__all__ = [
    "LUNG_WINDOW",
    "HU_CLIP",
    "window",
    "ssim_lung",
    "psnr_lung",
    "rmse_hu",
    "evaluate_slices",
    "summarize",
]

#: (center, width) of the lung window in HU used for SSIM/PSNR.
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
#: HU range to which images are clipped before the RMSE (air .. dense bone).
HU_CLIP: tuple[float, float] = (-1024.0, 1900.0)


def window(
    hu: np.ndarray, center: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]
) -> np.ndarray:
    """Linear window ``center``/``width`` (HU) mapped to [0, 1], clipped (float64 copy).

    Uses the DICOM linear VOI formula as the authors' ``apply_center_width``:
    ``(x - (c - 0.5)) / (w - 1) + 0.5``, 0 for ``x <= c - 0.5 - (w - 1) / 2`` and 1 above
    ``c - 0.5 + (w - 1) / 2``.
    """
    if width <= 1:
        raise ValueError(f"window width must be > 1, got {width}")
    x = np.asarray(hu, dtype=np.float64)
    c, w = float(center), float(width)
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def _pair(pred_hu: np.ndarray, target_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred_hu, dtype=np.float64)
    t = np.asarray(target_hu, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"prediction and target shapes differ: {p.shape} vs {t.shape}")
    return p, t


def _check_2d(p: np.ndarray) -> None:
    if p.ndim != 2:
        raise ValueError(
            f"expected a 2D slice (H, W), got shape {p.shape}; use evaluate_slices for stacks"
        )


def ssim_lung(pred_hu: np.ndarray, target_hu: np.ndarray) -> float:
    """SSIM of two 2D HU slices in the lung window (scikit-image defaults, data_range 1)."""
    p, t = _pair(pred_hu, target_hu)
    _check_2d(p)
    return float(structural_similarity(window(t), window(p), data_range=1.0))


def psnr_lung(pred_hu: np.ndarray, target_hu: np.ndarray) -> float:
    """PSNR (dB) of two 2D HU slices in the lung window with peak 1; inf for identical images."""
    p, t = _pair(pred_hu, target_hu)
    _check_2d(p)
    mse = float(np.mean((window(t) - window(p)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(1.0 / mse))


def rmse_hu(pred_hu: np.ndarray, target_hu: np.ndarray) -> float:
    """RMSE in HU after clipping both images to :data:`HU_CLIP` ([-1024, 1900] HU)."""
    p, t = _pair(pred_hu, target_hu)
    p = np.clip(p, *HU_CLIP)
    t = np.clip(t, *HU_CLIP)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def evaluate_slices(pred_hu: np.ndarray, target_hu: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice ``{"ssim", "psnr", "rmse"}`` arrays of length N for ``(N, H, W)`` (or ``(H, W)``,
    or ``(N, 1, H, W)``) HU stacks."""
    p, t = _pair(pred_hu, target_hu)
    if p.ndim == 2:
        p, t = p[None], t[None]
    elif p.ndim == 4 and p.shape[1] == 1:
        p, t = p[:, 0], t[:, 0]
    if p.ndim != 3:
        raise ValueError(
            f"expected (H, W), (N, H, W) or (N, 1, H, W) arrays, got shape {np.shape(pred_hu)}"
        )
    return {
        "ssim": np.array([ssim_lung(a, b) for a, b in zip(p, t)]),
        "psnr": np.array([psnr_lung(a, b) for a, b in zip(p, t)]),
        "rmse": np.array([rmse_hu(a, b) for a, b in zip(p, t)]),
    }


def summarize(values: Sequence[float] | np.ndarray, ddof: int = 1) -> tuple[float, float]:
    """``(mean, sd)`` over slices; sd with ``ddof`` (1: sample sd, as pandas; 0 if one value)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("summarize needs at least one value")
    sd = float(np.std(v, ddof=ddof)) if v.size > ddof else 0.0
    return float(np.mean(v)), sd
