"""The files one stage hands to the next, written and read here (not in notebook cells).

====================================  ===============  ==========================================
file (under ``runs/<profile>/``)      written by       read by
====================================  ===============  ==========================================
``denoisers/<d>/test_metrics.csv``    01_denoiser      01b_table1_figure3 (Table 1)
``vae/<name>/report.json``            02_vae           02b_figure4 (``vae_reconstruction.csv``)
``invariances/<d>_controls.json``     04_invariances   04b_figure5_controls (``controls.csv``)
``embedding/summary.json``            05_embedding     the workflow (the stage's output)
``optimized/<d>_summary.json``        07_optimized     the workflow (the stage's output)
====================================  ===============  ==========================================

Every writer is atomic; every reader says which notebook to run when its file is missing.
The checkpoints and invariance sets the stages also hand on are found through
:mod:`invariscope.provenance`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from invariscope import atomic
from invariscope.names import UNCONDITIONAL
from invariscope.stages import invariances as inv

__all__ = ["write_test_metrics", "read_test_metrics", "write_vae_report", "read_vae_report",
           "write_controls", "read_controls", "write_embedding_summary", "read_embedding_summary",
           "write_optimized_summary"]


def _missing(path: Path, notebook: str, stage: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} is missing: run {notebook} first (./run_all.sh --only {stage})")


def write_test_metrics(per_slice: pd.DataFrame, denoiser_dir: str | Path, name: str) -> Path:
    """``<denoiser_dir>/<name>/test_metrics.csv``: a denoiser's metrics per test slice."""
    path = Path(denoiser_dir) / name / "test_metrics.csv"
    atomic.write_text(path, per_slice.to_csv(index=False))
    return path


def read_test_metrics(denoiser_dir: str | Path, name: str) -> pd.DataFrame:
    """The per-slice test metrics of a denoiser (:func:`write_test_metrics`)."""
    path = Path(denoiser_dir) / name / "test_metrics.csv"
    if not path.is_file():
        raise _missing(path, f"01_denoiser.ipynb for {name}", "denoiser")
    return pd.read_csv(path)


def write_vae_report(report: Mapping[str, Any], vae_dir: str | Path) -> Path:
    """``<vae_dir>/<report["vae"]>/report.json``: a VAE's reconstruction report."""
    path = Path(vae_dir) / str(report["vae"]) / "report.json"
    atomic.write_json(path, dict(report))
    return path


def read_vae_report(name: str | None, vae_dir: str | Path) -> dict[str, Any]:
    """The ``report.json`` of a VAE (None: the unconditional one)."""
    key = UNCONDITIONAL if name is None else str(name).lower()
    path = Path(vae_dir) / key / "report.json"
    if not path.is_file():
        raise _missing(path, f"02_vae.ipynb with denoiser = {key!r}", "vae")
    return json.loads(path.read_text())


def write_controls(row: Mapping[str, Any], inv_dir: str | Path) -> Path:
    """``<inv_dir>/<row["denoiser"]>_controls.json``: a denoiser's control measures."""
    path = Path(inv_dir) / f"{row['denoiser']}_controls.json"
    atomic.write_json(path, dict(row))
    return path


def read_controls(inv_dir: str | Path, methods: Sequence[str]) -> list[dict[str, Any]]:
    """The control measures of every denoiser of ``methods`` (:func:`write_controls`), in order.

    A file written before a measure was added (an older version of the library: its stage is up
    to date, so nothing reruns it) is completed from the stored invariance sets beside it and
    rewritten, without resampling."""
    rows = []
    for name in methods:
        path = Path(inv_dir) / f"{name}_controls.json"
        if not path.is_file():
            raise _missing(path, f"04_invariances.ipynb for {name}", "invariances")
        row = json.loads(path.read_text())
        lacking = [k for k in inv.MEASURES if k not in row]
        if lacking:
            prior = Path(inv_dir) / f"{name}_prior.npz"
            measures = inv.control_measures(inv.load_invariances(Path(inv_dir) / f"{name}.npz"),
                                            inv.load_invariances(prior) if prior.is_file() else None)
            row.update({k: measures[k] for k in lacking})
            write_controls(row, inv_dir)
            print(f"{path.name}: added {', '.join(lacking)} from the stored invariances")
        rows.append(row)
    return rows


def write_embedding_summary(summary: Mapping[str, Any], emb_dir: str | Path) -> Path:
    """``<emb_dir>/summary.json``: what the embedding stage trained and how well it retrieves."""
    path = Path(emb_dir) / "summary.json"
    atomic.write_json(path, dict(summary))
    return path


def read_embedding_summary(emb_dir: str | Path) -> dict[str, Any]:
    """The embedding stage's :func:`write_embedding_summary`."""
    path = Path(emb_dir) / "summary.json"
    if not path.is_file():
        raise _missing(path, "05_embedding.ipynb", "embedding")
    return json.loads(path.read_text())


def write_optimized_summary(summary: Mapping[str, Any], opt_dir: str | Path) -> Path:
    """``<opt_dir>/<summary["denoiser"]>_summary.json``: what 07_optimized_invariances computed for
    one denoiser (crops, seconds per method, the change measures)."""
    path = Path(opt_dir) / f"{summary['denoiser']}_summary.json"
    atomic.write_json(path, dict(summary))
    return path
