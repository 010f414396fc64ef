"""Physics tests of the parallel-beam projector, FBP and the dose simulation (small sizes)."""

from __future__ import annotations

import numpy as np
import pytest

from invariscope.data import ctsim

SIZE, FOV, VIEWS = 96, 192.0, 120  # pixel 2 mm


@pytest.fixture(scope="module")
def proj() -> ctsim.ParallelBeamProjector:
    return ctsim.get_projector(SIZE, FOV, VIEWS)


def disc(size: int, fov: float, radius: float, value: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    """Antialiased uniform disc (8× supersampled) in the projector's pixel convention."""
    ss = 8
    d = fov / size
    c = ((np.arange(size * ss) + 0.5) / ss - size / 2) * d
    x, y = np.meshgrid(c, -c)  # y up, row 0 at the top
    m = ((x - cx) ** 2 + (y - cy) ** 2 <= radius**2).reshape(size, ss, size, ss).mean(axis=(1, 3))
    return (value * m).astype(np.float32)


def radius_map(size: int, fov: float) -> np.ndarray:
    d = fov / size
    c = (np.arange(size) - (size - 1) / 2) * d
    x, y = np.meshgrid(c, c)
    return np.hypot(x, y)


def water_cylinder(radius: float = 60.0, n: int = 8) -> np.ndarray:
    """HU phantom: water cylinder (0 HU) in air (−1000 HU), ``n`` identical slices."""
    frac = disc(SIZE, FOV, radius)
    hu = -1000.0 + 1000.0 * frac
    return np.repeat(hu[None], n, axis=0).astype(np.float32)


def test_geometry_defaults() -> None:
    assert ctsim.default_n_det(256) == int(np.ceil(256 * np.sqrt(2))) + 4
    p = ctsim.ParallelBeamProjector(32, 64.0, 10)
    assert p.n_det == ctsim.default_n_det(32)
    assert p.pixel_mm == pytest.approx(2.0)
    assert ctsim.get_projector(SIZE, FOV, VIEWS) is ctsim.get_projector(SIZE, FOV, VIEWS)


def test_adjointness(proj: ctsim.ParallelBeamProjector) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, SIZE, SIZE)).astype(np.float32)
    y = rng.standard_normal((3, VIEWS, proj.n_det)).astype(np.float32)
    lhs = np.dot(proj.forward(x).ravel().astype(np.float64), y.ravel())
    rhs = np.dot(x.ravel().astype(np.float64), proj.backproject(y).ravel())
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # the explicit matrix is the same operator
    a = proj.matrix
    assert a.shape == (VIEWS * proj.n_det, SIZE * SIZE)
    np.testing.assert_allclose(a @ x[0].ravel(), proj.forward(x[0]).ravel(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(a.T @ y[1].ravel(), proj.backproject(y[1]).ravel(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("footprint", ["box", "linear"])
def test_disc_projection_is_chord_length(footprint: str) -> None:
    p = ctsim.ParallelBeamProjector(SIZE, FOV, VIEWS, footprint=footprint)
    r = 70.0
    sino = p.forward(disc(SIZE, FOV, r))
    s = (np.arange(p.n_det) - (p.n_det - 1) / 2) * p.det_spacing_mm
    chord = 2 * np.sqrt(np.maximum(r**2 - s**2, 0.0))
    inner = np.abs(s) < r - 2 * p.pixel_mm
    err = np.abs(sino[:, inner] - chord[None, inner])
    # every view integrates to the disc area (mm²)
    np.testing.assert_allclose(sino.sum(axis=1) * p.det_spacing_mm, np.pi * r**2, rtol=5e-3)
    if footprint == "box":  # ripple-free: < 1 % of the diameter everywhere inside
        assert err.max() < 0.01 * 2 * r
    else:  # point sampling ripples, but is right on average
        assert err.mean() < 0.01 * 2 * r


@pytest.mark.parametrize("filt", ["ram-lak", "shepp-logan", "hann"])
def test_fbp_recovers_disc_value(proj: ctsim.ParallelBeamProjector, filt: str) -> None:
    r, value = 60.0, 0.02
    img = disc(SIZE, FOV, r, value)
    rec = proj.fbp(proj.forward(img), filter=filt)
    rad = radius_map(SIZE, FOV)
    centre = rec[rad < r / 2]
    assert centre.mean() == pytest.approx(value, rel=0.01)
    assert np.abs(centre - value).max() < 0.03 * value
    assert np.abs(rec[rad > r + 10]).mean() < 0.01 * value  # background stays empty
    # off-centre disc
    img2 = disc(SIZE, FOV, 25.0, value, cx=30.0, cy=-20.0)
    rec2 = proj.fbp(proj.forward(img2), filter=filt)
    c = (np.arange(SIZE) - (SIZE - 1) / 2) * (FOV / SIZE)
    x, y = np.meshgrid(c, -c)
    inside = np.hypot(x - 30.0, y + 20.0) < 25.0 - 6.0
    assert rec2[inside].mean() == pytest.approx(value, rel=0.01)


def test_fbp_rejects_unknown_filter(proj: ctsim.ParallelBeamProjector) -> None:
    with pytest.raises(ValueError):
        proj.fbp(np.zeros((VIEWS, proj.n_det), np.float32), filter="cosine")


def test_hu_mu_roundtrip() -> None:
    hu = np.array([-1000.0, -500.0, 0.0, 40.0, 1000.0], np.float32)
    mu = ctsim.hu_to_mu(hu, 0.02)
    np.testing.assert_allclose(mu, [0.0, 0.01, 0.02, 0.0208, 0.04], rtol=1e-6)
    np.testing.assert_allclose(ctsim.mu_to_hu(mu, 0.02), hu, atol=1e-3)
    assert ctsim.hu_to_mu(np.float32(-1200.0)) == 0.0  # clipped at 0


def _noise(dose: float, photons: float, seed: int = 1) -> tuple[float, float, float, float]:
    """(sd_low, sd_full, bias_low, bias_full) in HU in the central ROI of a water cylinder."""
    proj = ctsim.get_projector(SIZE, FOV, VIEWS)
    hu = water_cylinder()
    ref = ctsim.reconstruct_noiseless(hu[:1], proj)[0]
    low, full = ctsim.simulate_dose_pair(
        hu, projector=proj, full_dose_photons=photons, dose_fraction=dose, rng=np.random.default_rng(seed)
    )
    roi = radius_map(SIZE, FOV) < 35.0
    dl, df = (low - ref)[:, roi], (full - ref)[:, roi]
    return float(dl.std()), float(df.std()), float(dl.mean()), float(df.mean())


@pytest.mark.parametrize("dose", [0.1, 0.25])
def test_noise_ratio_follows_sqrt_dose(dose: float) -> None:
    sd_low, sd_full, _, _ = _noise(dose, ctsim.DEFAULT_FULL_DOSE_PHOTONS)
    assert sd_low / sd_full == pytest.approx(np.sqrt(1.0 / dose), rel=0.10)


@pytest.mark.parametrize("photons", [ctsim.DEFAULT_FULL_DOSE_PHOTONS, 1.0e5])
def test_mean_bias_small(photons: float) -> None:
    _, _, bias_low, bias_full = _noise(0.1, photons)
    assert abs(bias_low) < 5.0
    assert abs(bias_full) < 5.0


def test_soft_tissue_bias_of_chest_phantoms_at_default_dose() -> None:
    """Mean low-/full-dose bias in the soft tissue of chest slices (default geometry) < 5 HU."""
    from scipy.ndimage import binary_erosion

    from invariscope.data import phantom

    rng = np.random.default_rng(3)
    proj = ctsim.get_projector(256, 400.0, 360)
    hu = np.concatenate([phantom.render_slices(phantom.sample_anatomy(rng), 2, 256, 400.0, rng)
                         for _ in range(4)])
    low, full = ctsim.simulate_dose_pair(hu, projector=proj, rng=rng)
    ref = ctsim.reconstruct_noiseless(hu, proj)
    soft = np.stack([binary_erosion((h > -20) & (h < 100), iterations=2) for h in hu])
    assert abs((low - ref)[soft].mean()) < 5.0
    assert abs((full - ref)[soft].mean()) < 5.0


def test_noiseless_reconstruction_matches_phantom() -> None:
    proj = ctsim.get_projector(SIZE, FOV, VIEWS)
    hu = water_cylinder(n=1)
    ref = ctsim.reconstruct_noiseless(hu, proj)
    roi = radius_map(SIZE, FOV) < 40.0
    assert np.abs(ref[0][roi]).mean() < 10.0  # water is 0 HU


def test_reproducible_and_seed_dependent() -> None:
    proj = ctsim.get_projector(SIZE, FOV, VIEWS)
    hu = water_cylinder(n=2)
    a = ctsim.simulate_dose_pair(hu, projector=proj, rng=np.random.default_rng(5))
    b = ctsim.simulate_dose_pair(hu, projector=proj, rng=np.random.default_rng(5))
    c = ctsim.simulate_dose_pair(hu, projector=proj, rng=np.random.default_rng(6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a, c):
        assert not np.allclose(x, y)
    # the two doses have independent noise, and slices get different noise
    assert not np.allclose(a[0], a[1])
    assert not np.allclose(a[1][0], a[1][1])


def test_shapes_dtypes_and_chunking() -> None:
    proj = ctsim.get_projector(32, 64.0, 30)
    hu = np.zeros((20, 32, 32), np.float32)  # more slices than one internal chunk
    low, full = ctsim.simulate_dose_pair(hu, projector=proj, rng=np.random.default_rng(0))
    assert low.shape == full.shape == hu.shape
    assert low.dtype == full.dtype == np.float32
    lo1, fu1 = ctsim.simulate_dose_pair(hu[0], projector=proj, rng=np.random.default_rng(0))
    assert lo1.shape == fu1.shape == (32, 32)
    assert proj.forward(hu).shape == (20, 30, proj.n_det)
    assert proj.fbp(proj.forward(hu[0])).shape == (32, 32)


def test_smoother_filters_reduce_noise() -> None:
    proj = ctsim.get_projector(SIZE, FOV, VIEWS)
    hu = water_cylinder(n=4)
    roi = radius_map(SIZE, FOV) < 35.0
    sds = []
    for filt in ("ram-lak", "shepp-logan", "hann"):
        ref = ctsim.reconstruct_noiseless(hu[:1], proj, filter=filt)[0]
        low, _ = ctsim.simulate_dose_pair(hu, projector=proj, rng=np.random.default_rng(3), filter=filt)
        sds.append((low - ref)[:, roi].std())
    assert sds[0] > sds[1] > sds[2]
