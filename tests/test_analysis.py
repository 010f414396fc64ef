"""Invariance analysis: per-crop MD, s_VAE, s_DML against a hand computation, the crops of
Figures 6/7, the one-sided direction of Table 2 on data with a known answer, and clear errors."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from invariscope import figures
from invariscope.data.loader import Normalizer
from invariscope.evaluation import stats
from invariscope.provenance import metrics_key
from invariscope.stages import analysis
from invariscope.stages import invariances as inv

NORM = Normalizer(-500.0, 250.0)


class HalfMeans(nn.Module):
    """Stand-in for the unconditional VAE: μ(x) = (mean of the left half, of the right half, 1)."""

    def encode(self, x):
        w = x.shape[-1] // 2
        mu = torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3)),
                          torch.ones(len(x))], dim=1)
        return mu, torch.zeros_like(mu)


class MeanMax(nn.Module):
    """Stand-in for φ: (mean, max, 0.5) of the normalized crop."""

    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3)), torch.full((len(x),), 0.5)], dim=1)


def _result(n=5, m=3, size=8, seed=0, spread=100.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(-500, 200, (n, size, size)).astype(np.float32)
    xt = (x[:, None] + rng.normal(0, spread, (n, m, size, size))).astype(np.float16)
    crops = np.stack([np.arange(n), np.arange(n) * 2, np.arange(n) * 3], 1)
    return {"x": x, "x_tilde": xt, "crops": crops, "y": x, "y_hat": x, "f_x_tilde": xt}


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_crop_metrics_match_hand_computation():
    res = _result()
    df = analysis.crop_metrics(res, HalfMeans(), MeanMax(), NORM, denoiser="cnn10", batch_size=4)
    assert list(df.columns) == list(analysis.METRIC_COLUMNS) and len(df) == 5
    assert (df.denoiser == "cnn10").all() and df.crop.tolist() == list(range(5))
    assert df[["slice", "top", "left"]].to_numpy().tolist() == res["crops"].tolist()
    for i in range(5):
        x = (res["x"][i].astype(np.float64) + 500) / 250
        md, cv, cd = [], [], []
        for j in range(3):
            xt_hu = res["x_tilde"][i, j].astype(np.float64)
            xt = (xt_hu + 500) / 250
            md.append(np.abs(res["x"][i] - xt_hu).mean())
            cv.append(_cos([x[:, :4].mean(), x[:, 4:].mean(), 1.0],
                           [xt[:, :4].mean(), xt[:, 4:].mean(), 1.0]))
            cd.append(_cos([x.mean(), x.max(), 0.5], [xt.mean(), xt.max(), 0.5]))
        assert df.md[i] == pytest.approx(np.mean(md), rel=1e-6)
        assert df.s_vae[i] == pytest.approx(np.mean(cv), abs=1e-5)
        assert df.s_dml[i] == pytest.approx(np.mean(cd), abs=1e-5)
        assert df.rep_vae[i] == int(np.argmin(np.abs(np.array(cv) - np.mean(cv))))
        assert df.rep_dml[i] == int(np.argmin(np.abs(np.array(cd) - np.mean(cd))))


def test_identical_invariances_give_similarity_one_and_md_zero():
    res = _result()
    res["x_tilde"] = np.repeat(res["x"][:, None], 3, axis=1)
    df = analysis.crop_metrics(res, HalfMeans(), MeanMax(), NORM)
    assert np.allclose(df.md, 0.0) and np.allclose(df.s_vae, 1.0, atol=1e-6)
    assert np.allclose(df.s_dml, 1.0, atol=1e-6)


def test_metrics_table_and_samples_without_embedding():
    results = {"redcnn": _result(seed=1), "gaussri": _result(seed=2, spread=400.0)}
    df = analysis.metrics_table(results, HalfMeans(), None, NORM)
    assert df.denoiser.tolist() == ["redcnn"] * 5 + ["gaussri"] * 5 and df.s_dml.isna().all()
    samples = analysis.samples_by_method(df)
    assert list(samples) == ["redcnn", "gaussri"] and set(samples["redcnn"]) == {"md", "s_vae"}
    # Gauss+RI-like: larger changes -> higher MD
    assert samples["gaussri"]["md"].mean() > samples["redcnn"]["md"].mean()


def test_quantile_picks_and_figure_show_the_chosen_crops():
    results = {"redcnn": _result(n=9, seed=1), "gaussri": _result(n=9, seed=2, spread=300.0)}
    df = analysis.metrics_table(results, HalfMeans(), MeanMax(), NORM)
    q = (0.125, 0.375, 0.625, 0.875)
    for metric, rep in (("s_vae", "rep_vae"), ("s_dml", "rep_dml")):
        picks = analysis.quantile_picks(df, metric, q)
        for name in results:
            g = df[df.denoiser == name]
            assert picks[name].tolist() == g.crop.to_numpy()[stats.quantile_indices(g[metric], q)].tolist()
            assert np.all(np.diff(g.set_index("crop").loc[picks[name], metric]) >= 0)  # left to right
        fig = figures.quantile_figure(results, df, metric, q, figure=6)
        axes = np.array(fig.axes).reshape(2, 8)
        for r, name in enumerate(results):
            g = df[df.denoiser == name].set_index("crop")
            for k, i in enumerate(picks[name]):
                shown_x = np.asarray(axes[r, 2 * k].images[0].get_array())
                shown_xt = np.asarray(axes[r, 2 * k + 1].images[0].get_array())
                assert np.array_equal(shown_x, results[name]["x"][i])
                assert np.array_equal(shown_xt, results[name]["x_tilde"][i, g.at[i, rep]].astype(np.float32))
                assert axes[r, 2 * k].images[0].get_clim() == (-1350.0, 150.0)  # lung window
        caption = " ".join(t.get_text() for t in fig.texts)
        assert "C = -600 HU, W = 1500 HU" in caption and "Figure 6" in caption
        matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="s_vae"):
        figures.quantile_figure(results, df, "md")


def _known(rng, n, md, s):
    return pd.DataFrame({"md": rng.normal(md, 5, n), "s_vae": rng.normal(s, 0.02, n),
                         "s_dml": rng.normal(s, 0.02, n)})


def test_table2_is_one_sided_for_the_reference():
    """RED-CNN has more invariances than CNN-10 (stars) but fewer than Gauss+RI (no stars: the
    test is one-sided, a two-sided one would flag Gauss+RI too)."""
    rng = np.random.default_rng(0)
    parts = {"cnn10": _known(rng, 40, 50, 0.90), "redcnn": _known(rng, 40, 60, 0.80),
             "gaussri": _known(rng, 40, 70, 0.70)}
    metrics = pd.concat([d.assign(denoiser=k) for k, d in parts.items()], ignore_index=True)
    df, md = analysis.table2(metrics, reference="redcnn")
    cnn = df[df.method == "cnn10"]
    gri = df[df.method == "gaussri"]
    assert (cnn.stars == "***").all() and (cnn.p_raw < 1e-6).all()
    assert (gri.stars == "").all() and (gri.p_raw > 0.99).all()
    assert df[df.method == "redcnn"].p_raw.isna().all()
    assert df[df.most].method.unique().tolist() == ["gaussri"]
    assert "Gauss+RI" in md and "RED-CNN has more invariances" in md and r"\*\*\*" in md
    with pytest.raises(ValueError, match="analysis.reference"):
        analysis.table2(metrics[metrics.denoiser != "redcnn"], reference="redcnn")
    low = analysis.lowest_similarity(metrics)
    assert low == {"s_vae": True, "s_dml": True}
    assert analysis.lowest_similarity(metrics, "cnn10") == {"s_vae": False, "s_dml": False}
    assert analysis.lowest_similarity(metrics, "dugan") == {"s_vae": None, "s_dml": None}


def test_load_results_errors_name_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="04_invariances"):
        analysis.load_results(tmp_path, ["redcnn"])
    res = {**_result(), "mode": np.asarray("prior")}
    inv.save_invariances(tmp_path / "redcnn.npz", res)
    with pytest.raises(ValueError, match="04_invariances.*redcnn"):
        analysis.load_results(tmp_path, ["redcnn"])
    inv.save_invariances(tmp_path / "redcnn.npz", {**res, "mode": np.asarray("cinn")})
    out = analysis.load_results(tmp_path, ["redcnn"])
    assert out["redcnn"]["x_tilde"].shape == (5, 3, 8, 8)


def test_analyze_caches_metrics_and_keeps_only_figure_crops(tmp_path, monkeypatch):
    inv_dir = tmp_path / "inv"
    for k, name in enumerate(("redcnn", "gaussri")):
        inv.save_invariances(inv_dir / f"{name}.npz", {**_result(n=9, seed=k), "mode": np.asarray("cinn"),
                                                        "key": np.asarray(f"k{k}")})
    ckpt = tmp_path / "vae.pt"
    torch.save({"modules": {"vae": {"w": torch.ones(2)}}, "step": 1}, ckpt)
    key = metrics_key(inv_dir, ["redcnn", "gaussri"], [ckpt])
    cache = tmp_path / "analysis" / "metrics.csv"
    q = (0.125, 0.375, 0.625, 0.875)
    metrics, shown = analysis.analyze(inv_dir, ["redcnn", "gaussri"], HalfMeans(), MeanMax(), NORM, q,
                                      cache=cache, key=key)
    full = analysis.load_results(inv_dir, ["redcnn", "gaussri"])
    ref = analysis.metrics_table(full, HalfMeans(), MeanMax(), NORM)
    pd.testing.assert_frame_equal(metrics, ref)
    assert cache.is_file() and cache.with_suffix(".json").is_file()
    for name in full:
        picked = set()
        for m in ("s_vae", "s_dml"):
            picked |= set(analysis.quantile_picks(ref, m, q)[name].tolist())
        assert sorted(shown[name]["x"]) == sorted(picked)
        for i in picked:
            assert np.array_equal(shown[name]["x_tilde"][i], full[name]["x_tilde"][i])
    # the figure from the kept crops equals the one from the full sets
    a = figures.quantile_figure(full, ref, "s_dml", q)
    b = figures.quantile_figure(shown, metrics, "s_dml", q)
    for ax_a, ax_b in zip(a.axes, b.axes):
        assert np.array_equal(ax_a.images[0].get_array(), ax_b.images[0].get_array())
    # a second run reads the cache; another key (e.g. a retrained VAE) or force recomputes
    calls = []
    real = analysis.crop_metrics
    monkeypatch.setattr(analysis, "crop_metrics", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = analysis.analyze(inv_dir, ["redcnn", "gaussri"], HalfMeans(), MeanMax(), NORM, q,
                                cache=cache, key=key)
    assert calls == [] and np.allclose(again[["md", "s_vae", "s_dml"]], ref[["md", "s_vae", "s_dml"]])
    torch.save({"modules": {"vae": {"w": torch.zeros(2)}}, "step": 1}, ckpt)
    key2 = metrics_key(inv_dir, ["redcnn", "gaussri"], [ckpt])
    assert key2 != key
    analysis.analyze(inv_dir, ["redcnn", "gaussri"], HalfMeans(), MeanMax(), NORM, q, cache=cache, key=key2)
    assert len(calls) == 2
    analysis.analyze(inv_dir, ["redcnn", "gaussri"], HalfMeans(), MeanMax(), NORM, q, cache=cache,
                     key=key2, force=True)
    assert len(calls) == 4
    with pytest.raises(FileNotFoundError, match="04_invariances.*dugan"):
        metrics_key(inv_dir, ["redcnn", "dugan"], [ckpt])
