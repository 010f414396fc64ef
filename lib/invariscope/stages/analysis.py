"""Analysis of the sampled invariances: per-crop MD, s_VAE, s_DML and Table 2 (Figures 6 and 7:
:mod:`invariscope.figures`).

Per denoiser and test crop i with invariances x̃_i1..x̃_iM (paper Sec. 2.4, 3.4):

* ``md``    = mean_j mean_pixels |x_i − x̃_ij| in HU;
* ``s_vae`` = mean_j cos(μ(x_i), μ(x̃_ij)), μ the posterior mean of the unconditional VAE's
  encoder (Eq. 7, 9);
* ``s_dml`` = mean_j cos(φ(x_i), φ(x̃_ij)), φ the learned embedding (Eq. 8, 10;
  :mod:`invariscope.stages.embedding`).

The statistics are those of :mod:`invariscope.evaluation.stats`; this module feeds them and picks
the crops the figures show. Figures 6 / 7 show, per denoiser, the crops at the quantiles of s_VAE / s_DML
(:func:`invariscope.evaluation.stats.quantile_indices`), each as x and the one invariance whose similarity
is closest to the crop's mean (``rep_vae`` / ``rep_dml`` of :func:`crop_metrics`).
:func:`analyze` holds one denoiser's invariances in memory at a time (the paper's sets are
3.3 GB each) and keeps only the crops the figures show.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from invariscope import atomic
from invariscope.data.loader import Normalizer
from invariscope.device import module_device
from invariscope.evaluation import stats
from invariscope.names import LABELS
from invariscope.provenance import invariance_file
from invariscope.stages.embedding import embed

__all__ = [
    "METRIC_COLUMNS",
    "METRIC_NAMES",
    "load_results",
    "crop_metrics",
    "metrics_table",
    "figure_crops",
    "analyze",
    "samples_by_method",
    "table2",
    "quantile_picks",
    "lowest_similarity",
]

#: Columns of ``runs/<profile>/analysis/metrics.csv``.
METRIC_COLUMNS = ("denoiser", "crop", "slice", "top", "left", "md", "s_vae", "s_dml",
                  "rep_vae", "rep_dml")
#: Display names of the metrics in figure captions.
METRIC_NAMES = {"md": "MD", "s_vae": "s_VAE", "s_dml": "s_DML"}


_KEYS = ("x", "x_tilde", "crops")


def _load_set(inv_dir: str | Path, name: str) -> dict[str, np.ndarray]:
    """x, x̃ and crops of ``<inv_dir>/<name>.npz`` (f(x̃) is not read), checked."""
    path = invariance_file(inv_dir, name)
    with np.load(path, allow_pickle=False) as z:
        mode = str(z["mode"]) if "mode" in z.files else "cinn"
        res = {k: z[k] for k in _KEYS if k in z.files}
        res["key"] = z["key"] if "key" in z.files else np.asarray("")
    xt = res.get("x_tilde")
    if mode != "cinn" or xt is None or xt.ndim != 4 or xt.shape[1] < 1 or "x" not in res:
        raise ValueError(f"{path} is not a set of cINN invariances (mode {mode!r}): rerun "
                         f"04_invariances.ipynb for {name} with force=True")
    return res


def load_results(inv_dir: str | Path, methods: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Each denoiser's test invariances ``<inv_dir>/<name>.npz`` (x, x_tilde, crops, key).

    A missing file raises :class:`FileNotFoundError` naming the notebook to run; a file of the
    prior ablation or posterior diagnostic, or without invariances, raises :class:`ValueError`.
    """
    return {name: _load_set(inv_dir, name) for name in methods}


def _representative(cos: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per crop, the invariance whose similarity is closest to the crop's mean (first on ties)."""
    return np.abs(cos - mean[:, None]).argmin(axis=1)


def crop_metrics(result: Mapping[str, np.ndarray], vae: nn.Module, embedder: nn.Module | None,
                 norm: Normalizer, denoiser: str = "", batch_size: int = 64) -> pd.DataFrame:
    """Per-crop MD (HU), s_VAE and s_DML of one denoiser's invariances.

    ``result``: a set of :func:`invariscope.stages.invariances.sample_invariances` (``x`` (N, c, c) and
    ``x_tilde`` (N, M, c, c) in HU, ``crops`` (N, 3)); ``vae``: the unconditional VAE (its
    ``encode(x)`` posterior mean is E of Eq. 7); ``embedder``: φ (None: ``s_dml`` is NaN). Both
    in eval mode. Returns one row per crop with :data:`METRIC_COLUMNS`.
    """
    x = np.asarray(result["x"], dtype=np.float32)
    xt = np.asarray(result["x_tilde"])
    n = len(x)
    step = 8  # crops per chunk: float64 differences of all crops at once would not fit
    md = np.concatenate([stats.mean_abs_difference(x[i:i + step], xt[i:i + step])
                         for i in range(0, n, step)])

    def enc(a: torch.Tensor) -> torch.Tensor:
        return vae.encode(a)[0]

    dev = module_device(vae)
    cos_vae = stats.cosine_similarity(embed(enc, x, norm, batch_size, dev),
                                      embed(enc, xt, norm, batch_size, dev))
    s_vae = cos_vae.mean(-1)
    if embedder is not None:
        cos_dml = stats.cosine_similarity(embed(embedder, x, norm, batch_size),
                                          embed(embedder, xt, norm, batch_size))
        s_dml, rep_dml = cos_dml.mean(-1), _representative(cos_dml, cos_dml.mean(-1))
    else:
        s_dml, rep_dml = np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    crops = np.asarray(result.get("crops", np.full((n, 3), -1)), dtype=np.int64).reshape(n, 3)
    return pd.DataFrame({"denoiser": denoiser, "crop": np.arange(n), "slice": crops[:, 0],
                         "top": crops[:, 1], "left": crops[:, 2], "md": md, "s_vae": s_vae,
                         "s_dml": s_dml, "rep_vae": _representative(cos_vae, s_vae),
                         "rep_dml": rep_dml}, columns=list(METRIC_COLUMNS))


def metrics_table(results: Mapping[str, Mapping[str, np.ndarray]], vae: nn.Module,
                  embedder: nn.Module | None, norm: Normalizer, batch_size: int = 64) -> pd.DataFrame:
    """:func:`crop_metrics` of every denoiser, stacked (denoisers in the order given)."""
    return pd.concat([crop_metrics(r, vae, embedder, norm, name, batch_size)
                      for name, r in results.items()], ignore_index=True)


def figure_crops(result: Mapping[str, np.ndarray], metrics: pd.DataFrame,
                 quantiles: Sequence[float] = stats.DEFAULT_QUANTILES) -> dict[str, dict[int, np.ndarray]]:
    """The crops of one denoiser that Figures 6 and 7 show: ``{"x": {i: x_i}, "x_tilde":
    {i: x̃_i}}`` for the crops at the ``quantiles`` of s_VAE and s_DML (``metrics``: this
    denoiser's rows); a stand-in for the full result in :func:`invariscope.figures.quantile_figure`."""
    keep: set[int] = set()
    for m in ("s_vae", "s_dml"):
        if m in metrics and not metrics[m].isna().any():
            for picks in quantile_picks(metrics, m, quantiles).values():
                keep |= {int(i) for i in picks}
    return {"x": {i: np.asarray(result["x"][i]) for i in sorted(keep)},
            "x_tilde": {i: np.asarray(result["x_tilde"][i]) for i in sorted(keep)}}


def analyze(inv_dir: str | Path, methods: Sequence[str], vae: nn.Module, embedder: nn.Module | None,
            norm: Normalizer, quantiles: Sequence[float] = stats.DEFAULT_QUANTILES,
            batch_size: int = 64, cache: str | Path | None = None, key: str = "",
            force: bool = False) -> tuple[pd.DataFrame, dict[str, dict[str, dict[int, np.ndarray]]]]:
    """:func:`crop_metrics` of every denoiser, loading one invariance set at a time, and the
    crops the figures show (:func:`figure_crops`). Returns ``(metrics, shown)``.

    ``cache``: a CSV of the metrics (written atomically, with ``key`` in a ``.json`` beside it);
    when its key equals ``key`` (and not ``force``) the metrics are read from it instead.
    """
    cache = Path(cache) if cache is not None else None
    stamp = cache.with_suffix(".json") if cache is not None else None
    metrics = None
    if cache is not None and not force and cache.is_file() and stamp.is_file():
        if json.loads(stamp.read_text()).get("key") == key and key:
            metrics = pd.read_csv(cache)
            if sorted(metrics.denoiser.unique()) != sorted(methods):
                metrics = None
    parts, shown = [], {}
    for name in methods:
        res = _load_set(inv_dir, name)
        if metrics is None:
            parts.append(crop_metrics(res, vae, embedder, norm, name, batch_size))
            mine = parts[-1]
        else:
            mine = metrics[metrics.denoiser == name]
        shown[name] = figure_crops(res, mine, quantiles)
        del res
    if metrics is None:
        metrics = pd.concat(parts, ignore_index=True)
        if cache is not None:
            atomic.write_text(cache, metrics.to_csv(index=False))
            atomic.write_json(stamp, {"key": key})
    return metrics, shown


def samples_by_method(metrics: pd.DataFrame,
                      columns: Sequence[str] = ("md", "s_vae", "s_dml")) -> dict[str, dict[str, np.ndarray]]:
    """``{denoiser: {metric: per-crop values}}`` (the input of :func:`invariscope.evaluation.stats.table2`);
    all-NaN metrics are left out."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, g in metrics.groupby("denoiser", sort=False):
        out[str(name)] = {m: g[m].to_numpy(dtype=np.float64) for m in columns
                          if m in g and not g[m].isna().all()}
    return out


def table2(metrics: pd.DataFrame, reference: str = "redcnn",
           labels: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, str]:
    """Table 2 of the per-crop ``metrics`` (:func:`invariscope.evaluation.stats.table2`: one-sided
    Mann–Whitney U of ``reference`` against every other denoiser, BH-corrected, stars, bold)."""
    samples = samples_by_method(metrics)
    if reference not in samples:
        raise ValueError(f"the reference method {reference!r} (analysis.reference) has no "
                         f"invariances here; available: {', '.join(samples)}")
    return stats.table2(samples, reference=reference, labels={**LABELS, **(labels or {})})


def quantile_picks(metrics: pd.DataFrame, metric: str,
                   quantiles: Sequence[float] = stats.DEFAULT_QUANTILES) -> dict[str, np.ndarray]:
    """Per denoiser, the crop indices (``crop`` column) at the ``quantiles`` of ``metric``,
    chosen by :func:`invariscope.evaluation.stats.quantile_indices` (in the order of ``quantiles``)."""
    out = {}
    for name, g in metrics.groupby("denoiser", sort=False):
        idx = stats.quantile_indices(g[metric].to_numpy(), quantiles)
        out[str(name)] = g["crop"].to_numpy()[idx]
    return out


def lowest_similarity(metrics: pd.DataFrame, method: str = "gaussri") -> dict[str, bool | None]:
    """Per similarity metric: whether ``method`` has the lowest mean over crops (None when it or
    the metric is absent)."""
    out: dict[str, bool | None] = {}
    for m in ("s_vae", "s_dml"):
        means = metrics.groupby("denoiser", sort=False)[m].mean().dropna()
        out[m] = None if method not in means else bool(means[method] == means.min())
    return out
