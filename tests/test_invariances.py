"""Invariance sampling and its controls: known-answer control measures, sampling shapes and
determinism, storage round trip and chunk resume, cINN training resume and refusal."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_PIPELINE, make_dataset, tiny_sampling_models

from invariscope import figures
from invariscope.config.params import load_params
from invariscope.data.loader import fixed_crops
from invariscope.models.denoisers import GaussRI
from invariscope.models.spatial import ConvolutionalINN
from invariscope.stages import cinn_training as ct
from invariscope.stages import invariances as inv
from invariscope.stages import vae_training
from invariscope.stages.training import CheckpointMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ control measures
def _synthetic(n=3, m=12, size=64, inside_sd=0.0, outside_sd=0.0, band_sd=0.0, seed=0):
    """x̃ = a fixed image + noise whose SD differs inside / outside / in the band of the square."""
    rng = np.random.default_rng(seed)
    inside, outside = inv.region_masks(size, 30, 3)
    band = ~inside & ~outside
    sd_map = inside_sd * inside + outside_sd * outside + band_sd * band
    x = rng.normal(-500, 100, (n, size, size))
    xt = x[:, None] + rng.normal(0, 1, (n, m, size, size)) * sd_map
    return {"x": x.astype(np.float32), "y": (x - rng.normal(0, 20, x.shape)).astype(np.float32),
            "y_hat": x.astype(np.float32), "x_tilde": xt.astype(np.float16),
            "f_x_tilde": xt.astype(np.float16)}


def test_region_masks_counts():
    inside, outside = inv.region_masks(64, 30, 3)
    rows, cols = GaussRI().square_slices(64, 64)
    assert (rows.start, rows.stop) == (17, 47)
    assert inside.sum() == 24 * 24 and inside[20:44, 20:44].all()
    assert outside.sum() == 64 * 64 - 36 * 36 and not outside[14:50, 14:50].any()
    inside0, outside0 = inv.region_masks(64, 30, 0)
    assert inside0.sum() == 900 and outside0.sum() == 64 * 64 - 900
    # a 32 px crop has no pixel outside square + band: ratios are NaN, not an error
    assert not inv.region_masks(32, 30, 3)[1].any()


def test_ratio_huge_when_only_the_square_varies():
    res = _synthetic(inside_sd=100.0, outside_sd=0.5)
    m = inv.control_measures(res, None)
    assert m["sd_ratio_raw"] == pytest.approx(200.0, rel=0.1)
    assert m["sd_ratio_smoothed"] == pytest.approx(200.0, rel=0.15)  # both regions smooth alike
    assert math.isnan(m["sd_ratio_smoothed_prior"]) and math.isnan(m["output_change_hu_prior"])


def test_ratio_near_one_for_uniform_noise():
    m = inv.control_measures(_synthetic(inside_sd=30.0, outside_sd=30.0), None)
    assert m["sd_ratio_raw"] == pytest.approx(1.0, abs=0.05)
    assert m["sd_ratio_smoothed"] == pytest.approx(1.0, abs=0.08)


def test_band_is_left_out():
    m = inv.control_measures(_synthetic(inside_sd=10.0, outside_sd=10.0, band_sd=1000.0), None)
    assert m["sd_ratio_raw"] == pytest.approx(1.0, abs=0.05)


def test_smoothing_separates_fine_noise_from_coarse_changes():
    """Pixel noise everywhere plus a coarse change inside: smoothing raises the ratio."""
    rng = np.random.default_rng(1)
    res = _synthetic(inside_sd=0.0, outside_sd=0.0)
    n, m, s, _ = res["x_tilde"].shape
    inside, _ = inv.region_masks(s, 30, 3)
    coarse = rng.normal(0, 30, (n, m, 1, 1)) * inside  # a per-invariance offset of the square
    xt = res["x_tilde"].astype(np.float64) + rng.normal(0, 30, (n, m, s, s)) + coarse
    res["x_tilde"] = xt.astype(np.float16)
    meas = inv.control_measures(res, None)
    assert meas["sd_ratio_raw"] < 2.0 < 3.0 < meas["sd_ratio_smoothed"]


def test_changes_and_noise_levels_in_hu():
    rng = np.random.default_rng(2)
    x = rng.normal(-500, 50, (4, 64, 64))
    y = x - rng.normal(0, 20, x.shape)
    y_hat = x * 0.5
    xt = x[:, None] + np.where(rng.random((4, 8, 1, 1)) < 0.5, -10.0, 10.0)
    res = {"x": x.astype(np.float32), "y": y.astype(np.float32), "y_hat": y_hat.astype(np.float32),
           "x_tilde": xt.astype(np.float16), "f_x_tilde": (y_hat[:, None] + 2.0 + 0 * xt).astype(np.float16)}
    prior = dict(res, f_x_tilde=(y_hat[:, None] - 5.0 + 0 * xt).astype(np.float16))
    m = inv.control_measures(res, prior)
    assert set(m) == set(inv.MEASURES)
    assert m["input_change_hu"] == pytest.approx(10.0, abs=0.3)   # float16 steps of 0.25-0.5 HU
    assert m["output_change_hu"] == pytest.approx(2.0, abs=0.3)
    assert m["output_change_hu_prior"] == pytest.approx(5.0, abs=0.3)
    assert m["ld_noise_sd_hu"] == pytest.approx(20.0, rel=0.03)
    # ±10 HU per invariance, uniform over the crop: SD ~ 10 everywhere, ratio 1
    assert m["invariance_sd_hu"] == pytest.approx(10.0, rel=0.25)
    assert m["sd_ratio_raw"] == pytest.approx(1.0, abs=0.02)


def test_check_targets():
    rows = pd.DataFrame([
        {"denoiser": "gaussri", "sd_ratio_smoothed": 50.0, "sd_ratio_raw": 5.0,
         "sd_ratio_smoothed_prior": 4.0, "input_change_hu": 100.0, "output_change_hu": 10.0,
         "output_change_hu_prior": 30.0, "invariance_sd_hu": 5.0, "ld_noise_sd_hu": 100.0,
         "hf_share": 0.2, "hf_share_ld_noise": 0.9},
        {"denoiser": "cnn10", "sd_ratio_smoothed": 1.0, "sd_ratio_raw": 1.0,
         "sd_ratio_smoothed_prior": 1.0, "input_change_hu": 100.0, "output_change_hu": 60.0,
         "output_change_hu_prior": 30.0, "invariance_sd_hu": 45.0, "ld_noise_sd_hu": 100.0,
         "hf_share": 0.75, "hf_share_ld_noise": 0.9},
        {"denoiser": "redcnn", "sd_ratio_smoothed": 1.0, "sd_ratio_raw": 1.0,
         "sd_ratio_smoothed_prior": 1.0, "input_change_hu": 100.0, "output_change_hu": 10.0,
         "output_change_hu_prior": 30.0, "invariance_sd_hu": 55.0, "ld_noise_sd_hu": 100.0,
         "hf_share": 0.85, "hf_share_ld_noise": 0.9},
    ])
    t = inv.check_targets(rows)
    g, c, r = (t[t.denoiser == d] for d in ("gaussri", "cnn10", "redcnn"))
    assert len(g) == 4 and g.passed.all()          # no noise-level or spectrum target for Gauss+RI
    assert len(c) == 4 and not c.passed.any()      # SD 45 < 0.5 x 100; spectrum 0.15 away
    assert len(r) == 4 and r.passed.all()
    # the texture target's old threshold and no spectrum target
    old = inv.check_targets(rows, min_sd_fraction=0.25, max_hf_gap=None)
    assert len(old) == 4 + 3 + 3 and old[old.denoiser == "cnn10"].passed.sum() == 1


# ------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ds = make_dataset(tmp_path_factory.mktemp("inv") / "ds", size=48)
    f, vae, cinn = tiny_sampling_models()
    crops = fixed_crops(ds, "test", 32, 5, seed=0)
    return ds, f, vae, cinn, crops


def test_sampling_shapes_determinism_and_batch_independence(tiny):
    ds, f, vae, cinn, crops = tiny
    a = inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=7, progress=False)
    assert a["x"].shape == a["y"].shape == a["y_hat"].shape == (5, 32, 32)
    assert a["x_tilde"].shape == a["f_x_tilde"].shape == (5, 3, 32, 32)
    assert a["x_tilde"].dtype == np.float16 and a["x"].dtype == np.float32
    assert a["crops"].tolist() == [list(c) for c in crops]
    assert int(a["n_invariances"]) == 3 and not bool(a["prior"])
    b = inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=7, progress=False)
    for k in inv.ARRAY_KEYS:
        assert np.array_equal(a[k], b[k]), k
    c = inv.sample_invariances(f, vae, cinn, ds, crops, 3, 7, seed=7, chunk_crops=2, progress=False)
    assert np.allclose(c["x_tilde"].astype(np.float32), a["x_tilde"].astype(np.float32), atol=1.0)
    d = inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=8, progress=False)
    assert not np.allclose(d["x_tilde"].astype(np.float32), a["x_tilde"].astype(np.float32))
    # f(x̃) is Gauss+RI of x̃: constant fill value inside the square
    rows, cols = f.square_slices(32, 32)
    inside = a["f_x_tilde"][:, :, rows, cols].astype(np.float32)
    assert np.ptp(inside) == 0.0
    assert np.array_equal(a["y_hat"][:, rows, cols].min(), a["y_hat"][:, rows, cols].max())


def test_prior_ablation_uses_no_cinn_and_differs(tiny):
    ds, f, vae, cinn, crops = tiny
    p = inv.sample_invariances(f, vae, None, ds, crops, 3, 4, seed=7, prior=True, progress=False)
    a = inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=7, progress=False)
    assert p["x_tilde"].shape == (5, 3, 32, 32) and bool(p["prior"])
    assert np.array_equal(p["x"], a["x"])
    assert not np.array_equal(p["x_tilde"], a["x_tilde"])
    with pytest.raises(ValueError, match="cINN"):
        inv.sample_invariances(f, vae, None, ds, crops, 3, 4, seed=7, progress=False)
    # diagnostic: z̃ from the encoder's own posterior of each crop (same v), no cINN needed
    q = inv.sample_invariances(f, vae, None, ds, crops, 3, 4, seed=7, posterior=True, progress=False)
    assert str(q["mode"]) == "posterior" and not bool(q["prior"]) and str(p["mode"]) == "prior"
    assert q["x_tilde"].shape == p["x_tilde"].shape and not np.array_equal(q["x_tilde"], p["x_tilde"])
    with pytest.raises(ValueError, match="exclude"):
        inv.sample_invariances(f, vae, None, ds, crops, 3, 4, seed=7, prior=True, posterior=True)


def test_save_load_round_trip_cache_and_chunk_resume(tiny, tmp_path, monkeypatch):
    ds, f, vae, cinn, crops = tiny
    a = inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=7, progress=False)
    path = inv.save_invariances(tmp_path / "a.npz", a)
    back = inv.load_invariances(path)
    assert set(back) == set(a)
    for k in a:
        assert np.array_equal(back[k], a[k]) and back[k].dtype == a[k].dtype, k
    one = inv.load_invariances(path, crops=[2])
    assert one["x_tilde"].shape == (1, 3, 32, 32) and np.array_equal(one["x"][0], a["x"][2])

    # cached sampling: a file with the same key is reused, chunks are removed after merging
    target = tmp_path / "gaussri.npz"
    first = inv.sample_invariances_cached(target, f, vae, cinn, ds, crops, 3, 4, seed=7, models="m1",
                                          chunk_crops=2, progress=False)
    assert target.is_file() and not (tmp_path / "gaussri.chunks").exists()
    assert np.array_equal(first["x_tilde"], a["x_tilde"])
    calls = []
    real = inv._sample_chunk
    monkeypatch.setattr(inv, "_sample_chunk", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    again = inv.sample_invariances_cached(target, f, vae, cinn, ds, crops, 3, 4, seed=7, models="m1",
                                          chunk_crops=2, progress=False)
    assert calls == [] and np.array_equal(again["x_tilde"], a["x_tilde"])
    # other models: resampled
    inv.sample_invariances_cached(target, f, vae, cinn, ds, crops, 3, 4, seed=7, models="m2",
                                  chunk_crops=2, progress=False)
    assert len(calls) == 3

    # resume: chunks written by an interrupted run are reused, missing ones computed
    chunks = tmp_path / "chunks"
    inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=7, chunk_dir=chunks, chunk_crops=2,
                           key="k", progress=False)
    files = sorted(chunks.glob("chunk_*.npz"))
    assert len(files) == 3
    files[1].unlink()
    calls.clear()
    resumed = inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=7, chunk_dir=chunks,
                                     chunk_crops=2, key="k", progress=False)
    assert len(calls) == 1 and np.array_equal(resumed["x_tilde"], a["x_tilde"])
    calls.clear()
    inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=7, chunk_dir=chunks, chunk_crops=2,
                           key="other", progress=False)
    assert len(calls) == 3  # chunks of another key are not trusted


def test_figure5_draws_every_denoiser(tiny):
    import matplotlib

    matplotlib.use("Agg")
    ds, f, vae, cinn, crops = tiny
    a = inv.sample_invariances(f, vae, cinn, ds, crops, 3, 4, seed=7, progress=False)
    fig = figures.figure5({"gaussri": a, "cnn10": a}, crop_index=1)
    assert len(fig.axes) == 2 * 6 + 1  # + colour bar
    with pytest.raises(IndexError):
        figures.figure5({"gaussri": a}, crop_index=9)


# ------------------------------------------------------------------------ cINN training
_TINY = {**TINY_PIPELINE, "cinn.iterations": 4, "cinn.lr": 1e-3}


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("cinn")
    ds = make_dataset(root / "ds", size=48)
    params = load_params("smoke", _TINY)
    vae_training.train_vae("gaussri", params, ds, root / "vae", progress=False,
                           denoiser_dir=root / "den")
    return ds, params, root


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pool", [0, 6], ids=["fresh-crops", "latent-pool"])
def test_cinn_training_resume_equals_straight_run(trained_vae, tmp_path, pool):
    ds, _, root = trained_vae
    params = load_params("smoke", {**_TINY, "cinn.pool_crops": pool})
    dirs = dict(vae_dir=root / "vae", denoiser_dir=root / "den")
    straight = ct.train_cinn("gaussri", params, ds, tmp_path / "a", progress=False, **dirs)
    assert straight.steps == 4 and straight.best_step is not None
    assert math.isfinite(straight.best_val_nll) and not straight.model.training
    assert straight.model.is_initialized
    assert (tmp_path / "a" / "gaussri" / "latent_pool.pt").is_file() == (pool > 0)
    half = load_params("smoke", {**_TINY, "cinn.pool_crops": pool, "cinn.iterations": 2})
    ct.train_cinn("gaussri", half, ds, tmp_path / "b", progress=False, **dirs)
    resumed = ct.train_cinn("gaussri", params, ds, tmp_path / "b", progress=False, **dirs)
    assert torch.load(tmp_path / "b" / "gaussri" / "last.pt", weights_only=False)["step"] == 4
    s_a, s_b = _state(straight.model), _state(resumed.model)
    assert s_a.keys() == s_b.keys()
    for k in s_a:
        assert torch.equal(s_a[k], s_b[k]), k
    # load_cinn gives the best checkpoint, initialized (sampling works without a forward pass)
    loaded = ct.load_cinn("gaussri", params, ds, tmp_path / "a", **dirs)
    assert loaded.is_initialized
    for k, v in _state(loaded).items():
        assert torch.equal(v, s_a[k]), k
    z = loaded.sample(torch.zeros(2, 1, 32, 32), 3)
    assert z.shape == (2, 3, params.vae.latent_dim) and torch.isfinite(z).all()


def test_spatial_cinn_resumes_and_samples_maps(tmp_path):
    """The convolutional cINN: trains on the cVAE's pool (ŷ shared), resumes to the same weights,
    and its invariances decode to images through the spatial cVAE."""
    from conftest import TINY_SPATIAL

    ds = make_dataset(tmp_path / "ds", size=48)
    over = {**TINY_SPATIAL, "vae.crop_size": 32, "cinn.iterations": 4}
    params = load_params("smoke", over)
    root = tmp_path / "run"
    vae_training.train_vae("gaussri", params, ds, root / "vae", progress=False)
    dirs = dict(vae_dir=root / "vae", denoiser_dir=root / "den")
    straight = ct.train_cinn("gaussri", params, ds, root / "a", progress=False, **dirs)
    assert isinstance(straight.model, ConvolutionalINN) and straight.steps == 4
    assert len(list((root / "pools").glob("gaussri_8_*.pt"))) == 1   # one ŷ pool for both stages
    ct.train_cinn("gaussri", load_params("smoke", {**over, "cinn.iterations": 2}), ds, root / "b",
                  progress=False, **dirs)
    resumed = ct.train_cinn("gaussri", params, ds, root / "b", progress=False, **dirs)
    s_a, s_b = _state(straight.model), _state(resumed.model)
    for k in s_a:
        assert torch.equal(s_a[k], s_b[k]), k
    f, vae = ct.load_models("gaussri", params, ds, **dirs)
    cinn = ct.load_cinn("gaussri", params, ds, root / "a", **dirs)
    crops = fixed_crops(ds, "test", 32, 3, seed=0)
    res = inv.sample_invariances(f, vae, cinn, ds, crops, 4, 8, seed=1, progress=False)
    prior = inv.sample_invariances(f, vae, None, ds, crops, 4, 8, seed=1, prior=True, progress=False)
    assert res["x_tilde"].shape == prior["x_tilde"].shape == (3, 4, 32, 32)
    assert np.isfinite(res["x_tilde"].astype(np.float32)).all()
    m = inv.control_measures(res, prior)
    assert set(m) == set(inv.MEASURES)
    # (32² crops leave no outside region around the 30² square: the ratios are NaN here)
    assert all(np.isfinite(m[k]) for k in ("input_change_hu", "output_change_hu", "hf_share",
                                            "output_change_hu_prior", "invariance_sd_hu"))


def test_cinn_refuses_checkpoint_of_other_configuration(trained_vae, tmp_path):
    ds, params, root = trained_vae
    dirs = dict(vae_dir=root / "vae", denoiser_dir=root / "den")
    ct.train_cinn("gaussri", params, ds, tmp_path, progress=False, **dirs)
    other = load_params("smoke", {**_TINY, "cinn.lr": 5e-4})
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        ct.train_cinn("gaussri", other, ds, tmp_path, progress=False, **dirs)
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        ct.load_cinn("gaussri", other, ds, tmp_path, **dirs)
    # the same cinn params on another cVAE checkpoint are refused too
    vae2 = tmp_path / "vae2"
    vae_training.train_vae("gaussri", load_params("smoke", {**_TINY, "vae.iterations": 2}), ds, vae2,
                           progress=False, denoiser_dir=root / "den")
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        ct.train_cinn("gaussri", params, ds, tmp_path, progress=False, vae_dir=vae2,
                      denoiser_dir=root / "den")
    # and a missing cVAE says what to run
    with pytest.raises(FileNotFoundError, match="vae"):
        ct.train_cinn("gaussri", params, ds, tmp_path / "x", progress=False,
                      vae_dir=tmp_path / "none", denoiser_dir=root / "den")
