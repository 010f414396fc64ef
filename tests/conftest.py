"""Shared fixtures: small synthetic datasets in the on-disk format."""

from __future__ import annotations

import numpy as np
import pytest

from invariscope.dataset import CTDataset, DatasetWriter


def make_dataset(root, slices=(2, 5, 9, 3, 4, 6), size=48, seed=0) -> CTDataset:
    """Patients P0.. with the given slice counts; P0..P3 train, P4 val, P5 test.

    Low dose = full dose + Gaussian noise; every pixel of patient i, slice k has full-dose
    value 100*i + k (HU), so crops can be traced back to their source.
    """
    rng = np.random.default_rng(seed)
    splits = ["train"] * (len(slices) - 2) + ["val", "test"]
    w = DatasetWriter(root, source="simulated", params={"test": True})
    for i, (n, split) in enumerate(zip(slices, splits)):
        full = np.broadcast_to((100.0 * i + np.arange(n))[:, None, None], (n, size, size)).copy()
        low = full + rng.normal(0, 20, full.shape)
        w.add_patient(f"P{i}", split, low, full, pixel_spacing_mm=1.5)
    return w.finalize()


@pytest.fixture
def small_dataset(tmp_path) -> CTDataset:
    return make_dataset(tmp_path / "ds")
