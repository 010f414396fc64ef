"""Build (or find in the cache) the dataset a profile asks for.

* ``data.source: simulated`` — the embedded default: a procedural chest cohort
  (:mod:`invariscope.data.phantom`) with projection-domain dose simulation (:mod:`invariscope.data.ctsim`),
  split on patient level, generated once and cached under ``data/simulated/<key>/`` where the
  key is a hash of every simulation and split parameter.
* ``data.source: mayo`` — the Mayo LDCT-and-Projection-data tree, imported once
  (:mod:`invariscope.data.mayo`) into ``data/mayo/<key>/``.

Both end as the same on-disk format (:mod:`invariscope.data.dataset`).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from invariscope.config.params import DataParams, Params, SimulationParams
from invariscope.config.paths import RELATIVE_RULE, data_dir, repo_root, resolve_setting
from invariscope.data import ctsim, phantom
from invariscope.data.dataset import CTDataset, DatasetError, DatasetWriter
from invariscope.data.mayo import import_mayo
from invariscope.evaluation.metrics import rmse_hu
from invariscope.provenance import import_key, simulation_key


def assign_splits(n_train: int, n_val: int, n_test: int, seed: int) -> list[str]:
    """Split labels for patients 0..n-1: a seeded permutation, 35/10/5 in the paper."""
    labels = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    return list(np.random.default_rng(seed).permutation(labels))


def simulated_patient_ids(n: int) -> list[str]:
    """IDs S001, S002, ... of the simulated patients."""
    return [f"S{i + 1:03d}" for i in range(n)]


def simulate_patient(
    sim: SimulationParams, index: int
) -> tuple[np.ndarray, np.ndarray, float, list[float]]:
    """Low- and full-dose HU slices (n, H, W) of simulated patient ``index``, pixel size (mm) and
    slice positions (mm).

    Every patient has its own random stream (``[sim.seed, index]``): a patient's images do not
    depend on how many others are built, so an interrupted build resumes exactly.
    """
    rng = np.random.default_rng([sim.seed, index])
    anatomy = phantom.sample_anatomy(rng)
    lo, hi = sim.slices_per_patient
    n_slices = int(rng.integers(lo, hi + 1))
    hu = phantom.render_slices(anatomy, n_slices, sim.image_size, sim.fov_mm, rng)
    projector = ctsim.get_projector(sim.image_size, sim.fov_mm, sim.n_views, sim.n_detectors)
    low, full = ctsim.simulate_dose_pair(
        hu,
        projector=projector,
        full_dose_photons=sim.full_dose_photons,
        dose_fraction=sim.dose_fraction,
        electronic_noise_sd=sim.electronic_noise_sd,
        mu_water_per_mm=sim.mu_water_per_mm,
        rng=rng,
        filter=sim.fbp_filter,
    )
    positions = phantom.slice_positions(anatomy, n_slices) * anatomy.chest_length_mm
    return low, full, sim.fov_mm / sim.image_size, [float(p) for p in positions]


def build_simulated_cohort(data: DataParams, root: Path | None = None, progress: bool = True) -> CTDataset:
    """Build the simulated cohort (or return the cached one); resumes an interrupted build."""
    root = root or simulated_root(data)
    if (root / "manifest.json").is_file():
        return CTDataset(root)
    sp = data.split
    labels = assign_splits(sp.train, sp.val, sp.test, data.split_seed)
    ids = simulated_patient_ids(len(labels))
    writer = DatasetWriter(root, source="simulated", params=data.model_dump(mode="json"))
    todo = [i for i, pid in enumerate(ids) if not writer.has_patient(pid)]
    for i in tqdm(todo, desc="simulating patients", unit="patient", disable=not progress):
        low, full, spacing, positions = simulate_patient(data.simulation, i)
        writer.add_patient(ids[i], labels[i], low, full, spacing, positions_mm=positions)
    return writer.finalize(normalization=None)


def mayo_root(data: DataParams, source_file: str | None = None) -> Path:
    """``data.mayo_root`` of the params file ``source_file`` as an absolute path
    (:data:`~invariscope.config.paths.RELATIVE_RULE`), whatever folder a notebook runs in."""
    return resolve_setting(str(data.mayo_root), source_file).resolve()


def mayo_import_dir(data: DataParams, source_file: str | None = None) -> Path:
    """The cache folder of an imported Mayo tree: ``data/mayo/<import key>``."""
    return data_dir() / "mayo" / import_key(mayo_root(data, source_file), data.on_error)


def simulated_root(data: DataParams) -> Path:
    """The cache folder of a simulated cohort: ``data/simulated/<simulation key>``."""
    return data_dir() / "simulated" / simulation_key(data)


def _remove_cache(root: Path) -> None:
    """Delete a dataset cache folder (only one this package wrote: it lies under ``data/``)."""
    if root.exists():
        if data_dir().resolve() not in root.resolve().parents:
            raise DatasetError(f"refusing to delete {root}: not a dataset cache under {data_dir()}")
        shutil.rmtree(root)


def prepare_dataset(params: Params, progress: bool = True, force: bool = False) -> CTDataset:
    """The dataset of a profile: the cached simulated cohort, or the imported Mayo data.

    ``force``: rebuild the cache (simulate again, or import the DICOM tree again).
    """
    data = params.data
    if data.source == "simulated":
        if force:
            _remove_cache(simulated_root(data))
        return build_simulated_cohort(data, progress=progress)
    if not data.mayo_root:
        raise DatasetError(
            f"profile {params.profile!r} uses the Mayo data (data.source: mayo) but data.mayo_root "
            "is not set: pass --data /path/to/LDCT-and-Projection-data to run_all.sh, or set "
            f"data.mayo_root in {params.source_file}"
        )

    source = mayo_root(data, params.source_file)
    if not source.is_dir():
        raise DatasetError(f"data.mayo_root = {str(data.mayo_root)!r} ({params.source_file}): no "
                           f"folder {source} ({RELATIVE_RULE})")
    root = mayo_import_dir(data, params.source_file)
    if force:
        _remove_cache(root)
    if (root / "manifest.json").is_file():
        return CTDataset(root)
    return import_mayo(source, root, on_error=data.on_error,
                       progress=progress)


def ld_rmse_hu(dataset: CTDataset, split: str = "test") -> np.ndarray:
    """Per-slice RMSE (HU) of low vs full dose, values clipped to [-1024, 1900] (Table 1, LD row)."""
    out = []
    for pid in dataset.patients(split):
        low, full = dataset.volume(pid, "low"), dataset.volume(pid, "full")
        out.extend(rmse_hu(a, b) for a, b in zip(low, full))
    if not out:
        raise DatasetError(f"split {split!r} of {dataset.root} is empty")
    return np.asarray(out)


def noise_check(sim: SimulationParams, n_repeats: int = 4, seed: int = 0) -> dict[str, Any]:
    """Noise SD and bias of low/full dose in a uniform water cylinder at the profile's geometry.

    The cylinder (radius 60 mm, like a small patient's soft tissue) is the uniform region of the
    physics tests; much larger water paths starve the low-dose projections of photons (the
    simulated cohort shows that too: see the README).

    Returns SDs (HU) inside the central region, their ratio against the expected
    sqrt(1/dose), and the mean bias (HU) of each dose against the noiseless reconstruction.
    """
    size = sim.image_size
    yy, xx = (np.mgrid[:size, :size] - (size - 1) / 2) * (sim.fov_mm / size)
    r = np.hypot(yy, xx)
    radius = 60.0
    water = np.where(r < radius, 0.0, -1000.0).astype(np.float32)[None].repeat(n_repeats, 0)
    projector = ctsim.get_projector(size, sim.fov_mm, sim.n_views, sim.n_detectors)
    rng = np.random.default_rng(seed)
    low, full = ctsim.simulate_dose_pair(
        water, projector=projector, full_dose_photons=sim.full_dose_photons,
        dose_fraction=sim.dose_fraction, electronic_noise_sd=sim.electronic_noise_sd,
        mu_water_per_mm=sim.mu_water_per_mm, rng=rng, filter=sim.fbp_filter)
    clean = ctsim.reconstruct_noiseless(water[:1], projector=projector,
                                        mu_water_per_mm=sim.mu_water_per_mm, filter=sim.fbp_filter)
    roi = r < 0.5 * radius
    sd_low = float(np.std((low - clean)[:, roi]))
    sd_full = float(np.std((full - clean)[:, roi]))
    expected = float(np.sqrt(1.0 / sim.dose_fraction))
    return {
        "sd_low_hu": sd_low,
        "sd_full_hu": sd_full,
        "ratio": sd_low / sd_full,
        "expected_ratio": expected,
        "ratio_error": sd_low / sd_full / expected - 1.0,
        "bias_low_hu": float(np.mean((low - clean)[:, roi])),
        "bias_full_hu": float(np.mean((full - clean)[:, roi])),
    }


#: Rows of ``data_physics.csv`` that identify a cohort.
HASH_ROW, KEY_ROW = "cohort content hash", "cohort parameters key"


def _committed_rows(csv_file: Path) -> dict[str, str] | None:
    """The rows of ``csv_file``, or of its committed version (``git show HEAD:<file>``) when the
    file is gone: Snakemake deletes a job's outputs before it runs the job."""
    try:
        return dict(csv.reader(csv_file.open()))
    except (OSError, ValueError):
        pass
    try:
        rel = csv_file.resolve().relative_to(repo_root())
        out = subprocess.run(["git", "-C", str(repo_root()), "show", f"HEAD:{rel.as_posix()}"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return dict(csv.reader(out.splitlines()))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def committed_hash_check(dataset: CTDataset, data: DataParams, csv_file: Path) -> tuple[bool, str]:
    """Compare a simulated cohort's content hash with the one recorded in ``csv_file`` (the
    committed ``figures/<profile>/data_physics.csv``, read before this run overwrites it, or from
    git's HEAD when the file is missing).

    Returns (ok, message). ``ok`` is False only when the file records the same simulation
    parameters (:func:`~invariscope.provenance.simulation_key`) but another hash: the cohort should have come out
    identical and did not. No file, another key or Mayo data: nothing to compare, ok.
    """
    if dataset.source != "simulated":
        return True, "Mayo data: no committed hash to compare with"
    rows = _committed_rows(csv_file)
    if rows is None:
        return True, f"no committed {csv_file.name} to compare the cohort hash with"
    if rows.get(KEY_ROW) != simulation_key(data) or HASH_ROW not in rows:
        return True, f"{csv_file.name} records another cohort (other data parameters): not compared"
    if rows[HASH_ROW] == dataset.content_hash:
        return True, f"cohort hash {dataset.content_hash}: identical to the committed cohort"
    return False, (f"cohort hash {dataset.content_hash} differs from the committed {rows[HASH_ROW]} "
                   "for the same data parameters: this machine simulated another cohort, so every "
                   "later result can differ from the committed ones (docs/reproducibility.md)")

