"""The one on-disk format shared by the simulated cohort and the imported Mayo data.

A dataset is a folder::

    manifest.json            # written last: its presence marks a complete dataset
    progress.json            # patients written so far (resume an interrupted build)
    <patient>/low.npy        # int16 HU, (n_slices, H, W), low dose
    <patient>/full.npy       # int16 HU, (n_slices, H, W), full (high) dose, same slices

Values are Hounsfield units clipped to [-1024, 3071], as a scanner stores them. The manifest
records the source, the parameters it was built from, each patient's split, slice count,
pixel spacing and slice positions, the normalization constants (HU mean and SD) used to
feed networks and a content hash of all of it (:func:`content_hash`: the same cohort on any
machine has the same hash). Every later stage reads data only through :class:`CTDataset`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from invariscope import atomic

FORMAT_VERSION = 1
HU_MIN, HU_MAX = -1024, 3071
SPLITS = ("train", "val", "test")
Dose = Literal["low", "full"]

# The authors' constants for Mayo data: mean/SD of (HU + 1024), i.e. HU mean -542.545802.
MAYO_MEAN_HU = 481.454198 - 1024.0
MAYO_STD_HU = 502.185074


class DatasetError(RuntimeError):
    """A dataset folder is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class PatientInfo:
    """One patient of a dataset."""

    id: str
    split: str
    n_slices: int
    shape: tuple[int, int]
    pixel_spacing_mm: float
    positions_mm: tuple[float, ...]


def to_hu_int16(hu: np.ndarray) -> np.ndarray:
    """Round and clip HU values to the stored int16 range."""
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def content_hash(root: str | Path, patients: dict[str, dict[str, Any]]) -> str:
    """SHA-256 (first 16 hex digits) of a dataset's content: per patient (sorted), its id, split,
    slice positions and the int16 values of both doses. Independent of file timestamps and of
    the ``.npy`` headers' layout."""
    h = hashlib.sha256()
    for pid in sorted(patients):
        rec = patients[pid]
        h.update(json.dumps([pid, rec["split"], rec["pixel_spacing_mm"], rec["positions_mm"]])
                 .encode())
        for dose in ("low", "full"):
            a = np.load(Path(root) / pid / f"{dose}.npy", mmap_mode="r")
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a, dtype="<i2").tobytes())
    return h.hexdigest()[:16]


class DatasetWriter:
    """Writes a dataset patient by patient; resumable; the manifest is written last."""

    def __init__(self, root: str | Path, source: str, params: dict[str, Any]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.params = params
        self._progress_file = self.root / "progress.json"
        self.patients: dict[str, dict[str, Any]] = {}
        if self._progress_file.is_file():
            state = json.loads(self._progress_file.read_text())
            if state.get("params") == params and state.get("source") == source:
                self.patients = state["patients"]

    def has_patient(self, patient_id: str) -> bool:
        """True when the patient was fully written by this or an interrupted earlier run."""
        rec = self.patients.get(patient_id)
        return bool(rec) and all(
            (self.root / patient_id / f"{d}.npy").is_file() for d in ("low", "full")
        )

    def add_patient(
        self,
        patient_id: str,
        split: str,
        low_hu: np.ndarray,
        full_hu: np.ndarray,
        pixel_spacing_mm: float,
        positions_mm: list[float] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Store one patient's paired low/full-dose slices (HU, shape (n, H, W))."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if low_hu.shape != full_hu.shape or low_hu.ndim != 3:
            raise DatasetError(
                f"patient {patient_id}: low dose {low_hu.shape} and full dose {full_hu.shape} "
                "must both be (n_slices, H, W) of the same shape"
            )
        n = low_hu.shape[0]
        positions = list(map(float, positions_mm)) if positions_mm is not None else list(range(n))
        if len(positions) != n:
            raise DatasetError(f"patient {patient_id}: {len(positions)} positions for {n} slices")
        folder = self.root / patient_id
        atomic.save_npy(folder / "low.npy", to_hu_int16(low_hu))
        atomic.save_npy(folder / "full.npy", to_hu_int16(full_hu))
        self.patients[patient_id] = {
            "split": split,
            "n_slices": int(n),
            "shape": [int(s) for s in low_hu.shape[1:]],
            "pixel_spacing_mm": float(pixel_spacing_mm),
            "positions_mm": positions,
            **(extra or {}),
        }
        atomic.write_json(
            self._progress_file,
            {"source": self.source, "params": self.params, "patients": self.patients},
        )

    def finalize(self, normalization: tuple[float, float] | None = None, **info: Any) -> "CTDataset":
        """Write the manifest. ``normalization`` = (mean, SD) in HU; None = training-set stats."""
        if not self.patients:
            raise DatasetError(f"{self.root}: no patients were written")
        for split in SPLITS:
            if not any(p["split"] == split for p in self.patients.values()):
                raise DatasetError(f"{self.root}: the {split} split has no patients")
        if normalization is None:
            normalization = self._training_stats()
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "params": self.params,
            "normalization": {"mean_hu": float(normalization[0]), "std_hu": float(normalization[1])},
            "content_hash": content_hash(self.root, self.patients),
            "patients": dict(sorted(self.patients.items())),
            **info,
        }
        atomic.write_json(self.root / "manifest.json", manifest)
        return CTDataset(self.root)

    def _training_stats(self) -> tuple[float, float]:
        """Mean and SD (HU) over all low- and full-dose training pixels (float64 accumulation)."""
        total = s1 = s2 = 0.0
        for pid, rec in self.patients.items():
            if rec["split"] != "train":
                continue
            for dose in ("low", "full"):
                a = np.load(self.root / pid / f"{dose}.npy", mmap_mode="r").astype(np.float64)
                total += a.size
                s1 += a.sum()
                s2 += np.square(a).sum()
        mean = s1 / total
        return mean, float(np.sqrt(max(s2 / total - mean**2, 1e-12)))


class CTDataset:
    """Read access to a dataset folder (see module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest_file = self.root / "manifest.json"
        if not manifest_file.is_file():
            raise DatasetError(
                f"{self.root} is not a complete dataset (no manifest.json). Build it with the data "
                "notebook (notebooks/00_data.ipynb) or ./run_all.sh --only data."
            )
        self.manifest: dict[str, Any] = json.loads(manifest_file.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{manifest_file}: format version {self.manifest.get('format_version')}, "
                f"expected {FORMAT_VERSION}; rebuild the dataset"
            )
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    @property
    def source(self) -> str:
        """``simulated`` or ``mayo``."""
        return self.manifest["source"]

    @property
    def normalization(self) -> tuple[float, float]:
        """(mean, SD) in HU used to normalize network inputs to zero mean, unit variance."""
        n = self.manifest["normalization"]
        return float(n["mean_hu"]), float(n["std_hu"])

    @property
    def content_hash(self) -> str:
        """:func:`content_hash` of this dataset, as recorded in its manifest (computed now for a
        dataset written before the manifest recorded it)."""
        return self.manifest.get("content_hash") or content_hash(self.root, self.manifest["patients"])

    def patients(self, split: str | None = None) -> list[str]:
        """Patient IDs (sorted), optionally of one split."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [p for p, r in self.manifest["patients"].items() if split is None or r["split"] == split]

    def info(self, patient_id: str) -> PatientInfo:
        """Metadata of one patient."""
        try:
            r = self.manifest["patients"][patient_id]
        except KeyError:
            raise KeyError(f"no patient {patient_id!r} in {self.root}") from None
        return PatientInfo(
            id=patient_id,
            split=r["split"],
            n_slices=int(r["n_slices"]),
            shape=tuple(r["shape"]),
            pixel_spacing_mm=float(r["pixel_spacing_mm"]),
            positions_mm=tuple(r["positions_mm"]),
        )

    def volume(self, patient_id: str, dose: Dose) -> np.ndarray:
        """All slices of one patient at one dose: int16 HU, (n_slices, H, W), memory-mapped."""
        if dose not in ("low", "full"):
            raise ValueError(f"dose must be 'low' or 'full', got {dose!r}")
        key = (patient_id, dose)
        if key not in self._cache:
            f = self.root / patient_id / f"{dose}.npy"
            if not f.is_file():
                raise DatasetError(f"{f} is missing: the dataset is damaged; rebuild it")
            self._cache[key] = np.load(f, mmap_mode="r")
        return self._cache[key]

    def slice_index(self, split: str) -> list[tuple[str, int]]:
        """(patient, slice) pairs of a split, in a fixed order."""
        return [(p, i) for p in self.patients(split) for i in range(self.info(p).n_slices)]

    def split_table(self) -> list[dict[str, Any]]:
        """One row per patient: id, split, slices, shape, pixel spacing."""
        return [
            {
                "patient": p,
                "split": self.info(p).split,
                "slices": self.info(p).n_slices,
                "shape": "x".join(map(str, self.info(p).shape)),
                "pixel_mm": round(self.info(p).pixel_spacing_mm, 3),
            }
            for p in self.patients()
        ]
