"""The shared on-disk format: round trip, HU clipping, resume and damage detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_dataset

from invariscope import atomic
from invariscope.data.dataset import CTDataset, DatasetError, DatasetWriter, to_hu_int16


def test_round_trip(small_dataset):
    ds = small_dataset
    assert ds.patients("train") == ["P0", "P1", "P2", "P3"]
    assert ds.patients("val") == ["P4"] and ds.patients("test") == ["P5"]
    assert ds.info("P2").n_slices == 9
    full = ds.volume("P2", "full")
    assert full.dtype == np.int16 and full.shape == (9, 48, 48)
    assert np.all(full[3] == 203)
    assert len(ds.slice_index("train")) == 2 + 5 + 9 + 3


def test_normalization_is_training_statistics(small_dataset):
    ds = small_dataset
    vals = np.concatenate([ds.volume(p, d).ravel().astype(float)
                           for p in ds.patients("train") for d in ("low", "full")])
    mean, std = ds.normalization
    assert mean == pytest.approx(vals.mean(), rel=1e-9)
    assert std == pytest.approx(vals.std(), rel=1e-6)


def test_hu_clipping():
    a = to_hu_int16(np.array([-3000.0, -1024.4, 0.6, 5000.0]))
    assert a.tolist() == [-1024, -1024, 1, 3071]


def test_incomplete_dataset_is_refused(tmp_path):
    w = DatasetWriter(tmp_path, "simulated", {"a": 1})
    w.add_patient("P0", "train", np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), 1.0)
    with pytest.raises(DatasetError, match="no manifest.json"):
        CTDataset(tmp_path)
    with pytest.raises(DatasetError, match="val split has no patients"):
        w.finalize()


def test_shape_mismatch_is_an_error(tmp_path):
    w = DatasetWriter(tmp_path, "simulated", {})
    with pytest.raises(DatasetError, match="patient P0"):
        w.add_patient("P0", "train", np.zeros((2, 8, 8)), np.zeros((3, 8, 8)), 1.0)


def test_resume_keeps_finished_patients(tmp_path):
    w = DatasetWriter(tmp_path, "simulated", {"a": 1})
    w.add_patient("P0", "train", np.ones((1, 8, 8)), np.ones((1, 8, 8)), 1.0)
    # a new writer (after an interruption) sees P0 as done; other params start afresh
    assert DatasetWriter(tmp_path, "simulated", {"a": 1}).has_patient("P0")
    assert not DatasetWriter(tmp_path, "simulated", {"a": 2}).has_patient("P0")


def test_damaged_dataset_names_the_file(small_dataset):
    (small_dataset.root / "P1" / "low.npy").unlink()
    ds = CTDataset(small_dataset.root)
    with pytest.raises(DatasetError, match="P1/low.npy is missing"):
        ds.volume("P1", "low")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    f = tmp_path / "x.json"
    atomic.write_json(f, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(f) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert json.loads(f.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_format_version_checked(tmp_path):
    ds = make_dataset(tmp_path / "d")
    m = json.loads((ds.root / "manifest.json").read_text())
    m["format_version"] = 99
    (ds.root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="format version 99"):
        CTDataset(ds.root)
