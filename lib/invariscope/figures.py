"""Every figure of the companion, drawn in one place: the CT windows and image grids the
notebooks share, the data examples and the paper's Figures 3 to 7.

=========  ==========================================================  ================
figure     what it shows                                               notebook
=========  ==========================================================  ================
data       low dose, full dose and their difference of a test slice    00_data
Figure 3   HD, LD and every denoiser, full slices and zoomed crops     01b_table1_figure3
Figure 4   HD, LD and each VAE's reconstruction of LD                  02b_figure4
Figure 5   x, y, invariances and their per-pixel SD per denoiser       04_invariances, 04b
Figure 6   crops at quantiles of s_VAE with their invariances          06_analysis
Figure 7   the same for s_DML                                          06_analysis
methods    invariances of every method side by side (talk 003)         07, 07b
Fig. 5 ext SD over x̃ beside SD over f(x̃), cINN samples                 07b
=========  ==========================================================  ================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from invariscope.atomic import atomic_path
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import Normalizer
from invariscope.evaluation.stats import DEFAULT_QUANTILES
from invariscope.models.denoisers import GaussRI
from invariscope.models.vae import ConditionalVAE
from invariscope.names import LABELS
from invariscope.stages.analysis import METRIC_NAMES, quantile_picks
from invariscope.stages.invariances import invariance_sd
from invariscope.stages.methods import METHOD_LABELS, METHODS
from invariscope.stages.vae_training import reconstruct_hu

__all__ = ["LUNG_WINDOW", "SOFT_TISSUE_WINDOW", "window_limits", "image_grid", "save",
           "data_examples", "figure3", "figure4_crops", "figure4", "figure5", "quantile_figure", "invariance_methods", "output_sd"]

Denoise = Callable[[np.ndarray], np.ndarray]  # (n, H, W) HU -> (n, H, W) HU

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
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def data_examples(dataset: CTDataset, patient: str, k: int, diff_range: float = 300.0) -> Figure:
    """Low dose, full dose and low − full of slice ``k`` of ``patient`` in the lung window (top)
    and the soft-tissue window (bottom); the difference in ±``diff_range`` HU."""
    low = dataset.volume(patient, "low")[k].astype(np.float32)
    full = dataset.volume(patient, "full")[k].astype(np.float32)
    fig = image_grid([[low, full, low - full], [low, full, low - full]],
                     row_labels=["lung window", "soft-tissue window"],
                     col_labels=["low dose", "full dose", "low − full"],
                     windows=[LUNG_WINDOW, SOFT_TISSUE_WINDOW], cell_inches=3.0,
                     title=f"patient {patient}, slice {k}")
    for ax in fig.axes[2::3]:
        ax.images[0].set_clim(-diff_range, diff_range)
    return fig


def figure3(dataset: CTDataset, denoisers: Mapping[str, Denoise], examples: Sequence[dict],
            window: tuple[float, float] = LUNG_WINDOW) -> Figure:
    """HD, LD and every denoiser (columns) for each example: full slice row, zoomed-crop row."""
    images, row_labels = [], []
    for ex in examples:
        k = ex["slice"]
        low = np.asarray(dataset.volume(ex["patient"], "low")[k:k + 1], dtype=np.float32)
        full = np.asarray(dataset.volume(ex["patient"], "full")[k], dtype=np.float32)
        row = [full, low[0]] + [f(low)[0] for f in denoisers.values()]
        t, l, s = ex["top"], ex["left"], ex["size"]
        images.append(row)
        images.append([im[t:t + s, l:l + s] for im in row])
        row_labels += [f"{ex['patient']} slice {k}", "zoom"]
    cols = ["HD", "LD"] + [LABELS.get(k, k) for k in denoisers]
    c, w = window
    fig = image_grid(images, row_labels, cols, windows=window, cell_inches=1.9)
    for ex_i, ex in enumerate(examples):  # mark the zoom region on the full slices
        for ax in fig.axes[2 * ex_i * len(cols):(2 * ex_i + 1) * len(cols)]:
            ax.add_patch(Rectangle((ex["left"], ex["top"]), ex["size"], ex["size"],
                                      fill=False, edgecolor="tab:red", linewidth=0.8))
    fig.text(0.5, -0.01, f"Figure 3. High dose (HD), low dose (LD) and the denoised images for a "
             f"random slice of every test patient, with a zoomed crop (red box). "
             f"C = {c:.0f} HU, W = {w:.0f} HU.", ha="center", va="top", fontsize=9, wrap=True)
    return fig


def figure4_crops(dataset: CTDataset, examples: Sequence[Mapping[str, Any]],
                  crop_size: int) -> list[dict[str, Any]]:
    """For each Figure 3 example: the ``crop_size`` square centred on its zoom crop (clipped to
    the slice), as ``{"patient", "slice", "top", "left", "size", "low", "full"}`` (HU, float32)."""
    out = []
    for ex in examples:
        k = int(ex["slice"])
        low = dataset.volume(ex["patient"], "low")
        h, w = low.shape[-2:]
        if crop_size > min(h, w):
            raise ValueError(f"crop size {crop_size} exceeds the {h}x{w} slices")
        cy, cx = ex["top"] + ex["size"] // 2, ex["left"] + ex["size"] // 2
        top = int(np.clip(cy - crop_size // 2, 0, h - crop_size))
        left = int(np.clip(cx - crop_size // 2, 0, w - crop_size))
        region = (k, slice(top, top + crop_size), slice(left, left + crop_size))
        out.append({"patient": ex["patient"], "slice": k, "top": top, "left": left, "size": crop_size,
                    "low": np.asarray(low[region], dtype=np.float32),
                    "full": np.asarray(dataset.volume(ex["patient"], "full")[region], dtype=np.float32)})
    return out


def figure4(dataset: CTDataset, examples: Sequence[Mapping[str, Any]],
            rows: Mapping[str, tuple[ConditionalVAE, nn.Module | None]],
            window: tuple[float, float] = LUNG_WINDOW,
            cell_inches: float = 1.9) -> Figure:
    """Figure 4: rows HD, LD and each VAE's reconstruction of LD (``rows``: label -> (vae,
    denoiser or None)); columns: the Figure 3 examples, cropped to the VAEs' crop size around the
    centre of each zoom crop. Lung window; the caption gives C/W."""
    sizes = {m.config.crop_size for m, _ in rows.values()}
    if len(sizes) != 1:
        raise ValueError(f"the VAEs of Figure 4 must share one crop size, got {sorted(sizes)}")
    crops = figure4_crops(dataset, examples, sizes.pop())
    norm = Normalizer.of(dataset)
    low = np.stack([c["low"] for c in crops])
    images = [[c["full"] for c in crops], list(low)]
    images += [list(reconstruct_hu(vae, den, low, norm)) for vae, den in rows.values()]
    cols = [f"{c['patient']} sl. {c['slice']}" for c in crops]
    fig = image_grid(images, ["HD", "LD", *rows], cols, windows=window,
                              cell_inches=cell_inches)
    c, w = window
    fig.text(0.5, -0.01, "Figure 4. High dose (HD), low dose (LD) and the reconstructions of LD by "
             "the VAEs (posterior mean) for the zoomed crops of Figure 3 "
             f"({crops[0]['size']}x{crops[0]['size']} px). C = {c:.0f} HU, W = {w:.0f} HU.",
             ha="center", va="top", fontsize=9, wrap=True)
    return fig


def figure5(results_by_denoiser: Mapping[str, Mapping[str, np.ndarray]], crop_index: int,
            n_show: int = 3, window: tuple[float, float] = LUNG_WINDOW,
            sd_range: tuple[float, float] = (0.0, 300.0), square: int | None = 30,
            cell_inches: float = 1.8, crop_label: int | str | None = None) -> Figure:
    """Figure 5: per denoiser (rows) x, y, ``n_show`` invariances and the per-pixel SD over all
    invariances (raw) of crop ``crop_index``. CT images in ``window`` (C, W), SD in ``sd_range``
    HU; ``square``: outline the centred square of the controls on the SD panels (None: none).
    ``crop_label``: the crop's name in the caption (default ``crop_index``; pass the test crop's
    own index when the results were sliced first). A row whose name contains ``"prior ablation"`` holds
    decoded z ~ N(0, I), and the caption says so."""
    if not results_by_denoiser:
        raise ValueError("no results given")
    names = list(results_by_denoiser)
    n_cols = 3 + n_show
    fig, axes = plt.subplots(len(names), n_cols, figsize=(cell_inches * n_cols, cell_inches * len(names)),
                             squeeze=False)
    lo, hi = window_limits(*window)
    for r, name in enumerate(names):
        res = results_by_denoiser[name]
        n = len(res["x"])
        i = crop_index if len(res["x_tilde"]) > crop_index else None
        if i is None:
            raise IndexError(f"crop_index {crop_index} out of range for {name} ({n} crops)")
        xt = np.asarray(res["x_tilde"][i], dtype=np.float32)
        sd = invariance_sd(xt[None])[0]
        panels = [(res["x"][i], lo, hi), (res["y"][i], lo, hi)]
        panels += [(xt[k], lo, hi) if k < len(xt) else (None, lo, hi) for k in range(n_show)]
        panels.append((sd, *sd_range))
        titles = ["x (low dose)", "y (full dose)", *[f"x̃ {k + 1}" for k in range(n_show)],
                  f"SD over {len(xt)} x̃"]
        for c, (img, vmin, vmax) in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if img is None:
                ax.axis("off")
                continue
            im = ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(LABELS.get(name, name), fontsize=9)
            if c == n_cols - 1 and square:
                size = img.shape[-1]
                rows, cols = GaussRI(square_size=square).square_slices(size, size)
                ax.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start,
                                       rows.stop - rows.start, fill=False, ec="tab:orange", lw=0.8,
                                       ls="--"))
    fig.subplots_adjust(left=0.05, right=0.9, top=0.93, bottom=0.02, wspace=0.05, hspace=0.05)
    top, bottom = axes[0, -1].get_position().y1, axes[-1, -1].get_position().y0
    cax = fig.add_axes((0.915, bottom, 0.015, top - bottom))
    fig.colorbar(im, cax=cax, label="SD over invariances (HU)")
    c, w = window
    label = crop_index if crop_label is None else crop_label
    prior = (" (prior ablation row: x̃ = D(v, f(x)) with v ~ N(0, I), no cINN)"
             if any("prior ablation" in n for n in names) else "")
    fig.text(0.47, 0.0, f"Figure 5. Crop {label}: low dose x, full dose y, {n_show} invariances "
             f"x̃ = D(t⁻¹(v | f(x)), f(x)){prior} and the per-pixel SD over invariances per denoiser. "
             f"CT images C = {c:.0f} HU, W = {w:.0f} HU; SD {sd_range[0]:.0f}–{sd_range[1]:.0f} HU "
             "(dashed: the centred square of the controls).",
             ha="center", va="top", fontsize=7, wrap=True)
    return fig


def quantile_figure(results: Mapping[str, Mapping[str, np.ndarray]], metrics: pd.DataFrame,
                    metric: str = "s_vae", quantiles: Sequence[float] = DEFAULT_QUANTILES,
                    window: tuple[float, float] = LUNG_WINDOW, figure: int | None = None,
                    cell_inches: float = 1.5) -> Figure:
    """Figure 6 (``metric="s_vae"``) / 7 (``"s_dml"``): per denoiser (rows) the crops at the
    ``quantiles`` of ``metric`` (left to right: increasing similarity), each as x and the
    invariance x̃ closest to the crop's mean similarity, in ``window`` (C, W) HU.

    ``results[name]``: ``x`` and ``x_tilde`` indexable by crop index (full arrays, or the dicts
    of :func:`figure_crops`)."""
    if metric not in ("s_vae", "s_dml"):
        raise ValueError(f"metric must be 's_vae' or 's_dml', got {metric!r}")
    picks = quantile_picks(metrics, metric, quantiles)
    names = [n for n in results if n in picks]
    if not names:
        raise ValueError("no denoiser has both invariances and metrics")
    rep = "rep_vae" if metric == "s_vae" else "rep_dml"
    lo, hi = window_limits(*window)
    n_cols = 2 * len(quantiles)
    fig, axes = plt.subplots(len(names), n_cols, squeeze=False,
                             figsize=(cell_inches * n_cols, cell_inches * len(names) + 0.6))
    for r, name in enumerate(names):
        g = metrics[metrics.denoiser == name].set_index("crop")
        for k, (q, i) in enumerate(zip(quantiles, picks[name])):
            j = int(g.at[i, rep])
            for c, (img, label) in enumerate(((results[name]["x"][i], "x"),
                                              (results[name]["x_tilde"][i][j], "x̃"))):
                ax = axes[r, 2 * k + c]
                ax.imshow(np.asarray(img, dtype=np.float32), cmap="gray", vmin=lo, vmax=hi,
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"q = {q:g}: {label}", fontsize=8)
                if c == 1:
                    ax.text(0.03, 0.03, f"{METRIC_NAMES[metric]} {g.at[i, metric]:.3f}",
                            transform=ax.transAxes, fontsize=6, color="yellow", va="bottom",
                            bbox=dict(facecolor="black", alpha=0.6, pad=1.0, linewidth=0))
            if k == 0:
                axes[r, 0].set_ylabel(LABELS.get(name, name), fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.9, bottom=0.12, wspace=0.04, hspace=0.06)
    c, w = window
    head = f"Figure {figure}. " if figure else ""
    fig.text(0.5, 0.02, f"{head}Crops at the {', '.join(f'{q:g}' for q in quantiles)} quantiles of "
             f"{METRIC_NAMES[metric]} per denoiser (left to right: increasing similarity, fewer "
             f"content invariances): input x and the invariance x̃ closest to the crop's mean "
             f"similarity.\nLung window C = {c:.0f} HU, W = {w:.0f} HU.",
             ha="center", va="bottom", fontsize=7)
    return fig


def _outline_square(ax: Any, size: int, square: int) -> None:
    rows, cols = GaussRI(square_size=square).square_slices(size, size)
    ax.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start,
                           rows.stop - rows.start, fill=False, ec="tab:orange", lw=0.8, ls="--"))


def invariance_methods(sets_by_denoiser: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                       crop_index: int = 0, methods: Sequence[str] | None = None,
                       window: tuple[float, float] = LUNG_WINDOW,
                       diff_window: tuple[float, float] = (0.0, 100.0), square: int | None = 30,
                       cell_inches: float = 1.6) -> Figure:
    """The talk's figure for every method (issue 21): per denoiser two rows, the invariance x̃
    (first of the crop) and x̃ − x, beside x and f(x); columns x, f(x), then one per method.
    CT images in ``window``, differences in ``diff_window`` (the talk: C 0 HU, W 100 HU)."""
    if not sets_by_denoiser:
        raise ValueError("no sets given")
    names = list(sets_by_denoiser)
    if methods is None:
        present = {m for s in sets_by_denoiser.values() for m in s}
        methods = [m for m in METHODS if m in present]
    n_cols = 2 + len(methods)
    fig, axes = plt.subplots(2 * len(names), n_cols, squeeze=False,
                             figsize=(cell_inches * n_cols, cell_inches * 2 * len(names)))
    lo, hi = window_limits(*window)
    dlo, dhi = window_limits(*diff_window)
    im_d = None
    for r, name in enumerate(names):
        sets = sets_by_denoiser[name]
        first = next(iter(sets.values()))
        x, y_hat = np.asarray(first["x"][crop_index]), np.asarray(first["y_hat"][crop_index])
        for ax in axes[2 * r:2 * r + 2].ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        axes[2 * r, 0].imshow(x, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        axes[2 * r, 1].imshow(y_hat, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        axes[2 * r + 1, 0].axis("off")
        axes[2 * r + 1, 1].axis("off")
        axes[2 * r, 0].set_ylabel(f"{LABELS.get(name, name)}\nx̃", fontsize=8)
        for c, m in enumerate(methods, start=2):
            if m not in sets:
                axes[2 * r, c].axis("off")
                axes[2 * r + 1, c].axis("off")
                continue
            xt = np.asarray(sets[m]["x_tilde"][crop_index][0], np.float32)
            axes[2 * r, c].imshow(xt, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            im_d = axes[2 * r + 1, c].imshow(xt - x, cmap="gray", vmin=dlo, vmax=dhi,
                                            interpolation="nearest")
            if square:
                _outline_square(axes[2 * r + 1, c], xt.shape[-1], square)
            if r == 0:
                axes[0, c].set_title(METHOD_LABELS.get(m, m), fontsize=8)
        axes[2 * r + 1, 2].set_ylabel("x̃ − x", fontsize=8)
    axes[0, 0].set_title("x (low dose)", fontsize=8)
    axes[0, 1].set_title("f(x)", fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.9, top=0.95, bottom=0.03, wspace=0.05, hspace=0.05)
    if im_d is not None:
        top, bottom = axes[0, -1].get_position().y1, axes[-1, -1].get_position().y0
        fig.colorbar(im_d, cax=fig.add_axes((0.915, bottom, 0.012, top - bottom)),
                     label="x̃ − x (HU)")
    c, w = window
    fig.text(0.48, 0.0, f"Invariances by method, test crop {crop_index}: per denoiser one invariance "
             f"x̃ of each method (upper row, C = {c:.0f} HU, W = {w:.0f} HU) and its change x̃ − x "
             f"(lower row, C = {diff_window[0]:.0f} HU, W = {diff_window[1]:.0f} HU; dashed: "
             "Gauss+RI's blind square). cINN: x̃ = D(t⁻¹(v | f(x)), f(x)); prior: the same without the "
             "cINN; opt.: argmin d(f(x), f(x')) − α·d(x, x'); natural: G(x, z) of the generator "
             "trained with a critic.", ha="center", va="top", fontsize=7, wrap=True)
    return fig


def output_sd(results_by_denoiser: Mapping[str, Mapping[str, np.ndarray]], crop_index: int,
              sd_range: tuple[float, float] = (0.0, 300.0), out_range: tuple[float, float] | None = None,
              window: tuple[float, float] = LUNG_WINDOW, square: int | None = 30,
              cell_inches: float = 1.8) -> Figure:
    """Figure 5's extension (talk 003): per denoiser x, the per-pixel SD over the cINN's
    invariances x̃ and the SD over their outputs f(x̃) of crop ``crop_index``. ``out_range``:
    the SD scale of f(x̃) (default: the 99th percentile over the rows shown)."""
    if not results_by_denoiser:
        raise ValueError("no results given")
    names = list(results_by_denoiser)
    sds = {n: (invariance_sd(np.asarray(r["x_tilde"][crop_index:crop_index + 1], np.float32))[0],
               invariance_sd(np.asarray(r["f_x_tilde"][crop_index:crop_index + 1], np.float32))[0])
           for n, r in results_by_denoiser.items()}
    if out_range is None:
        hi = float(np.percentile(np.stack([s[1] for s in sds.values()]), 99)) or 1.0
        out_range = (0.0, hi)
    fig, axes = plt.subplots(len(names), 3, squeeze=False,
                             figsize=(cell_inches * 3.6, cell_inches * len(names)))
    lo, hi_w = window_limits(*window)
    ims = [None, None]
    for r, name in enumerate(names):
        sd_x, sd_f = sds[name]
        axes[r, 0].imshow(results_by_denoiser[name]["x"][crop_index], cmap="gray", vmin=lo, vmax=hi_w,
                          interpolation="nearest")
        ims[0] = axes[r, 1].imshow(sd_x, cmap="magma", vmin=sd_range[0], vmax=sd_range[1],
                                   interpolation="nearest")
        ims[1] = axes[r, 2].imshow(sd_f, cmap="magma", vmin=out_range[0], vmax=out_range[1],
                                   interpolation="nearest")
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if square and c:
                _outline_square(ax, sd_x.shape[-1], square)
        axes[r, 0].set_ylabel(LABELS.get(name, name), fontsize=9)
    for c, title in enumerate(["x (low dose)", "SD over x̃", "SD over f(x̃)"]):
        axes[0, c].set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.94, bottom=0.09, wspace=0.05, hspace=0.05)
    for k, (im, label) in enumerate(zip(ims, ["SD over x̃ (HU)", "SD over f(x̃) (HU)"])):
        box = axes[-1, k + 1].get_position()
        cax = fig.add_axes((box.x0, box.y0 - 0.035, box.width, 0.012))
        fig.colorbar(im, cax=cax, orientation="horizontal", label=label)
    n = np.asarray(next(iter(results_by_denoiser.values()))["x_tilde"]).shape[1]
    fig.text(0.53, -0.02, f"Figure 5, extended. Crop {crop_index}: per-pixel SD over the cINN's {n} "
             f"invariances x̃ ({sd_range[0]:.0f}–{sd_range[1]:.0f} HU) and over their outputs f(x̃) "
             f"({out_range[0]:.0f}–{out_range[1]:.0f} HU, another scale): what the input may vary "
             "against what reaches the output (dashed: Gauss+RI's blind square).",
             ha="center", va="top", fontsize=7, wrap=True)
    return fig


def layerwise(sets: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
              table: pd.DataFrame, crop_index: int = 0, n_show: int = 3,
              window: tuple[float, float] = LUNG_WINDOW, sd_max: float | None = None,
              cell_inches: float = 1.5, target: bool = False) -> Figure:
    """Layer-wise invariances (talk 002): per denoiser and layer one row, x (ỹ: y and f(x)),
    ``n_show`` invariances and the per-pixel SD over all of them; below, the mean invariance SD
    and mean |x̃ − x| against depth (from ``table``, ``layerwise.csv``; not for ``target``)."""
    rows = [(d, layer) for d, by_layer in sets.items() for layer in by_layer]
    if not rows:
        raise ValueError("no sets given")
    lead = 2 if target else 1
    n_cols = lead + n_show + 1
    n_rows = len(rows) + (0 if target else 1)
    height = cell_inches * len(rows) + (0.5 if target else cell_inches * 1.4 + 1.4)
    fig = plt.figure(figsize=(cell_inches * n_cols, height))
    img_bottom = (0.5 if target else cell_inches * 1.4 + 1.4) / height
    grid = fig.add_gridspec(len(rows), n_cols, left=0.08, right=0.9, top=1 - 0.3 / height,
                            bottom=img_bottom, wspace=0.05, hspace=0.12)
    curves = None if target else fig.add_gridspec(
        1, 2, left=0.1, right=0.9, top=img_bottom - 0.35 / height, bottom=0.75 / height, wspace=0.3)
    lo, hi = window_limits(*window)
    sds = [invariance_sd(np.asarray(sets[d][l]["x_tilde"][crop_index:crop_index + 1]))[0]
           for d, l in rows]
    vmax = sd_max if sd_max is not None else float(max(np.percentile(s, 99) for s in sds))
    im_sd = None
    for r, ((d, layer), sd) in enumerate(zip(rows, sds)):
        res = sets[d][layer]
        lead_images = ([res["y"][crop_index], res["y_hat"][crop_index]] if target
                       else [res["x"][crop_index]])
        images = lead_images + [np.asarray(res["x_tilde"][crop_index][k], np.float32)
                                for k in range(min(n_show, res["x_tilde"].shape[1]))]
        for c in range(n_cols):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            elif c == n_cols - 1:
                im_sd = ax.imshow(sd, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(f"{LABELS.get(d, d)}\n{layer}", fontsize=7)
            if r == 0:
                tilde = "ỹ" if target else "x̃"
                titles = (["y (high dose)", "f(x)"] if target else ["x (low dose)"]) + \
                    [f"{tilde} {k + 1}" for k in range(n_show)] + [f"SD of {tilde}"]
                ax.set_title(titles[c], fontsize=8)
    if im_sd is not None:
        top = fig.axes[0].get_position().y1
        bottom = fig.axes[(len(rows) - 1) * n_cols].get_position().y0
        cbar = fig.colorbar(im_sd, cax=fig.add_axes((0.915, bottom, 0.012, top - bottom)))
        cbar.set_label("SD (HU)", fontsize=7)
        cbar.ax.tick_params(labelsize=6)
    if not target:
        for k, (col, label) in enumerate((("invariance_sd_hu", "mean invariance SD (HU)"),
                                          ("input_change_hu", "mean |x̃ − x| (HU)"))):
            ax = fig.add_subplot(curves[0, k])
            for d, part in table.groupby("denoiser", sort=False):
                part = part.sort_values("depth")
                rel = (part["depth"] + 1) / len(part)
                ax.plot(rel, part[col], marker="o", label=LABELS.get(d, d))
                for x_, y_, name in zip(rel, part[col], part["layer"]):
                    ax.annotate(name, (x_, y_), fontsize=5, xytext=(2, 2), textcoords="offset points")
            ax.set_xlabel("depth (layer / layers listed)", fontsize=7)
            ax.set_ylabel(label, fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlim(0, 1.08)
            if k == 0:
                ax.legend(fontsize=6)
    c, w = window
    what = ("High-dose images ỹ = D_y(t⁻¹(v | Φ_l(x)), f(x)) that the denoiser's representation at "
            "layer l cannot tell apart from the crop's, beside the true high-dose y and the output f(x)"
            if target else
            "Layer-wise invariances x̃ = D(t⁻¹(v | Φ_l(x)), f(x)): inputs the representation Φ_l after "
            "layer l cannot tell apart from x; each row a cINN conditioned on that layer. Below: mean SD "
            "over invariances and mean |x̃ − x| against depth (expected never to shrink)")
    fig.text(0.5, 0.005, f"{what}. Test crop {crop_index}, C = {c:.0f} HU, W = {w:.0f} HU.",
             ha="center", va="bottom", fontsize=7, wrap=True)
    return fig
