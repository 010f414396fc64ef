"""Tests of the procedural chest phantom (small sizes, a few seconds)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from invariscope.data import phantom
from invariscope.data.phantom import ChestAnatomy, Lesion

SIZE, FOV = 128, 400.0


def patient(seed: int) -> tuple[ChestAnatomy, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return phantom.sample_anatomy(rng), rng


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    an, rng = patient(0)
    return phantom.render_slices(an, 6, SIZE, FOV, rng)


def test_anatomy_is_frozen_and_reproducible() -> None:
    a, _ = patient(3)
    b, _ = patient(3)
    c, _ = patient(4)
    assert a == b and a != c
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.fat_lat_mm = 1.0  # type: ignore[misc]
    assert len(a.ribs) >= 10 and len(a.vessels) >= 40 and len(a.airways) >= 6
    assert any(les.kind != "lung" for les in a.lesions)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_shape_dtype_n_slices(n: int) -> None:
    an, rng = patient(1)
    out = phantom.render_slices(an, n, 64, FOV, rng)
    assert out.shape == (n, 64, 64)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert len(phantom.slice_positions(an, n)) == n


def test_render_reproducible_given_rng() -> None:
    an, _ = patient(2)
    a = phantom.render_slices(an, 2, 64, FOV, np.random.default_rng(9))
    b = phantom.render_slices(an, 2, 64, FOV, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)


def test_tissue_hu_ranges(slices: np.ndarray) -> None:
    img = slices
    assert img.min() >= -1000.0 - 1e-3
    assert img.max() < 1100.0
    # air outside the body (corners) is exactly -1000
    assert np.all(img[:, :4, :4] == -1000.0)

    def frac(lo: float, hi: float) -> float:
        return float(((img >= lo) & (img <= hi)).mean())

    assert frac(-950, -750) > 0.05  # lung parenchyma
    assert frac(-130, -70) > 0.02  # subcutaneous / mediastinal fat
    assert frac(20, 80) > 0.05  # muscle, heart, blood, liver
    assert frac(500, 1100) > 0.0005  # cortical bone
    assert frac(150, 400) > 0.0005  # cancellous bone / marrow
    # lungs: mean around -850 HU
    lung = img[(img > -950) & (img < -700)]
    assert -900 < lung.mean() < -780


def body_width_mm(img: np.ndarray) -> float:
    cols = np.flatnonzero((img > -500).any(axis=0))
    return (cols[-1] - cols[0] + 1) * FOV / img.shape[-1]


def test_patient_variation() -> None:
    widths, fats, depths = [], [], []
    for seed in range(10):
        an, rng = patient(100 + seed)
        mid = phantom.render_slices(an, 1, SIZE, FOV, rng)[0]
        widths.append(body_width_mm(mid))
        depths.append(an.body_depth_mm)
        fats.append(an.fat_lat_mm)
        assert abs(body_width_mm(mid) - an.body_width_mm * (1 + an.taper * (0.5 - (an.z_start + an.z_end) / 2))) < 12
    widths = np.array(widths)
    assert widths.max() / widths.min() > 1.12
    assert widths.std() > 10.0
    assert max(fats) - min(fats) > 15.0
    assert np.ptp(depths) > 20.0
    # the body always stays inside the reconstruction circle
    for seed in range(30):
        an, _ = patient(200 + seed)
        assert an.body_width_mm / 2 < FOV / 2


def test_smooth_z_variation() -> None:
    an, rng = patient(5)
    img = phantom.render_slices(an, 12, 96, FOV, rng)
    adjacent = np.abs(np.diff(img, axis=0)).mean(axis=(1, 2))
    far = np.abs(img[-1] - img[0]).mean()
    assert adjacent.max() < 0.6 * far
    assert adjacent.mean() < 0.35 * far
    # nothing jumps: the body outline is (almost) the same in adjacent slices
    body = img > -995
    assert (body[1:] != body[:-1]).mean() < 0.01


def test_lesions_are_low_contrast_and_local() -> None:
    an, _ = patient(6)
    z = (an.z_start + an.z_end) / 2
    wall = Lesion("wall", 1, 1.6, 0.5, z, 5.0, 8.0, 30.0)
    nodule = Lesion("lung", -1, 0.0, 0.0, z, 5.0, 6.0, 40.0)
    base = dataclasses.replace(an, lesions=())
    with_les = dataclasses.replace(an, lesions=(wall, nodule))
    a = phantom.render_slices(base, 1, 256, FOV, np.random.default_rng(0))[0]
    b = phantom.render_slices(with_les, 1, 256, FOV, np.random.default_rng(0))[0]
    diff = b - a
    changed = np.abs(diff) > 1.0
    area_mm2 = changed.sum() * (FOV / 256) ** 2
    assert 2 * np.pi * 25 * 0.6 < area_mm2 < 2 * np.pi * 25 * 2.0  # two ~10 mm discs
    soft = diff[(diff > 1.0) & (diff < 35.0)]
    assert soft.size > 0 and soft.max() == pytest.approx(30.0, abs=1.0)  # wall lesion contrast
    assert diff.max() > 500.0  # solid nodule replaces lung (~ -850 -> +40)


def test_render_speed() -> None:
    an, rng = patient(7)
    phantom.render_slices(an, 1, 256, FOV, rng)  # warm-up
    t = time.perf_counter()
    phantom.render_slices(an, 4, 256, FOV, rng)
    per_slice = (time.perf_counter() - t) / 4
    assert per_slice < 0.25  # typically ~20 ms; generous for loaded CI machines
