"""Invariance statistics: cosine similarities, quantile crops, Mann–Whitney + BH, Table 2."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from invariscope.evaluation.stats import (DEFAULT_QUANTILES, bh_adjust, compare_to_reference,
                                          cosine_similarity, mean_abs_difference, mean_similarity,
                                          quantile_indices, significance_stars, table2, write_table2)


def _one(ref, other, metric="s_vae", alt="less") -> pd.Series:
    df = compare_to_reference({"ref": {metric: ref}, "other": {metric: other}}, "ref", {metric: alt})
    assert len(df) == 1
    return df.iloc[0]


# (a) clear shift: correct direction tiny p, opposite direction ~1
def test_clear_shift_one_sided_direction():
    rng = np.random.default_rng(1)
    hi, lo = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 300)
    assert _one(hi, lo, "md", "greater").p_raw < 1e-10
    assert _one(hi, lo, "md", "less").p_raw > 0.999
    assert _one(lo, hi, "s_vae", "less").p_raw < 1e-10
    assert _one(lo, hi, "s_vae", "greater").p_raw > 0.999


# (b) identical distributions: p roughly uniform, false-positive rate ~5 %
def test_null_false_positive_rate():
    rng = np.random.default_rng(2)
    reps, n = 400, 30
    p = np.array([
        _one(rng.normal(size=n), rng.normal(size=n), "md", "greater").p_raw for _ in range(reps)
    ])
    k = int((p < 0.05).sum())
    lo, hi = sps.binom.ppf([1e-4, 1 - 1e-4], reps, 0.05)
    assert lo <= k <= hi, k
    assert sps.kstest(p, "uniform").pvalue > 1e-3


# (c) BH equals statsmodels and a hand computation
def test_bh_matches_statsmodels_and_hand():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    # sorted 0.01, 0.03, 0.04, 0.2 -> p_(i) m / i = 0.04, 0.06, 0.0533, 0.2 -> running min from the top
    expect = np.array([0.04, 0.16 / 3, 0.16 / 3, 0.2])
    np.testing.assert_allclose(bh_adjust(p), expect)
    np.testing.assert_allclose(multipletests(p, method="fdr_bh")[1], expect)
    np.testing.assert_allclose(bh_adjust([0.01, 0.02, 0.03, 0.04]), 0.04)
    assert bh_adjust([]).size == 0

    rng = np.random.default_rng(3)
    samples = {
        m: {"md": rng.normal(mu, 1, 50), "s_vae": rng.normal(-mu, 1, 50), "s_dml": rng.normal(0, 1, 50)}
        for m, mu in [("ref", 0.6), ("a", 0.0), ("b", 0.3), ("c", 0.55)]
    }
    df = compare_to_reference(samples, "ref")
    assert len(df) == 9 and list(df.method.unique()) == ["a", "b", "c"]
    np.testing.assert_allclose(df.p_bh, multipletests(df.p_raw, method="fdr_bh")[1])
    # hand BH on the very p-values of the DataFrame
    pr = df.p_raw.to_numpy()
    order = np.argsort(pr)
    adj = pr[order] * len(pr) / np.arange(1, len(pr) + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1].clip(max=1)
    hand = np.empty_like(adj)
    hand[order] = adj
    np.testing.assert_allclose(df.p_bh, hand)
    assert list(df.stars) == [significance_stars(x) for x in df.p_bh]


# (d) U statistic and p equal scipy's
def test_u_statistic_matches_scipy():
    rng = np.random.default_rng(4)
    x, y = rng.normal(0.2, 1, 37), rng.normal(0, 1, 45)
    for metric, alt in [("md", "greater"), ("s_vae", "less")]:
        row = _one(x, y, metric, alt)
        ref = sps.mannwhitneyu(x, y, alternative=alt)
        assert row.U == ref.statistic
        assert row.p_raw == pytest.approx(ref.pvalue, rel=1e-12)
        assert row.n_ref == 37 and row.n_other == 45 and row.alternative == alt
    # small, tie-free samples: exact test, and the known extreme U
    row = _one(np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0, 3.0]), "md", "greater")
    assert row.U == 9.0 and row.cles == 1.0
    assert row.p_raw == pytest.approx(1 / 20)  # 1 / C(6, 3)


# (e) direction for s_VAE: lower similarity of the reference is "more invariances"
def test_similarity_direction():
    rng = np.random.default_rng(5)
    low, high = rng.normal(0.85, 0.02, 200), rng.normal(0.90, 0.02, 200)
    samples = {"redcnn": {"s_vae": low}, "cnn10": {"s_vae": high}}
    assert compare_to_reference(samples, "redcnn").iloc[0].stars == "***"
    samples = {"redcnn": {"s_vae": high}, "cnn10": {"s_vae": low}}
    row = compare_to_reference(samples, "redcnn").iloc[0]
    assert row.alternative == "less" and row.p_raw > 0.99 and row.stars == ""


# (f) star thresholds (strict inequalities)
@pytest.mark.parametrize(
    "p, s",
    [(0.0, "***"), (0.00099, "***"), (0.001, "**"), (0.0099, "**"), (0.01, "*"), (0.0499, "*"),
     (0.05, ""), (0.5, ""), (1.0, ""), (float("nan"), "")],
)
def test_stars(p, s):
    assert significance_stars(p) == s


# (g) cosine similarity
def test_cosine_similarity_hand_and_scale():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [4.0, 3.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [0.0, 1.0, 24 / 25])
    np.testing.assert_allclose(cosine_similarity(-a, b), [0.0, -1.0, -24 / 25])
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(5, 16)), rng.normal(size=(5, 7, 16))
    s = cosine_similarity(x, y)
    assert s.shape == (5, 7)
    scale = rng.uniform(0.1, 10, size=(5, 7, 1))
    np.testing.assert_allclose(cosine_similarity(3.0 * x, scale * y), s, rtol=1e-12)
    hand = np.einsum("nd,nmd->nm", x, y) / (
        np.linalg.norm(x, axis=-1)[:, None] * np.linalg.norm(y, axis=-1)
    )
    np.testing.assert_allclose(s, hand, rtol=1e-12)
    assert np.all(np.abs(s) <= 1)
    assert cosine_similarity(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0

    ms = mean_similarity(x, y)
    assert ms.shape == (5,)
    np.testing.assert_allclose(ms, hand.mean(1))
    # identical invariances -> 1
    np.testing.assert_allclose(mean_similarity(x, np.repeat(x[:, None], 4, 1)), 1.0)

    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    ts = mean_similarity(tx, ty)
    assert isinstance(ts, torch.Tensor) and ts.shape == (5,)
    np.testing.assert_allclose(ts.numpy(), ms, rtol=1e-10)
    np.testing.assert_allclose(
        cosine_similarity(tx, ty).numpy(),
        torch.nn.functional.cosine_similarity(tx[:, None], ty, dim=-1).numpy(), rtol=1e-10,
    )
    with pytest.raises(ValueError):
        mean_similarity(x, y[:, :, :8])


def test_mean_abs_difference():
    x = np.zeros((2, 4, 4))
    xinv = np.stack([np.full((3, 4, 4), 10.0), np.full((3, 4, 4), -2.0)])
    np.testing.assert_allclose(mean_abs_difference(x, xinv), [10.0, 2.0])
    t = mean_abs_difference(torch.from_numpy(x), torch.from_numpy(xinv))
    np.testing.assert_allclose(t.numpy(), [10.0, 2.0])


# (h) quantile selection
def test_quantile_indices_known_array():
    rng = np.random.default_rng(7)
    perm = rng.permutation(101)
    values = np.arange(101.0)[perm]  # values[i] = perm[i]
    idx = quantile_indices(values)
    assert len(set(idx.tolist())) == 4
    # targets 12.5, 37.5, 62.5, 87.5: ties resolved to the lower rank
    np.testing.assert_array_equal(values[idx], [12, 37, 62, 87])
    idx = quantile_indices(values, (0, 0.5, 1))
    np.testing.assert_array_equal(values[idx], [0, 50, 100])
    np.testing.assert_array_equal(idx, [np.flatnonzero(perm == v)[0] for v in (0, 50, 100)])
    assert DEFAULT_QUANTILES == (0.125, 0.375, 0.625, 0.875)


def test_quantile_indices_duplicates_distinct_deterministic():
    idx = quantile_indices(np.ones(10))
    assert len(set(idx.tolist())) == 4
    np.testing.assert_array_equal(idx, quantile_indices(np.ones(10)))
    # all quantiles hit the same value -> still distinct items
    v = np.array([0.0, 5.0, 5.0, 5.0, 5.0, 5.0, 9.0])
    idx = quantile_indices(v, (0.4, 0.5, 0.5, 0.6))
    assert len(set(idx.tolist())) == 4 and np.all(v[idx] == 5.0)
    np.testing.assert_array_equal(quantile_indices(torch.arange(5.0), (0, 1)), [0, 4])
    with pytest.raises(ValueError):
        quantile_indices([1.0, 2.0], (0.1, 0.2, 0.3))
    with pytest.raises(ValueError):
        quantile_indices([1.0, np.nan, 2.0], (0.5,))
    with pytest.raises(ValueError):
        quantile_indices([1.0, 2.0], (1.5,))


# (i) Table 2
def _table_samples():
    rng = np.random.default_rng(8)
    n = 150
    return {
        # redcnn: most invariances in MD and s_VAE; dugan: lowest s_DML (reference not best there)
        "cnn10": {"md": rng.normal(20, 2, n), "s_vae": rng.normal(0.90, 0.02, n), "s_dml": rng.normal(0.80, 0.05, n)},
        "redcnn": {"md": rng.normal(24, 2, n), "s_vae": rng.normal(0.85, 0.02, n), "s_dml": rng.normal(0.80, 0.05, n)},
        "wganvgg": {"md": rng.normal(23.9, 2, n), "s_vae": rng.normal(0.90, 0.02, n), "s_dml": rng.normal(0.90, 0.05, n)},
        "dugan": {"md": rng.normal(21, 2, n), "s_vae": rng.normal(0.86, 0.02, n), "s_dml": rng.normal(0.70, 0.05, n)},
    }


def test_table2_bold_stars_and_files(tmp_path):
    samples = _table_samples()
    df, md = table2(samples)
    assert len(df) == 12 and set(df.columns) >= {"method", "metric", "mean", "sd", "p_raw", "p_bh", "stars"}
    most = df[df.most].set_index("metric").method.to_dict()
    assert most == {"md": "redcnn", "s_vae": "redcnn", "s_dml": "dugan"}
    star = df.set_index(["method", "metric"]).stars
    assert star["cnn10", "md"] == "***" and star["cnn10", "s_vae"] == "***"
    assert star["wganvgg", "md"] == ""  # tiny shift, not significant
    assert star["wganvgg", "s_dml"] == "***"
    assert star["dugan", "s_dml"] == ""  # reference has fewer invariances here
    assert all(star["redcnn", m] == "" for m in ("md", "s_vae", "s_dml"))
    assert df[df.method == "redcnn"].p_raw.isna().all()
    # numbers in the frame
    r = df.set_index(["method", "metric"]).loc["cnn10", "md"]
    assert r["mean"] == pytest.approx(samples["cnn10"]["md"].mean())
    assert r["sd"] == pytest.approx(samples["cnn10"]["md"].std(ddof=1))
    comp = compare_to_reference(samples, "redcnn").set_index(["method", "metric"])
    assert r["p_bh"] == pytest.approx(comp.loc[("cnn10", "md"), "p_bh"])

    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    red, cnn, dug = lines["RED-CNN"], lines["CNN-10"], lines["DU-GAN"]
    m = samples["redcnn"]["md"]
    assert f"**{m.mean():.1f} ± {m.std(ddof=1):.1f}**" in red
    s = samples["cnn10"]["s_vae"]
    assert f"{s.mean():.3f} ± {s.std(ddof=1):.3f}" + r"\*\*\*" in cnn
    assert "*" not in red.replace("**", "")  # reference: bold only, no stars
    assert dug.count("**") == 2  # bold s_DML cell only
    assert "Benjamini–Hochberg" in md

    csv_path, md_path = write_table2(df, md, tmp_path / "out")
    assert md_path.read_text() == md
    back = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    assert len(back) == 12
    np.testing.assert_allclose(back["mean"], df["mean"])
    assert back.loc[(back.method == "cnn10") & (back.metric == "md"), "stars"].item() == "***"
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_table2_missing_metric():
    samples = _table_samples()
    del samples["wganvgg"]["s_dml"]
    df, md = table2(samples, metrics=("md", "s_vae", "s_dml", "s_other"), labels={"cnn10": "CNN10x"})
    assert set(df.metric) == {"md", "s_vae", "s_dml"} and len(df) == 11
    assert "CNN10x" in md and "–" in md
    assert "over 8 comparisons" in md
