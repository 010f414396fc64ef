"""Metrics: lung-window SSIM/PSNR and clipped RMSE, checked against scikit-image and ldct-benchmark."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from invariscope.evaluation.metrics import (HU_CLIP, LUNG_WINDOW, evaluate_slices, psnr_lung, rmse_hu,
                                            ssim_lung, summarize, window)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """A natural image (scikit-image's bundled 'camera') mapped to [-1200, 2200] HU, and a noisy copy."""
    cam = skdata.camera()[::2, ::2].astype(np.float64)  # 256 x 256
    target = cam / 255.0 * 3400.0 - 1200.0
    rng = np.random.default_rng(0)
    pred = target + rng.normal(0.0, 60.0, target.shape)
    return pred, target


def test_window_values():
    c, w = LUNG_WINDOW
    x = np.array([-3000.0, c - w / 2, c - 0.5, c + w / 2, 5000.0])
    np.testing.assert_allclose(window(x), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-3)
    assert window(np.array([c - 0.5]))[0] == 0.5
    assert window(x).min() >= 0 and window(x).max() <= 1


def test_ssim_psnr_equal_skimage(images):
    pred, target = images
    t, p = window(target), window(pred)
    ssim_ref = structural_similarity(t, p, data_range=1.0)
    psnr_ref = peak_signal_noise_ratio(t, p, data_range=1.0)
    assert ssim_lung(pred, target) == pytest.approx(ssim_ref, abs=1e-12)
    assert psnr_lung(pred, target) == pytest.approx(psnr_ref, abs=1e-10)
    assert ssim_lung(target, target) == pytest.approx(1.0)
    assert psnr_lung(target, target) == float("inf")
    assert 0 < ssim_lung(pred, target) < 1


def test_psnr_constant_offset():
    rng = np.random.default_rng(1)
    target = rng.uniform(-1000.0, -200.0, (64, 64))  # inside the lung window: no clipping
    offset = 30.0
    expected = 20.0 * np.log10((LUNG_WINDOW[1] - 1.0) / offset)
    assert psnr_lung(target + offset, target) == pytest.approx(expected, abs=1e-9)
    assert rmse_hu(target + offset, target) == pytest.approx(offset)


def test_rmse_clipping():
    lo, hi = HU_CLIP
    t = np.full((8, 8), lo)
    assert rmse_hu(np.full((8, 8), -3000.0), t) == 0.0
    assert rmse_hu(np.full((8, 8), 3000.0), np.full((8, 8), hi)) == 0.0
    p = t.copy()
    p[:4] = 3000.0  # half the pixels clipped to 1900: error 2924 on half of them
    assert rmse_hu(p, t) == pytest.approx(np.sqrt(0.5 * (hi - lo) ** 2))


def test_evaluate_slices_and_summarize(images):
    pred, target = images
    stack_p = np.stack([pred, target, pred[::-1]])
    stack_t = np.stack([target, target, target[::-1]])
    res = evaluate_slices(stack_p, stack_t)
    assert set(res) == {"ssim", "psnr", "rmse"}
    assert all(v.shape == (3,) for v in res.values())
    assert res["ssim"][0] == pytest.approx(ssim_lung(pred, target))
    assert res["ssim"][1] == pytest.approx(1.0) and res["rmse"][1] == 0.0
    assert res["psnr"][2] == pytest.approx(res["psnr"][0])
    single = evaluate_slices(pred, target)
    assert single["rmse"].shape == (1,)
    assert evaluate_slices(stack_p[:, None], stack_t[:, None])["ssim"].shape == (3,)
    with pytest.raises(ValueError):
        evaluate_slices(stack_p, stack_t[:2])
    mean, sd = summarize([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and sd == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert summarize([5.0]) == (5.0, 0.0)


def _authors_apply_center_width():
    spec = importlib.util.find_spec("ldctbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ldct-benchmark (ldctbench) is not installed in this environment")
    pytest.importorskip("yaml", reason="ldctbench.utils.auxiliaries needs PyYAML")
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "auxiliaries.py"
    mod_spec = importlib.util.spec_from_file_location("_ldctbench_auxiliaries", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.apply_center_width


def test_matches_ldctbench_compute_metric(images):
    """Replays ldct-benchmark's compute_metric (values in HU + 1024, float32, center 1024-600)."""
    apply_center_width = _authors_apply_center_width()
    pred, target = images
    p32 = (pred + 1024.0).astype(np.float32)
    t32 = (target + 1024.0).astype(np.float32)
    c, w = 1024 - 600, 1500
    tw, pw = apply_center_width(t32, center=c, width=w), apply_center_width(p32, center=c, width=w)
    np.testing.assert_allclose(window(target), tw, atol=1e-6)
    ssim_ref = structural_similarity(tw, pw, data_range=1.0)
    psnr_ref = 10 * np.log10(1.0 / mean_squared_error(tw, pw))
    rmse_ref = np.sqrt(mean_squared_error(np.clip(t32, 0.0, 2924.0), np.clip(p32, 0.0, 2924.0)))
    assert ssim_lung(pred, target) == pytest.approx(ssim_ref, abs=1e-5)
    assert psnr_lung(pred, target) == pytest.approx(psnr_ref, abs=1e-4)
    assert rmse_hu(pred, target) == pytest.approx(rmse_ref, rel=1e-5)
