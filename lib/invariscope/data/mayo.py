"""Import the Mayo "LDCT and Projection data" (TCIA) into the shared dataset format.

Expected layout (as written by the NBIA data retriever or ldct-benchmark's download script)::

    LDCT-and-Projection-data/<patient>/<study>/<series>/1-NNN.dcm

e.g. ``C067/12-23-2021-NA-NA-12345/1.000000-Low Dose Images-00959/1-001.dcm``. The series
folder name tells the dose ("Low Dose Images" / "Full Dose Images"); when it does not, the
DICOM SeriesDescription of the series' first readable file is used. ``root`` may be the
``LDCT-and-Projection-data`` folder itself or the folder that holds it.

Only chest exams (patient IDs ``C…``) are imported, split as the authors did (:data:`AUTHORS_SPLIT`).
Slices are converted to HU with RescaleSlope/RescaleIntercept (the authors feed ``pixel_array``,
i.e. HU + 1024, which is the same for this data since its intercept is -1024) and paired
low/full dose by table position, not by file name.

Error policy (``on_error``): with ``"raise"`` the first problem raises :class:`MayoImportError`
naming the patient and the file or folder. With ``"skip"``:

* an unreadable file (not DICOM, truncated, no PixelData) is skipped; its partner slice in the
  other dose then has no partner and is dropped too; both are recorded in the report;
* a slice present in only one dose series is dropped and recorded (with its position);
* everything else (no low/full series, ambiguous series, empty series folder, inconsistent
  shapes or pixel spacings, no slice left to pair) skips the whole patient, recorded in the report.

``import_report.json`` and ``import_report.md`` are written to ``out_dir`` on every call,
also when the import fails.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from invariscope import atomic
from invariscope.data.dataset import MAYO_MEAN_HU, MAYO_STD_HU, SPLITS, CTDataset, DatasetError, DatasetWriter

OnError = Literal["raise", "skip"]

#: The authors' patient-level split of the 50 chest exams (ldct-benchmark ``data/info.yml``).
#: Import rule: val and test as listed; every other chest patient found is train (the listed
#: train patients are the 35 the authors had).
AUTHORS_SPLIT: dict[str, tuple[str, ...]] = {
    "val": ("C202", "C219", "C227", "C258", "C067", "C295", "C190", "C232", "C052", "C107"),
    "test": ("C121", "C249", "C170", "C135", "C280"),
    "train": (
        "C002", "C004", "C012", "C016", "C021", "C027", "C030", "C050", "C077", "C081",
        "C095", "C099", "C111", "C120", "C124", "C128", "C130", "C158", "C160", "C162",
        "C166", "C179", "C193", "C203", "C218", "C224", "C234", "C241", "C246", "C252",
        "C257", "C261", "C267", "C268", "C296",
    ),
}

LAYOUT_HINT = (
    "expected layout: <root>/<patient, e.g. C067>/<study>/<series folder whose name contains "
    "'Low Dose Images' or 'Full Dose Images'>/1-NNN.dcm (root may also be the folder holding "
    "LDCT-and-Projection-data/)"
)
POSITION_TOL_MM = 0.01  # minimum pairing tolerance; otherwise 0.1 x the smallest slice gap

_LOW_RE = re.compile(r"\b(low|quarter)\s*dose\b")
_FULL_RE = re.compile(r"\b(full|high)\s*dose\b")


class MayoImportError(DatasetError):
    """The Mayo data cannot be imported; names the patient and the file or folder at fault."""

    def __init__(self, message: str, patient: str | None = None, path: str | Path | None = None):
        prefix = f"patient {patient}: " if patient else ""
        super().__init__(prefix + message)
        self.patient = patient
        self.path = Path(path) if path is not None else None
        self.reason = message


@dataclass(frozen=True)
class PatientSeries:
    """The dose series found for one patient folder; ``problem`` says why it cannot be used."""

    patient: str
    folder: Path
    low: Path | None = None
    full: Path | None = None
    problem: str | None = None
    other_series: tuple[Path, ...] = field(default=())

    @property
    def chest(self) -> bool:
        """True for chest exams (IDs starting with ``C``), the only ones the paper uses."""
        return self.patient.upper().startswith("C")


class SeriesData(NamedTuple):
    """One dose series in slice order: HU (n, H, W) float32, positions, spacing, files."""

    hu: np.ndarray
    positions_mm: list[float]
    pixel_spacing_mm: float
    files: list[Path]


def split_of(patient_id: str) -> str:
    """The authors' split of a chest patient: listed val/test, else train."""
    for split in ("val", "test"):
        if patient_id in AUTHORS_SPLIT[split]:
            return split
    return "train"


# --------------------------------------------------------------------------- discovery


def resolve_root(root: str | Path) -> Path:
    """The folder holding the patient folders; raises when it is missing or empty."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MayoImportError(f"Mayo data folder {root} does not exist; {LAYOUT_HINT}", path=root)
    inner = root / "LDCT-and-Projection-data"
    if inner.is_dir():
        root = inner
    if not any(_patient_dirs(root)):
        raise MayoImportError(
            f"Mayo data folder {root} holds no patient folders; {LAYOUT_HINT}", path=root
        )
    return root


def _patient_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _dcm_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm"
        and not p.name.startswith(".")
    )


def _dose_from_text(text: str) -> str | None:
    norm = re.sub(r"[\s_.\-]+", " ", text.lower())
    low, full = bool(_LOW_RE.search(norm)), bool(_FULL_RE.search(norm))
    if low != full:
        return "low" if low else "full"
    return None


def _dose_from_header(folder: Path) -> str | None:
    import pydicom

    for f in _dcm_files(folder):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable here is reported when the series is read
            continue
        return _dose_from_text(str(ds.get("SeriesDescription", "")))
    return None


def _find_series(patient: str, folder: Path) -> PatientSeries:
    found: dict[str, list[Path]] = {"low": [], "full": []}
    other: list[Path] = []
    for dirpath, dirnames, _ in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        d = Path(dirpath)
        dose = _dose_from_text(d.name) if d != folder else None
        has_dcm = bool(_dcm_files(d))
        if dose is None and has_dcm:
            dose = _dose_from_header(d)
        if dose is not None:
            found[dose].append(d)
        elif has_dcm:
            other.append(d)
    problems = []
    for dose in ("low", "full"):
        if not found[dose]:
            seen = ", ".join(str(p.relative_to(folder)) for p in other) or "none"
            problems.append(
                f"no {dose}-dose series in {folder} (series folders without a dose in their name "
                f"or SeriesDescription: {seen}); {LAYOUT_HINT}"
            )
        elif len(found[dose]) > 1:
            names = ", ".join(str(p.relative_to(folder)) for p in found[dose])
            problems.append(f"{len(found[dose])} {dose}-dose series in {folder}: {names}")
    return PatientSeries(
        patient=patient,
        folder=folder,
        low=found["low"][0] if len(found["low"]) == 1 else None,
        full=found["full"][0] if len(found["full"]) == 1 else None,
        problem="; ".join(problems) or None,
        other_series=tuple(other),
    )


def find_patients(root: str | Path, ids: list[str] | None = None) -> dict[str, PatientSeries]:
    """Discover each patient's low- and full-dose series folders (all patients, or ``ids``).

    Per-patient problems (a missing or ambiguous series) are recorded in
    :attr:`PatientSeries.problem`, not raised; a missing or empty root raises.
    """
    root = resolve_root(root)
    wanted = set(ids) if ids is not None else None
    return {
        p.name: _find_series(p.name, p)
        for p in _patient_dirs(root)
        if wanted is None or p.name in wanted
    }


# --------------------------------------------------------------------------- reading


def _read_slice(f: Path, patient: str | None) -> tuple[np.ndarray, dict[str, float | None], float]:
    """HU image, candidate positions and pixel spacing of one file; raises MayoImportError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(f)
    except InvalidDicomError as e:
        raise MayoImportError(f"{f} is not a DICOM file ({e})", patient, f) from e
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many kinds
        raise MayoImportError(f"{f} cannot be read ({type(e).__name__}: {e})", patient, f) from e
    if "PixelData" not in ds:
        raise MayoImportError(f"{f} has no PixelData (truncated, or not an image)", patient, f)
    try:
        px = ds.pixel_array
    except Exception as e:  # noqa: BLE001
        raise MayoImportError(
            f"{f}: pixel data cannot be decoded ({type(e).__name__}: {e})", patient, f
        ) from e
    if px.ndim != 2:
        raise MayoImportError(f"{f}: expected one 2-D slice, got pixel data {px.shape}", patient, f)
    if "RescaleIntercept" not in ds:
        raise MayoImportError(f"{f} has no RescaleIntercept; cannot convert to HU", patient, f)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    hu = px.astype(np.float32) * np.float32(slope) + np.float32(float(ds.RescaleIntercept))
    ipp = ds.get("ImagePositionPatient")
    pos = {
        "ImagePositionPatient": float(ipp[2]) if ipp is not None and len(ipp) == 3 else None,
        "SliceLocation": float(ds.SliceLocation) if ds.get("SliceLocation") is not None else None,
        "InstanceNumber": float(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None,
    }
    ps = ds.get("PixelSpacing")
    if ps is None or len(ps) != 2:
        raise MayoImportError(f"{f} has no PixelSpacing", patient, f)
    if abs(float(ps[0]) - float(ps[1])) > 1e-4 * float(ps[0]):
        raise MayoImportError(f"{f}: non-square pixels {list(map(float, ps))} mm", patient, f)
    return hu, pos, float(ps[0])


def _read_series(
    folder: Path, patient: str | None, skip_bad_files: bool
) -> tuple[SeriesData, str, list[dict[str, str]]]:
    """Read a series; returns data, the position attribute used and the files skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MayoImportError(f"series folder {folder} does not exist", patient, folder)
    files = _dcm_files(folder)
    if not files:
        raise MayoImportError(f"series folder {folder} has no .dcm files", patient, folder)
    images, positions, spacings, good, skipped = [], [], [], [], []
    for f in files:
        try:
            hu, pos, spacing = _read_slice(f, patient)
        except MayoImportError as e:
            if not skip_bad_files:
                raise
            skipped.append({"file": str(f), "reason": e.reason})
            continue
        if images and hu.shape != images[0].shape:
            raise MayoImportError(
                f"{f}: slice shape {hu.shape} differs from {images[0].shape} of {good[0].name} "
                f"in the same series",
                patient,
                f,
            )
        if spacings and abs(spacing - spacings[0]) > 1e-4 * spacings[0]:
            raise MayoImportError(
                f"{f}: pixel spacing {spacing} mm differs from {spacings[0]} mm of {good[0].name}",
                patient,
                f,
            )
        images.append(hu)
        positions.append(pos)
        spacings.append(spacing)
        good.append(f)
    if not images:
        raise MayoImportError(f"series folder {folder} has no readable slice", patient, folder)
    key = next(
        (k for k in ("ImagePositionPatient", "SliceLocation", "InstanceNumber")
         if all(p[k] is not None for p in positions)),
        None,
    )
    if key is None:
        raise MayoImportError(
            f"series {folder}: slices lack ImagePositionPatient, SliceLocation and InstanceNumber; "
            "cannot order them",
            patient,
            folder,
        )
    z = np.array([p[key] for p in positions], dtype=np.float64)
    order = np.argsort(z, kind="stable")
    zs = z[order]
    dup = np.flatnonzero(np.diff(zs) <= POSITION_TOL_MM / 10)
    if dup.size:
        a, b = good[order[dup[0]]], good[order[dup[0] + 1]]
        raise MayoImportError(
            f"series {folder}: {a.name} and {b.name} share the position {key} = {zs[dup[0]]:g}",
            patient,
            b,
        )
    hu = np.stack([images[i] for i in order])
    data = SeriesData(hu, [float(v) for v in zs], float(spacings[0]), [good[i] for i in order])
    return data, key, skipped


def read_series(folder: str | Path) -> SeriesData:
    """Read every .dcm of a series folder: HU (n, H, W) float32 sorted by table position.

    Positions come from ImagePositionPatient[2], else SliceLocation, else InstanceNumber
    (whichever every slice has). Returns ``(hu, positions_mm, pixel_spacing_mm, files)``.
    """
    data, _, _ = _read_series(Path(folder), None, skip_bad_files=False)
    return data


def pair_positions(
    low_mm: list[float], full_mm: list[float], tol_mm: float | None = None
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Pair two ascending position lists; returns (pairs, low-only indices, full-only indices).

    ``tol_mm`` defaults to max(0.01 mm, 0.1 x the smallest gap between slices).
    """
    if tol_mm is None:
        gaps = [g for s in (low_mm, full_mm) for g in np.diff(np.asarray(s, dtype=float)) if g > 0]
        tol_mm = max(POSITION_TOL_MM, 0.1 * min(gaps)) if gaps else POSITION_TOL_MM
    pairs, low_only, full_only = [], [], []
    i = j = 0
    while i < len(low_mm) and j < len(full_mm):
        if abs(low_mm[i] - full_mm[j]) <= tol_mm:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif low_mm[i] < full_mm[j]:
            low_only.append(i)
            i += 1
        else:
            full_only.append(j)
            j += 1
    low_only += range(i, len(low_mm))
    full_only += range(j, len(full_mm))
    return pairs, low_only, full_only


# --------------------------------------------------------------------------- import


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _load_patient(ps: PatientSeries, root: Path, skip: bool) -> dict[str, Any]:
    """Read and pair one patient; returns arrays and the notes for the report."""
    pid = ps.patient
    if ps.problem:
        raise MayoImportError(ps.problem, pid, ps.folder)
    assert ps.low is not None and ps.full is not None
    low, low_key, low_skipped = _read_series(ps.low, pid, skip)
    full, full_key, full_skipped = _read_series(ps.full, pid, skip)
    if low_key != full_key:
        raise MayoImportError(
            f"low dose ordered by {low_key}, full dose by {full_key}; cannot pair slices",
            pid,
            ps.folder,
        )
    if low.hu.shape[1:] != full.hu.shape[1:]:
        raise MayoImportError(
            f"low-dose slices {low.hu.shape[1:]} ({low.files[0]}) and full-dose slices "
            f"{full.hu.shape[1:]} ({full.files[0]}) differ in shape",
            pid,
            full.files[0],
        )
    if abs(low.pixel_spacing_mm - full.pixel_spacing_mm) > 1e-4 * low.pixel_spacing_mm:
        raise MayoImportError(
            f"pixel spacing {low.pixel_spacing_mm} mm (low dose, {low.files[0]}) differs from "
            f"{full.pixel_spacing_mm} mm (full dose, {full.files[0]})",
            pid,
            full.files[0],
        )
    pairs, low_only, full_only = pair_positions(low.positions_mm, full.positions_mm)
    unpaired = [
        {"dose": dose, "position_mm": s.positions_mm[i], "file": str(s.files[i])}
        for dose, s, idx in (("low", low, low_only), ("full", full, full_only))
        for i in idx
    ]
    if unpaired and not skip:
        n_low, n_full = len(low.files), len(full.files)
        listed = "; ".join(
            f"{u['dose']} dose only at {_fmt_pos(low_key, u['position_mm'])}: {u['file']}"
            for u in unpaired[:5]
        )
        more = f" (+{len(unpaired) - 5} more)" if len(unpaired) > 5 else ""
        raise MayoImportError(
            f"low dose has {n_low} slices ({ps.low}), full dose {n_full} ({ps.full}); "
            f"{len(unpaired)} slice(s) have no partner: {listed}{more}",
            pid,
            unpaired[0]["file"],
        )
    if not pairs:
        raise MayoImportError(
            f"no slice positions shared by {ps.low} and {ps.full}", pid, ps.folder
        )
    li = np.array([p[0] for p in pairs])
    fi = np.array([p[1] for p in pairs])
    low_hu = low.hu if len(li) == len(low.files) else low.hu[li]
    full_hu = full.hu if len(fi) == len(full.files) else full.hu[fi]
    return {
        "low": low_hu,
        "full": full_hu,
        "spacing": low.pixel_spacing_mm,
        "positions": [low.positions_mm[i] for i in li],
        "notes": {
            "low_series": _rel(ps.low, root),
            "full_series": _rel(ps.full, root),
            "position_source": low_key,
            "skipped_files": [
                {**s, "dose": dose} for dose, lst in (("low", low_skipped), ("full", full_skipped))
                for s in lst
            ],
            "unpaired_slices": unpaired,
        },
    }


def _fmt_pos(key: str, value: float) -> str:
    """Format a slice position with its unit (InstanceNumber has none)."""
    return f"InstanceNumber {value:g}" if key == "InstanceNumber" else f"z = {value:g} mm"


def _write_report(out_dir: Path, report: dict[str, Any]) -> None:
    atomic.write_json(out_dir / "import_report.json", report)
    lines = [
        "# Mayo import report",
        "",
        f"- root: `{report['root']}`",
        f"- on_error: `{report['on_error']}`",
        f"- status: **{report['status']}**",
    ]
    if report.get("error"):
        lines.append(f"- error: {report['error']}")
    counts = {s: sum(p["split"] == s for p in report["imported"]) for s in SPLITS}
    lines += [
        f"- imported: {len(report['imported'])} patients "
        f"({', '.join(f'{s} {counts[s]}' for s in SPLITS)}), "
        f"{sum(p['n_slices'] for p in report['imported'])} slice pairs",
        "",
    ]
    if report["imported"]:
        lines += ["| patient | split | slice pairs | note |", "|---|---|---|---|"]
        for p in report["imported"]:
            note = []
            if p.get("resumed"):
                note.append("already imported")
            if not p.get("in_authors_split", True):
                note.append("not in the authors' list")
            if p.get("skipped_files"):
                note.append(f"{len(p['skipped_files'])} file(s) skipped")
            if p.get("unpaired_slices"):
                note.append(f"{len(p['unpaired_slices'])} unpaired slice(s) dropped")
            lines.append(f"| {p['patient']} | {p['split']} | {p['n_slices']} | {', '.join(note)} |")
        lines.append("")
    sections = [
        ("Skipped patients", report["skipped_patients"], "{patient}: {reason}"),
        ("Skipped files", report["skipped_files"], "{patient} ({dose} dose): {reason}"),
        ("Dropped unpaired slices", report["unpaired_slices"],
         "{patient}: {dose} dose only, position {position_mm:g}: {file}"),
        ("Ignored folders", report["ignored"], "{folder}: {reason}"),
    ]
    for title, rows, fmt in sections:
        if rows:
            lines += [f"## {title}", ""] + [f"- {fmt.format(**r)}" for r in rows] + [""]
    if report.get("authors_patients_missing"):
        lines += [
            "## Authors' chest patients not imported",
            "",
            ", ".join(report["authors_patients_missing"]),
            "",
        ]
    atomic.write_text(out_dir / "import_report.md", "\n".join(lines))


def import_mayo(
    root: str | Path,
    out_dir: str | Path,
    *,
    on_error: OnError = "raise",
    patients: list[str] | None = None,
    progress: bool = True,
) -> CTDataset:
    """Import the Mayo chest exams under ``root`` into a dataset folder ``out_dir``.

    Resumable: patients already written by an earlier call with the same arguments are kept.
    ``patients`` restricts the import to these IDs. Normalization uses the authors'
    constants (:data:`MAYO_MEAN_HU`, :data:`MAYO_STD_HU`). Writes ``import_report.json``
    and ``import_report.md`` to ``out_dir`` in every case. See the module docstring for
    the error policy.
    """
    from tqdm import tqdm

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out_dir = Path(out_dir)
    skip = on_error == "skip"
    report: dict[str, Any] = {
        "root": str(Path(root).expanduser().resolve()),
        "out_dir": str(out_dir.resolve()),
        "on_error": on_error,
        "patients_requested": sorted(patients) if patients is not None else None,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "failed",
        "error": None,
        "imported": [],
        "skipped_patients": [],
        "skipped_files": [],
        "unpaired_slices": [],
        "ignored": [],
        "not_in_authors_split": [],
        "authors_patients_missing": [],
        "normalization": {"mean_hu": MAYO_MEAN_HU, "std_hu": MAYO_STD_HU},
    }
    _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        dataset = _import(root, out_dir, skip, patients, progress, report, tqdm)
        report["status"] = "complete"
        return dataset
    except Exception as e:
        report["error"] = str(e)
        raise
    finally:
        report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        _write_report(out_dir, report)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to write Mayo data over a dataset of another source."""
    for name in ("manifest.json", "progress.json"):
        f = out_dir / name
        if f.is_file():
            try:
                source = json.loads(f.read_text()).get("source")
            except (OSError, ValueError):
                source = None
            if source not in (None, "mayo"):
                raise MayoImportError(
                    f"{out_dir} holds a {source!r} dataset ({f}); import Mayo data into another folder",
                    path=f,
                )


def _import(
    root: str | Path,
    out_dir: Path,
    skip: bool,
    patients: list[str] | None,
    progress: bool,
    report: dict[str, Any],
    tqdm: Any,
) -> CTDataset:
    root = resolve_root(root)
    report["root"] = str(root.resolve())
    params = {
        "root": str(root.resolve()),
        "on_error": report["on_error"],
        "patients": report["patients_requested"],
    }
    writer = DatasetWriter(out_dir, source="mayo", params=params)
    manifest = out_dir / "manifest.json"
    if manifest.is_file():
        try:
            stale = json.loads(manifest.read_text()).get("params") != params
        except (OSError, ValueError):
            stale = True
        if stale:  # describes other data; the folder is incomplete until finalize
            manifest.unlink()

    folders = {p.name: p for p in _patient_dirs(root)}
    wanted = sorted(folders) if patients is None else sorted(set(patients))
    chest = []
    for pid in wanted:
        if pid not in folders:
            err = MayoImportError(f"not found under {root}; {LAYOUT_HINT}", pid, root / pid)
            if not skip:
                raise err
            report["skipped_patients"].append(
                {"patient": pid, "reason": err.reason, "path": str(root / pid)}
            )
        elif not pid.upper().startswith("C"):
            report["ignored"].append(
                {"folder": _rel(folders[pid], root),
                 "reason": "not a chest exam (the paper uses the chest exams C… only)"}
            )
        else:
            chest.append(pid)
    if not chest:
        raise MayoImportError(
            f"no chest patient folders (IDs starting with 'C') under {root}"
            + (f" among the requested {wanted}" if patients is not None else "")
            + f"; {LAYOUT_HINT}",
            path=root,
        )
    authors_all = {p for ids in AUTHORS_SPLIT.values() for p in ids}
    report["not_in_authors_split"] = [p for p in chest if p not in authors_all]
    if patients is None:
        report["authors_patients_missing"] = sorted(authors_all - set(chest))

    bar = tqdm(chest, desc="Import Mayo patients", unit="patient", disable=not progress)
    for pid in bar:
        bar.set_postfix_str(pid)
        split = split_of(pid)
        if writer.has_patient(pid):
            _record_imported(report, pid, writer.patients[pid], authors_all, resumed=True)
            continue
        try:
            loaded = _load_patient(_find_series(pid, folders[pid]), root, skip)
        except MayoImportError as e:
            if not skip:
                raise
            report["skipped_patients"].append(
                {"patient": pid, "reason": e.reason, "path": str(e.path) if e.path else None}
            )
            continue
        writer.add_patient(
            pid,
            split,
            loaded["low"],
            loaded["full"],
            loaded["spacing"],
            loaded["positions"],
            extra=loaded["notes"],
        )
        _record_imported(report, pid, writer.patients[pid], authors_all, resumed=False)
    bar.close()

    present = {p: r for p, r in writer.patients.items() if p in set(chest)}
    for split in SPLITS:
        if not any(r["split"] == split for r in present.values()):
            expected = AUTHORS_SPLIT[split] if split != "train" else ()
            why = (
                f"none of the authors' {split} patients ({', '.join(expected)}) was imported"
                if expected
                else "no chest patient outside the authors' val/test lists was imported"
            )
            skipped = [s["patient"] for s in report["skipped_patients"]]
            raise MayoImportError(
                f"the {split} split is empty: {why} (chest patients found: "
                f"{', '.join(chest)}; skipped: {', '.join(skipped) or 'none'}); see "
                f"{out_dir / 'import_report.md'}",
                path=root,
            )
    # Patients of an earlier run with the same arguments that are no longer requested stay
    # out of the manifest: keep the writer's records to the ones imported now.
    writer.patients = present
    return writer.finalize(
        normalization=(MAYO_MEAN_HU, MAYO_STD_HU),
        normalization_source="authors' constants (ldct-benchmark info.yml)",
    )


def _record_imported(
    report: dict[str, Any], pid: str, rec: dict[str, Any], authors_all: set[str], resumed: bool
) -> None:
    skipped = rec.get("skipped_files", [])
    unpaired = rec.get("unpaired_slices", [])
    report["imported"].append(
        {
            "patient": pid,
            "split": rec["split"],
            "n_slices": rec["n_slices"],
            "low_series": rec.get("low_series"),
            "full_series": rec.get("full_series"),
            "position_source": rec.get("position_source"),
            "in_authors_split": pid in authors_all,
            "resumed": resumed,
            "skipped_files": skipped,
            "unpaired_slices": unpaired,
        }
    )
    report["skipped_files"] += [{"patient": pid, **s} for s in skipped]
    report["unpaired_slices"] += [{"patient": pid, **u} for u in unpaired]
