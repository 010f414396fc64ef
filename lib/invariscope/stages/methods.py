"""Side by side on the same test crops: the cINN's invariances, its prior ablation, the
optimization-based ones and the natural ones (``07b_invariance_methods.ipynb``).

One row per denoiser and method (:data:`METHODS`) with :data:`COLUMNS`:

* ``input_change_hu`` = mean |x̃ − x|, ``output_change_hu`` = mean |f(x̃) − f(x)|;
* ``change_ratio_smoothed`` = mean |G ∗ (x̃ − x)| inside the centred 30×30 square over its mean
  outside (a 3 px band around the edge left out; G the σ = 1 px Gaussian: smooth the difference,
  then take its magnitude), the masks of the controls (:func:`~invariscope.stages.invariances.region_masks`);
* ``hf_share``: share of the power of x̃ − x above a quarter of the sampling frequency
  (:func:`~invariscope.stages.invariances.high_frequency_share`): noise-like change or anatomy;
* ``s_vae``: mean cos(E(x), E(x̃)) in the unconditional VAE's latent (Table 2's s_VAE).

:func:`check_controls` tests the issue's controls: Gauss+RI's optimized invariances change the
input mostly inside its blind square (ratio ≥ 10) with an output change below 1 % of the input
change; every trained denoiser's optimized invariances stay below 10 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from tabulate import tabulate
from torch import nn

from invariscope import atomic
from invariscope.data.loader import Normalizer
from invariscope.names import LABELS
from invariscope.stages.analysis import crop_metrics
from invariscope.stages.invariances import high_frequency_share, load_invariances, region_masks

__all__ = ["METHODS", "METHOD_LABELS", "COLUMNS", "TRAINED", "restrict", "change_measures",
           "comparison_table", "write_comparison", "check_controls", "methods_for", "set_file",
           "load_set"]

#: The methods of the comparison, in table order.
METHODS: tuple[str, ...] = ("cinn", "prior", "opt_mse", "opt_ssim", "opt_vgg", "natural")
#: How figures and captions name them.
METHOD_LABELS: dict[str, str] = {"cinn": "cINN", "prior": "prior (no cINN)", "opt_mse": "opt. MSE",
                                 "opt_ssim": "opt. SSIM", "opt_vgg": "opt. VGG",
                                 "natural": "natural (generator)"}
#: Columns of ``figures/<profile>/invariance_methods.csv``.
COLUMNS: tuple[str, ...] = ("denoiser", "method", "input_change_hu", "output_change_hu",
                            "change_ratio_smoothed", "hf_share", "s_vae")
#: Denoisers with a training loop (the 10 % control); Gauss+RI has the 1 % one.
TRAINED: tuple[str, ...] = ("cnn10", "redcnn", "wganvgg", "dugan")

_ARRAYS = ("x", "y", "y_hat", "x_tilde", "f_x_tilde", "crops")


def restrict(result: Mapping[str, np.ndarray], n_crops: int) -> dict[str, np.ndarray]:
    """The first ``n_crops`` crops of a set (the crops every method shares)."""
    return {k: (np.asarray(v)[:n_crops] if k in _ARRAYS else v) for k, v in result.items()}


def change_measures(result: Mapping[str, np.ndarray], square: int = 30, band: int = 3,
                    sigma: float = 1.0, cutoff: float = 0.25) -> dict[str, float]:
    """``input_change_hu``, ``output_change_hu``, ``change_ratio_smoothed`` and ``hf_share`` of a
    set (``x`` (N, c, c), ``x_tilde``/``f_x_tilde`` (N, M, c, c), ``y_hat`` (N, c, c), HU).
    The ratio is NaN when the crop has no pixels inside or outside (crops of 36 px or less)."""
    x = np.asarray(result["x"], np.float64)
    xt = np.asarray(result["x_tilde"])
    if xt.ndim != 4 or xt.shape[0] != x.shape[0]:
        raise ValueError(f"x_tilde must be (N, M, c, c) with N = {x.shape[0]} crops, got {xt.shape}")
    inside, outside = region_masks(xt.shape[-1], square, band)
    n_in = n_out = 0
    sum_abs = sum_out = sum_in_sm = sum_out_sm = 0.0
    diffs = []
    for i in range(len(x)):
        d = xt[i].astype(np.float64) - x[i][None]
        diffs.append(d)
        sum_abs += float(np.abs(d).sum())
        fo = np.asarray(result["f_x_tilde"][i], np.float64) - np.asarray(result["y_hat"][i], np.float64)[None]
        sum_out += float(np.abs(fo).sum())
        sm = np.abs(gaussian_filter(d, sigma=(0.0, sigma, sigma)))
        sum_in_sm += float(sm[:, inside].sum())
        sum_out_sm += float(sm[:, outside].sum())
        n_in += int(inside.sum()) * len(d)
        n_out += int(outside.sum()) * len(d)
    ratio = math.nan
    if n_in and n_out:
        mean_out = sum_out_sm / n_out
        ratio = (sum_in_sm / n_in) / mean_out if mean_out > 0 else math.inf
    return {"input_change_hu": sum_abs / xt.size, "output_change_hu": sum_out / xt.size,
            "change_ratio_smoothed": ratio, "hf_share": high_frequency_share(np.stack(diffs), cutoff)}


def comparison_table(sets: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], vae: nn.Module,
                     norm: Normalizer, batch_size: int = 64) -> pd.DataFrame:
    """One row per denoiser and method of ``sets`` (``{denoiser: {method: set}}``, each set on the
    same crops), with :data:`COLUMNS`; ``vae``: the unconditional VAE (s_VAE), in eval mode."""
    rows = []
    for name, by_method in sets.items():
        for method in [m for m in METHODS if m in by_method] + [m for m in by_method if m not in METHODS]:
            res = by_method[method]
            s_vae = float(crop_metrics(res, vae, None, norm, name, batch_size)["s_vae"].mean())
            rows.append({"denoiser": name, "method": method, **change_measures(res), "s_vae": s_vae})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_comparison(table: pd.DataFrame, folder: str | Path, stem: str = "invariance_methods") -> Path:
    """``<folder>/<stem>.csv`` (all digits) and ``.md`` (rounded, method labels), atomically."""
    folder = Path(folder)
    atomic.write_text(folder / f"{stem}.csv", table.to_csv(index=False, float_format="%.6g"))
    shown = table.assign(denoiser=[LABELS[d] for d in table["denoiser"]])
    md = tabulate(shown.values.tolist(), headers=list(shown.columns), tablefmt="github",
                  floatfmt=(".0f", ".0f", ".2f", ".2f", ".1f", ".3f", ".3f"))
    atomic.write_text(folder / f"{stem}.md", md + "\n")
    return folder / f"{stem}.md"


def check_controls(table: pd.DataFrame, min_ratio: float = 10.0, gaussri_fraction: float = 0.01,
                   trained_fraction: float = 0.10) -> pd.DataFrame:
    """The controls of the optimized rows (``opt_*``): per row the checks, their values, targets
    and whether they hold (NaN values, e.g. crops too small for the square, do not hold).

    Gauss+RI: ``change_ratio_smoothed`` ≥ ``min_ratio`` and output change < ``gaussri_fraction``
    of the input change; trained denoisers: output change < ``trained_fraction`` of it.
    """
    out = []
    for row in table[table["method"].str.startswith("opt_")].itertuples(index=False):
        frac = row.output_change_hu / row.input_change_hu if row.input_change_hu > 0 else math.nan
        if row.denoiser == "gaussri":
            out.append((row.denoiser, row.method, "change_ratio_smoothed", row.change_ratio_smoothed,
                        f">= {min_ratio:g}", bool(row.change_ratio_smoothed >= min_ratio)))
            out.append((row.denoiser, row.method, "output / input change", frac,
                        f"< {gaussri_fraction:g}", bool(frac < gaussri_fraction)))
        elif row.denoiser in TRAINED:
            out.append((row.denoiser, row.method, "output / input change", frac,
                        f"< {trained_fraction:g}", bool(frac < trained_fraction)))
    return pd.DataFrame(out, columns=["denoiser", "method", "check", "value", "target", "holds"])


def methods_for(distances: Sequence[str], natural: bool) -> list[str]:
    """The methods a profile compares: cINN, prior, one ``opt_<d>`` per distance, natural."""
    return ["cinn", "prior", *(f"opt_{d}" for d in distances), *(["natural"] if natural else [])]


def set_file(inv_dir: str | Path, opt_dir: str | Path, name: str, method: str) -> Path:
    """Where a denoiser's set of ``method`` lies: notebook 04's ``<inv_dir>/<name>.npz`` (cinn) and
    ``<name>_prior.npz`` (prior), notebook 07's ``<opt_dir>/<name>_<method>.npz`` (the others).
    FileNotFoundError naming the notebook to run when it is missing."""
    if method in ("cinn", "prior"):
        path = Path(inv_dir) / (f"{name}.npz" if method == "cinn" else f"{name}_prior.npz")
        notebook, stage = "04_invariances.ipynb", "invariances"
    else:
        path = Path(opt_dir) / f"{name}_{method}.npz"
        notebook, stage = "07_optimized_invariances.ipynb", "optimized"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run {notebook} for {name} first "
                                f"(./run_all.sh --only {stage})")
    return path


def load_set(inv_dir: str | Path, opt_dir: str | Path, name: str, method: str,
             n_crops: int | None = None) -> dict[str, np.ndarray]:
    """A denoiser's set of ``method`` (:func:`set_file`), its first ``n_crops`` crops when given."""
    res = load_invariances(set_file(inv_dir, opt_dir, name, method))
    return restrict(res, n_crops) if n_crops is not None else res
