"""Tests for the Mayo importer on a small fake TCIA tree built from pydicom's CT_small.dcm."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from invariscope.data.dataset import MAYO_MEAN_HU, MAYO_STD_HU, CTDataset, DatasetError, DatasetWriter
from invariscope.data.mayo import (AUTHORS_SPLIT, MayoImportError, find_patients, import_mayo, pair_positions,
                                   read_series, split_of)

N_SLICES = 4
LOW_EXTRA_HU = 7  # low dose = full dose + 7 HU everywhere (a stand-in for noise)
STEP_HU = 100  # slice k (ascending z) has HU = base + 100 k
PATIENTS = ("C001", "C002", "C067", "C121", "L123")
SERIES_DIR = {
    "low": "1.000000-Low Dose Images-38471",
    "full": "1.000000-Full Dose Images-92811",
}


def _base_hu() -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)


def expected_hu(dose: str, n: int = N_SLICES) -> np.ndarray:
    """HU volume in ascending z order."""
    base = _base_hu()
    vol = np.stack([base + STEP_HU * k for k in range(n)])
    return vol + (LOW_EXTRA_HU if dose == "low" else 0)


def z_positions(n: int = N_SLICES) -> list[float]:
    return [-150.0 + 2.5 * k for k in range(n)]


def write_series(
    folder: Path,
    patient: str,
    dose: str,
    n: int = N_SLICES,
    seed: int = 0,
    description: str | None = None,
) -> None:
    """Write n slices with shuffled file names; low: slope 1 / intercept -1024, full: 0.5 / -1000."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    slope, intercept = (1.0, -1024.0) if dose == "low" else (0.5, -1000.0)
    vol = expected_hu(dose, n)
    names = list(range(1, n + 1))
    random.Random(f"{patient}{dose}{seed}").shuffle(names)
    jitter = 0.0 if dose == "low" else 1e-3  # tiny mismatch: pairing uses a tolerance
    for k, z in enumerate(z_positions(n)):
        ds = template.copy()
        pixels = np.rint((vol[k] - intercept) / slope).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.ImagePositionPatient = [-158.135803, -179.035797, z + jitter]
        ds.SliceLocation = z + jitter
        ds.InstanceNumber = names[k]
        ds.PatientID = patient
        ds.SeriesDescription = description or ("Low Dose Images" if dose == "low" else "Full Dose Images")
        ds.save_as(folder / f"1-{names[k]:03d}.dcm")


def series_dir(root: Path, patient: str, dose: str) -> Path:
    return root / "LDCT-and-Projection-data" / patient / "08-23-2018-NA-NA-12345" / SERIES_DIR[dose]


def build_tree(base: Path, patients=PATIENTS, n: int = N_SLICES) -> Path:
    for p in patients:
        for dose in ("low", "full"):
            write_series(series_dir(base, p, dose), p, dose, n)
    return base


@pytest.fixture(scope="module")
def _template_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tree(tmp_path_factory.mktemp("template") / "tcia")


@pytest.fixture
def tree(_template_tree: Path, tmp_path: Path) -> Path:
    """A fresh copy of the fake tree (tests modify it)."""
    return Path(shutil.copytree(_template_tree, tmp_path / "tcia"))


def report(out: Path) -> dict:
    return json.loads((out / "import_report.json").read_text())


# --------------------------------------------------------------------------- reading


def test_read_series_hu_and_order(tree: Path) -> None:
    folder = series_dir(tree, "C001", "full")
    hu, pos, spacing, files = read_series(folder)
    assert hu.dtype == np.float32 and hu.shape == (N_SLICES, 128, 128)
    assert pos == sorted(pos) and len(files) == N_SLICES
    assert [f.name for f in files] != sorted(f.name for f in files)  # order is by z, not name
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ref = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu[k], ref)
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(pos[k])
    np.testing.assert_array_equal(hu, expected_hu("full"))
    assert spacing == pytest.approx(0.661468)


def test_read_series_position_fallback(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    write_series(folder, "C001", "low")
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    hu, pos, _, _ = read_series(folder)
    assert pos == pytest.approx(z_positions())
    np.testing.assert_array_equal(hu, expected_hu("low"))


def test_pair_positions() -> None:
    pairs, lo, fu = pair_positions([0.0, 1.0, 2.0, 3.0], [0.001, 2.0, 3.0, 4.0])
    assert pairs == [(0, 0), (2, 1), (3, 2)] and lo == [1] and fu == [3]


def test_split_of() -> None:
    assert split_of("C067") == "val" and split_of("C121") == "test" and split_of("C001") == "train"
    assert len(AUTHORS_SPLIT["val"]) == 10 and len(AUTHORS_SPLIT["test"]) == 5
    assert len(AUTHORS_SPLIT["train"]) == 35
    assert not set(AUTHORS_SPLIT["train"]) & set(AUTHORS_SPLIT["val"] + AUTHORS_SPLIT["test"])


def test_find_patients_by_name_and_by_header(tree: Path) -> None:
    found = find_patients(tree)
    assert set(found) == set(PATIENTS)
    assert found["C001"].low == series_dir(tree, "C001", "low") and found["C001"].problem is None
    # unhelpful folder names: fall back to SeriesDescription
    for dose, name in (("low", "2.000000-Series-11111"), ("full", "3.000000-Series-22222")):
        d = series_dir(tree, "C002", dose)
        d.rename(d.parent / name)
    ps = find_patients(tree, ids=["C002"])["C002"]
    assert ps.low is not None and ps.low.name == "2.000000-Series-11111"
    assert ps.full is not None and ps.full.name == "3.000000-Series-22222"


# --------------------------------------------------------------------------- import


def test_import_end_to_end(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ds = import_mayo(tree, out, progress=False)
    assert isinstance(ds, CTDataset) and CTDataset(out).source == "mayo"
    assert ds.patients("train") == ["C001", "C002"]
    assert ds.patients("val") == ["C067"] and ds.patients("test") == ["C121"]
    assert ds.normalization == (pytest.approx(MAYO_MEAN_HU), pytest.approx(MAYO_STD_HU))
    assert ds.manifest["normalization"]["mean_hu"] == pytest.approx(481.454198 - 1024)
    for p in ("C001", "C067"):
        low, full = ds.volume(p, "low"), ds.volume(p, "full")
        np.testing.assert_array_equal(full, expected_hu("full"))
        np.testing.assert_array_equal(low, expected_hu("low"))  # paired by z, not by file name
        info = ds.info(p)
        assert info.n_slices == N_SLICES and info.shape == (128, 128)
        assert info.positions_mm == pytest.approx(z_positions())
        assert info.pixel_spacing_mm == pytest.approx(0.661468)
    rep = report(out)
    assert rep["status"] == "complete"
    assert {(p["patient"], p["split"], p["n_slices"]) for p in rep["imported"]} == {
        ("C001", "train", 4), ("C002", "train", 4), ("C067", "val", 4), ("C121", "test", 4)
    }
    assert [i["folder"] for i in rep["ignored"]] == ["L123"]
    assert set(rep["not_in_authors_split"]) == {"C001"}
    assert "C202" in rep["authors_patients_missing"]
    md = (out / "import_report.md").read_text()
    assert "C067" in md and "L123" in md


def test_root_inner_folder_and_patient_subset(tree: Path, tmp_path: Path) -> None:
    ds = import_mayo(
        tree / "LDCT-and-Projection-data", tmp_path / "o", patients=["C002", "C067", "C121"],
        progress=False,
    )
    assert ds.patients() == ["C002", "C067", "C121"]


def test_resume_keeps_finished_patients(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # first run fails at C002 (patients go in sorted order: C001 is written first)
    bad = series_dir(tree, "C002", "low") / "1-001.dcm"
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not a dicom file")
    with pytest.raises(MayoImportError):
        import_mayo(tree, out, progress=False)
    assert report(out)["status"] == "failed"
    assert not (out / "manifest.json").exists()
    c001 = out / "C001" / "low.npy"
    mtime = c001.stat().st_mtime_ns
    bad.write_bytes(good_bytes)
    import_mayo(tree, out, progress=False)
    assert c001.stat().st_mtime_ns == mtime
    rep = report(out)
    resumed = {p["patient"]: p["resumed"] for p in rep["imported"]}
    assert resumed == {"C001": True, "C002": False, "C067": False, "C121": False}
    mtimes = {p: (out / p / "full.npy").stat().st_mtime_ns for p in resumed}
    import_mayo(tree, out, progress=False)  # complete dataset: nothing rewritten
    assert {p: (out / p / "full.npy").stat().st_mtime_ns for p in resumed} == mtimes
    assert all(p["resumed"] for p in report(out)["imported"])


# --------------------------------------------------------------------------- errors


def _no_low(root: Path) -> str:
    shutil.rmtree(series_dir(root, "C001", "low"))
    return "LDCT-and-Projection-data/C001"


def _no_full(root: Path) -> str:
    shutil.rmtree(series_dir(root, "C001", "full"))
    return "LDCT-and-Projection-data/C001"


def _corrupt(root: Path) -> str:
    f = sorted(series_dir(root, "C001", "low").glob("*.dcm"))[1]
    f.write_bytes(b"garbage" * 10)
    return f.name


def _truncated(root: Path) -> str:
    f = sorted(series_dir(root, "C001", "full").glob("*.dcm"))[2]
    f.write_bytes(f.read_bytes()[:2000])
    return f.name


def _no_pixeldata(root: Path) -> str:
    f = sorted(series_dir(root, "C001", "full").glob("*.dcm"))[0]
    ds = pydicom.dcmread(f)
    del ds.PixelData
    ds.save_as(f)
    return f.name


def _count_mismatch(root: Path) -> str:
    f = sorted(series_dir(root, "C001", "full").glob("*.dcm"))[0]
    z = float(pydicom.dcmread(f).ImagePositionPatient[2])
    f.unlink()
    # the low-dose file at that position has no partner: the message names it
    for g in series_dir(root, "C001", "low").glob("*.dcm"):
        if abs(float(pydicom.dcmread(g).ImagePositionPatient[2]) - z) < 0.01:
            return g.name
    raise AssertionError("no low-dose partner")


def _shape_between_slices(root: Path) -> str:
    f = sorted(series_dir(root, "C001", "low").glob("*.dcm"))[-1]
    ds = pydicom.dcmread(f)
    ds.Rows = ds.Columns = 64
    ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
    ds.save_as(f)
    return f.name


def _shape_between_doses(root: Path) -> str:
    for f in series_dir(root, "C001", "full").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 64
        ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
        ds.save_as(f)
    return "Full Dose Images"


def _empty_series(root: Path) -> str:
    for f in series_dir(root, "C001", "low").glob("*.dcm"):
        f.unlink()
    return SERIES_DIR["low"]


BREAKERS = {
    "no_low": _no_low,
    "no_full": _no_full,
    "corrupt": _corrupt,
    "truncated": _truncated,
    "no_pixeldata": _no_pixeldata,
    "count_mismatch": _count_mismatch,
    "shape_between_slices": _shape_between_slices,
    "shape_between_doses": _shape_between_doses,
    "empty_series": _empty_series,
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_errors_raise_with_patient_and_path(tree: Path, tmp_path: Path, case: str) -> None:
    needle = BREAKERS[case](tree)
    with pytest.raises(MayoImportError) as exc:
        import_mayo(tree, tmp_path / "out", progress=False)
    msg = str(exc.value)
    assert isinstance(exc.value, DatasetError)
    assert "C001" in msg and needle in msg, msg
    assert exc.value.patient == "C001"
    if case == "count_mismatch":
        assert "4 slices" in msg and "full dose 3" in msg
    rep = report(tmp_path / "out")
    assert rep["status"] == "failed" and "C001" in rep["error"]


# file-level problems keep the patient (minus the unpaired slice); the rest skip the patient
FILE_LEVEL = {"corrupt", "truncated", "no_pixeldata", "count_mismatch"}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_skip_mode_records_and_imports_the_rest(tree: Path, tmp_path: Path, case: str) -> None:
    needle = BREAKERS[case](tree)
    out = tmp_path / "out"
    ds = import_mayo(tree, out, on_error="skip", progress=False)
    rep = report(out)
    assert rep["status"] == "complete"
    assert {"C002", "C067", "C121"} <= set(ds.patients())
    if case in FILE_LEVEL:
        assert ds.info("C001").n_slices == N_SLICES - 1
        dropped = [u for u in rep["unpaired_slices"] if u["patient"] == "C001"]
        assert len(dropped) == 1 and "position_mm" in dropped[0]
        if case != "count_mismatch":
            assert [Path(s["file"]).name for s in rep["skipped_files"]] == [needle]
        # the slices that remain are still correctly paired
        np.testing.assert_array_equal(
            np.asarray(ds.volume("C001", "low")) - np.asarray(ds.volume("C001", "full")),
            LOW_EXTRA_HU,
        )
    else:
        assert "C001" not in ds.patients()
        skipped = {s["patient"]: s["reason"] for s in rep["skipped_patients"]}
        assert needle in skipped["C001"]
    assert "C001" in (out / "import_report.md").read_text()


def test_root_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(MayoImportError, match="does not exist.*expected layout"):
        import_mayo(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MayoImportError, match="no patient folders.*expected layout"):
        import_mayo(tmp_path / "empty", tmp_path / "out", progress=False)
    assert report(tmp_path / "out")["status"] == "failed"


def test_no_chest_patients(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "t", patients=("L123",), n=2)
    with pytest.raises(MayoImportError, match="no chest patient"):
        import_mayo(root, tmp_path / "out", progress=False)


def test_empty_split_in_skip_mode_explains(tree: Path, tmp_path: Path) -> None:
    shutil.rmtree(series_dir(tree, "C067", "low"))
    with pytest.raises(MayoImportError, match="val split is empty") as exc:
        import_mayo(tree, tmp_path / "out", on_error="skip", progress=False)
    assert "C067" in str(exc.value)
    rep = report(tmp_path / "out")
    assert rep["skipped_patients"][0]["patient"] == "C067"


def test_requested_patient_missing(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(MayoImportError, match="C999"):
        import_mayo(tree, tmp_path / "out", patients=["C999", "C001"], progress=False)


def test_refuses_other_dataset(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    w = DatasetWriter(out, source="simulated", params={})
    for pid, split in (("S1", "train"), ("S2", "val"), ("S3", "test")):
        w.add_patient(pid, split, np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), 1.0)
    w.finalize((0.0, 1.0))
    with pytest.raises(MayoImportError, match="simulated"):
        import_mayo(tree, out, progress=False)
    assert CTDataset(out).source == "simulated"
