"""Invariance statistics (paper Sec. 2.4, 3.4, Table 2 and the crop selection of Figs. 6 and 7).

Per denoiser and test crop i (with M invariances x̃_ij of crop x_i):

* ``MD_i    = mean_j mean_pixels |x_i − x̃_ij|`` in HU (:func:`mean_abs_difference`);
* ``s_VAE_i = mean_j cos(E(x_i), E(x̃_ij))`` with E the unconditional VAE's latent mean (Eq. 9);
* ``s_DML_i = mean_j cos(φ(x_i), φ(x̃_ij))`` in the learned embedding (Eq. 10)
  (both :func:`mean_similarity`).

More invariances = higher MD, lower s_VAE, lower s_DML (:data:`MORE_INVARIANCE`).
Table 2 compares a reference denoiser (RED-CNN in the paper) with every other denoiser by one-sided
Mann–Whitney U tests (H1: the reference has more invariances), Benjamini–Hochberg corrected over
all (method × metric) comparisons, with stars on the *other* method's cell (:func:`table2`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping, Sequence, TypeVar

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu
from statsmodels.stats.multitest import multipletests
from tabulate import tabulate

from invariscope.atomic import write_text
from invariscope.names import LABELS

__all__ = [
    "MORE_INVARIANCE",
    "DEFAULT_QUANTILES",
    "METRIC_LABELS",
    "METRIC_DECIMALS",
    "cosine_similarity",
    "mean_similarity",
    "mean_abs_difference",
    "quantile_indices",
    "significance_stars",
    "bh_adjust",
    "compare_to_reference",
    "table2",
    "write_table2",
]

Alternative = Literal["greater", "less"]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: Direction of "more invariances" per metric = the Mann–Whitney alternative for reference vs other.
MORE_INVARIANCE: dict[str, Alternative] = {"md": "greater", "s_vae": "less", "s_dml": "less"}

#: Quantiles for the four crops of Figs. 6/7: the midpoints of the four quarters of the
#: empirical distribution. The paper only says "four crops, corresponding to the quantiles";
#: midpoints make each crop represent one quarter and avoid the min/max outliers that
#: (0, 1/3, 2/3, 1) would show.
DEFAULT_QUANTILES: tuple[float, ...] = (0.125, 0.375, 0.625, 0.875)

#: Column headers of Table 2 (arrow = direction of more invariances).
METRIC_LABELS: dict[str, str] = {
    "md": "MD (HU) ↑ noise + content",
    "s_vae": "s_VAE ↓ content",
    "s_dml": "s_DML ↓ content",
}
#: Decimals of mean ± SD in Table 2 (MD in HU: 1; cosine similarities: 3).
METRIC_DECIMALS: dict[str, int] = {"md": 1, "s_vae": 3, "s_dml": 3}

_COMPARISON_COLUMNS = [
    "method", "metric", "alternative", "n_ref", "n_other", "U", "cles", "p_raw", "p_bh", "stars",
]


# --------------------------------------------------------------------------- per-crop statistics


def cosine_similarity(a: ArrayT, b: ArrayT, eps: float = 1e-12) -> ArrayT:
    """Cosine similarity along the last axis.

    ``a`` (N, D) against ``b`` (N, D) -> (N,), or against ``b`` (N, M, D) -> (N, M) (each x_i
    against its M invariances). Works on numpy arrays (computed in float64) or torch tensors
    (same dtype/device, differentiable). A zero vector gives similarity 0.
    """
    if a.ndim + 1 == b.ndim:
        a = a[..., None, :]
    elif a.ndim != b.ndim:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast as (N,D)/(N[,M],D)")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"feature dims differ: {a.shape[-1]} vs {b.shape[-1]}")
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        dot = (a * b).sum(-1)
        den = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
        return dot / den.clamp_min(eps)
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dot = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return dot / np.maximum(den, eps)


def mean_similarity(ex: ArrayT, einv: ArrayT) -> ArrayT:
    """Eq. 9/10: ``s_i = mean_j cos(ex_i, einv_ij)``; ``ex`` (N, D), ``einv`` (N, M, D) -> (N,)."""
    if einv.ndim != 3 or ex.ndim != 2:
        raise ValueError(f"expected ex (N,D) and einv (N,M,D), got {tuple(ex.shape)}, {tuple(einv.shape)}")
    return cosine_similarity(ex, einv).mean(-1)


def mean_abs_difference(x: ArrayT, xinv: ArrayT) -> ArrayT:
    """MD per crop: ``mean_j mean_pixels |x_i − x̃_ij|``; ``x`` (N, ...), ``xinv`` (N, M, ...) -> (N,).

    Pass both in HU to get MD in HU (a difference is offset-free, but normalized units scale it).
    """
    if xinv.ndim != x.ndim + 1 or xinv.shape[0] != x.shape[0] or xinv.shape[2:] != x.shape[1:]:
        raise ValueError(f"expected x (N,...) and xinv (N,M,...), got {tuple(x.shape)}, {tuple(xinv.shape)}")
    n = x.shape[0]
    if isinstance(x, torch.Tensor) or isinstance(xinv, torch.Tensor):
        x, xinv = torch.as_tensor(x), torch.as_tensor(xinv)
        return (x.unsqueeze(1) - xinv).abs().reshape(n, -1).mean(-1)
    d = np.abs(np.asarray(x, dtype=np.float64)[:, None] - np.asarray(xinv, dtype=np.float64))
    return d.reshape(n, -1).mean(-1)


def quantile_indices(
    values: Sequence[float] | np.ndarray | torch.Tensor,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> np.ndarray:
    """Indices of the items closest to the empirical quantiles of ``values`` (Figs. 6/7).

    Targets are ``np.quantile(values, q)`` (linear interpolation). For each quantile, in the given
    order, the not yet chosen item with the smallest ``|value − target|`` is picked; ties go to the
    item whose rank is closest to ``q (n − 1)``, then to the lower rank (stable sort, so equal values
    keep their input order). The returned indices (into ``values``) are distinct.
    """
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = v.astype(np.float64).ravel()
    q = np.asarray(quantiles, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        raise ValueError("values must be finite")
    if q.size == 0 or np.any((q < 0) | (q > 1)) or not np.all(np.isfinite(q)):
        raise ValueError(f"quantiles must be in [0, 1], got {quantiles!r}")
    n = v.size
    if n < q.size:
        raise ValueError(f"need at least {q.size} values for {q.size} distinct quantile items, got {n}")
    order = np.argsort(v, kind="stable")
    sv = v[order]
    ranks = np.arange(n, dtype=np.float64)
    targets = np.quantile(v, q)
    used = np.zeros(n, dtype=bool)
    chosen = np.empty(q.size, dtype=np.int64)
    for k, (qk, t) in enumerate(zip(q, targets)):
        # lexsort: last key is primary -> (|value - target|, |rank - q(n-1)|, rank)
        keys = (ranks, np.abs(ranks - qk * (n - 1)), np.abs(sv - t))
        cand = np.lexsort(keys)
        r = cand[~used[cand]][0]
        used[r] = True
        chosen[k] = order[r]
    return chosen


# --------------------------------------------------------------------------- significance tests


def significance_stars(p: float) -> str:
    """``"***"`` if p < 0.001, ``"**"`` if p < 0.01, ``"*"`` if p < 0.05, else ``""`` (NaN -> ``""``)."""
    if p is None or not np.isfinite(p):
        return ""
    if p < 0.001:
        return "***"
    if p < 0.01:
        return "**"
    if p < 0.05:
        return "*"
    return ""


def bh_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (statsmodels ``multipletests(method="fdr_bh")``)."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    if p.size == 0:
        return p
    return multipletests(p, method="fdr_bh")[1]


def _as_1d(x: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("empty sample")
    if not np.all(np.isfinite(a)):
        raise ValueError("samples must be finite (NaN/inf found)")
    return a


def compare_to_reference(
    samples: Mapping[str, Mapping[str, Sequence[float] | np.ndarray | torch.Tensor]],
    reference: str,
    more_invariance: Mapping[str, Alternative] | None = None,
) -> pd.DataFrame:
    """One-sided Mann–Whitney U tests "``reference`` has more invariances than each other method".

    ``samples[method][metric]`` holds the per-crop values. For every other method (insertion order)
    and every metric in ``more_invariance`` (default :data:`MORE_INVARIANCE`) present for both, runs
    ``mannwhitneyu(ref, other, alternative=more_invariance[metric])`` (scipy defaults: asymptotic
    with continuity correction for large samples, exact for small tie-free ones). ``p_bh`` is the
    Benjamini–Hochberg correction over *all* these comparisons; ``stars`` come from ``p_bh``.

    Returns one row per comparison: method, metric, alternative, n_ref, n_other, U (the reference's
    U statistic), cles (U / (n_ref n_other), the probability that a reference value lies on the
    "more invariant" side), p_raw, p_bh, stars.
    """
    more = dict(MORE_INVARIANCE if more_invariance is None else more_invariance)
    for m, alt in more.items():
        if alt not in ("greater", "less"):
            raise ValueError(f"more_invariance[{m!r}] must be 'greater' or 'less', got {alt!r}")
    if reference not in samples:
        raise KeyError(f"reference {reference!r} not in samples ({list(samples)})")
    ref = samples[reference]
    rows = []
    for method, by_metric in samples.items():
        if method == reference:
            continue
        for metric, alt in more.items():
            if metric not in ref or metric not in by_metric:
                continue
            x, y = _as_1d(ref[metric]), _as_1d(by_metric[metric])
            res = mannwhitneyu(x, y, alternative=alt)
            u = float(res.statistic)
            cles = u / (x.size * y.size) if alt == "greater" else 1.0 - u / (x.size * y.size)
            rows.append(dict(method=method, metric=metric, alternative=alt, n_ref=x.size,
                             n_other=y.size, U=u, cles=cles, p_raw=float(res.pvalue)))
    df = pd.DataFrame(rows, columns=_COMPARISON_COLUMNS)
    if len(df):
        df["p_bh"] = bh_adjust(df["p_raw"].to_numpy())
        df["stars"] = [significance_stars(p) for p in df["p_bh"]]
    return df


# --------------------------------------------------------------------------- Table 2


def _md_escape_stars(s: str) -> str:
    return s.replace("*", r"\*")


def table2(
    samples: Mapping[str, Mapping[str, Sequence[float] | np.ndarray | torch.Tensor]],
    reference: str = "redcnn",
    metrics: Sequence[str] = ("md", "s_vae", "s_dml"),
    labels: Mapping[str, str] | None = None,
    more_invariance: Mapping[str, Alternative] | None = None,
    decimals: Mapping[str, int] | None = None,
    metric_labels: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, str]:
    """Table 2: mean ± SD per method and metric, stars, most invariant method in bold.

    Stars go on the *other* methods' cells: the BH-corrected one-sided test that ``reference`` has
    more invariances than that method (:func:`compare_to_reference`). Bold marks, per metric, the
    method(s) with the most invariances (highest mean MD, lowest mean s_VAE / s_DML). SD is the
    sample SD (ddof 1). Metrics absent for a method show "–" and are not tested; metrics absent
    for every method are dropped.

    Returns ``(df, markdown)``: ``df`` has one row per (method, metric) with columns method, label,
    metric, n, mean, sd, U, p_raw, p_bh, stars, most; ``markdown`` is a pipe table plus a note.
    """
    more = dict(MORE_INVARIANCE if more_invariance is None else more_invariance)
    labels = {**LABELS, **(labels or {})}
    dec = {**METRIC_DECIMALS, **(decimals or {})}
    mlabels = {**METRIC_LABELS, **(metric_labels or {})}
    metrics = [m for m in metrics if any(m in s for s in samples.values())]
    for m in metrics:
        if m not in more:
            raise KeyError(f"no direction of 'more invariances' for metric {m!r}")
    if reference not in samples:
        raise KeyError(f"reference {reference!r} not in samples ({list(samples)})")

    tests = compare_to_reference(samples, reference, {m: more[m] for m in metrics})
    test_of = {(r.method, r.metric): r for r in tests.itertuples(index=False)}

    rows = []
    for method, by_metric in samples.items():
        for metric in metrics:
            if metric not in by_metric:
                continue
            v = _as_1d(by_metric[metric])
            t = test_of.get((method, metric))
            rows.append(dict(
                method=method, label=labels.get(method, method), metric=metric, n=v.size,
                mean=float(v.mean()), sd=float(v.std(ddof=1)) if v.size > 1 else 0.0,
                U=t.U if t else np.nan, p_raw=t.p_raw if t else np.nan,
                p_bh=t.p_bh if t else np.nan, stars=t.stars if t else "",
            ))
    df = pd.DataFrame(rows, columns=["method", "label", "metric", "n", "mean", "sd", "U",
                                     "p_raw", "p_bh", "stars"])
    df["most"] = False
    for metric in metrics:
        sel = df["metric"] == metric
        best = df.loc[sel, "mean"].max() if more[metric] == "greater" else df.loc[sel, "mean"].min()
        df.loc[sel, "most"] = df.loc[sel, "mean"] == best

    cell = {(r.method, r.metric): r for r in df.itertuples(index=False)}
    body = []
    for method in samples:
        line = [labels.get(method, method)]
        for metric in metrics:
            r = cell.get((method, metric))
            if r is None:
                line.append("–")
                continue
            d = dec.get(metric, 3)
            txt = f"{r.mean:.{d}f} ± {r.sd:.{d}f}"
            if r.most:
                txt = f"**{txt}**"
            line.append(txt + _md_escape_stars(r.stars))
        body.append(line)
    headers = ["Invariances"] + [mlabels.get(m, m) for m in metrics]
    md = tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True,
                  colalign=["left"] + ["right"] * len(metrics))
    ref_label = labels.get(reference, reference)
    note = (
        "\n\nMean ± SD over crops (n per method: "
        + ", ".join(f"{labels.get(m, m)} {int(df.loc[df.method == m, 'n'].max())}"
                    for m in samples if (df.method == m).any())
        + "). Bold: most invariances per metric (highest MD, lowest s_VAE / s_DML). "
        f"Stars: one-sided Mann–Whitney U test that {ref_label} has more invariances than this "
        f"method, Benjamini–Hochberg corrected over {len(tests)} comparisons: "
        r"\* p < 0.05, \*\* p < 0.01, \*\*\* p < 0.001."
    )
    return df, md + note + "\n"


def write_table2(df_numeric: pd.DataFrame, markdown: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``table2.csv`` (numeric, one row per method × metric) and ``table2.md`` atomically."""
    out = Path(out_dir)
    csv_path, md_path = out / "table2.csv", out / "table2.md"
    write_text(csv_path, df_numeric.to_csv(index=False))
    write_text(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    return csv_path, md_path
