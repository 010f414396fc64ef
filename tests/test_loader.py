"""Crops, the patient-weighted sampler and normalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from invariscope.data.loader import (CropDataset, Normalizer, PatientWeightedCropSampler, fixed_crops,
                                     slice_weights, training_loader)


def test_every_patient_equally_likely(small_dataset):
    """Patients with 2..9 slices are drawn uniformly (chi-square), slices within a patient too."""
    s = PatientWeightedCropSampler(small_dataset, "train", 16, 8000, seed=3)
    idx = small_dataset.slice_index("train")
    patients = [idx[i][0] for i, _, _ in s]
    counts = np.array([patients.count(p) for p in small_dataset.patients("train")])
    assert stats.chisquare(counts).pvalue > 0.001
    assert counts.min() > 1700  # 2000 expected each; plain slice sampling would give P0 ~ 840
    p2 = [idx[i][1] for i, _, _ in s if idx[i][0] == "P2"]
    assert stats.chisquare(np.bincount(p2, minlength=9)).pvalue > 0.001


def test_weights_are_inverse_slice_counts(small_dataset):
    w = slice_weights(small_dataset, "train")
    assert w[:2].tolist() == [0.5, 0.5] and w[2:7].tolist() == [0.2] * 5


def test_sampler_reproducible_and_epochs_differ(small_dataset):
    a = PatientWeightedCropSampler(small_dataset, "train", 16, 50, seed=1)
    b = PatientWeightedCropSampler(small_dataset, "train", 16, 50, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    c = PatientWeightedCropSampler(small_dataset, "train", 16, 50, seed=2)
    assert list(c) != first


def test_crops_inside_and_cover_the_slice(small_dataset):
    crops = fixed_crops(small_dataset, "train", 16, 2000, seed=0)
    tops = np.array([t for _, t, _ in crops])
    lefts = np.array([l for _, _, l in crops])
    assert tops.min() == 0 and tops.max() == 48 - 16
    assert lefts.min() == 0 and lefts.max() == 48 - 16


def test_crop_content_and_normalization(small_dataset):
    ds = small_dataset
    crops = fixed_crops(ds, "test", 16, 5, seed=0)
    data = CropDataset(ds, "test", 16, crops=crops)
    norm = Normalizer.of(ds)
    for j, (i, _, _) in enumerate(crops):
        x, y = data[j]
        assert x.shape == y.shape == (1, 16, 16) and x.dtype == torch.float32
        k = ds.slice_index("test")[i][1]
        expected = (500.0 + k - norm.mean_hu) / norm.std_hu
        assert torch.allclose(y, torch.full_like(y, expected), atol=1e-5)
        assert torch.allclose(norm.to_hu(y), torch.full_like(y, 500.0 + k), atol=1e-3)


def test_training_loader_is_deterministic(small_dataset):
    def batches():
        loader = training_loader(small_dataset, 16, batch_size=4, samples_per_epoch=12, seed=5)
        return [x for x, _ in loader]

    a, b = batches(), batches()
    assert len(a) == 3 and all(torch.equal(u, v) for u, v in zip(a, b))


def test_crop_larger_than_slice(small_dataset):
    with pytest.raises(ValueError, match="crop size 64 exceeds"):
        PatientWeightedCropSampler(small_dataset, "train", 64, 10)
