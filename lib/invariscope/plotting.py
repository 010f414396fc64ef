"""Figures: CT windows and image grids shared by the notebooks."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

# (center, width) in HU
LUNG_WINDOW = (-600.0, 1500.0)
SOFT_TISSUE_WINDOW = (40.0, 400.0)


def window_limits(center: float, width: float) -> tuple[float, float]:
    """(vmin, vmax) of a CT window."""
    return center - width / 2.0, center + width / 2.0


def image_grid(
    images: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    windows: Sequence[tuple[float, float]] | tuple[float, float] = LUNG_WINDOW,
    cmaps: Sequence[str] | str = "gray",
    cell_inches: float = 2.0,
    title: str | None = None,
) -> Figure:
    """A grid of images in HU; ``windows``/``cmaps`` per row or one for all. None = empty cell."""
    n_rows, n_cols = len(images), max(len(r) for r in images)
    if isinstance(windows, tuple) and len(windows) == 2 and np.isscalar(windows[0]):
        windows = [windows] * n_rows
    if isinstance(cmaps, str):
        cmaps = [cmaps] * n_rows
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows),
                             squeeze=False)
    for r in range(n_rows):
        vmin, vmax = window_limits(*windows[r])
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = images[r][c] if c < len(images[r]) else None
            if img is None:
                ax.axis("off")
                continue
            ax.imshow(img, cmap=cmaps[r], vmin=vmin, vmax=vmax, interpolation="nearest")
            if r == 0:
                ax.set_title(col_labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure (PNG), creating the folder, and return the path."""
    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path
