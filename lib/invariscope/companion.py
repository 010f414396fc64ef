"""The executed companion: a profile's executed notebooks, figures inline, beside its results.

After a run that brought every job of a profile up to date, ``run_all.sh`` copies the executed
notebooks from ``runs/<profile>/notebooks/`` to ``figures/<profile>/notebooks/`` (progress bars
reduced to their final state, as Jupyter shows them) with a ``manifest.json`` that records, per
notebook, the hash of its source's code cells and, per result file of ``figures/<profile>/``,
its SHA-256. :func:`stale` compares both with the repository: the committed companion of the
default profile must be of the same run as the committed results and the current notebooks
(``tests/test_companion.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import atomic
from .config.params import digest
from .config.paths import figures_dir, repo_root

__all__ = ["FOLDER", "MANIFEST", "notebook_code_sha", "compact_streams", "publish", "stale"]

#: Sub-folder of ``figures/<profile>/`` that holds the executed notebooks.
FOLDER = "notebooks"
MANIFEST = "manifest.json"
_INJECTED = "injected-parameters"  # papermill's cell with the job's parameters


def _code_cells(nb: dict[str, Any]) -> list[str]:
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb.get("cells", []) if c.get("cell_type") == "code"
            and _INJECTED not in c.get("metadata", {}).get("tags", [])]


def notebook_code_sha(notebook: Path | dict[str, Any]) -> str:
    """Hash of a notebook's code cells (their sources, in order; papermill's injected parameters
    left out): markdown, outputs and metadata do not count, so editing a notebook's text reruns
    nothing, and an executed notebook has the hash of its source."""
    nb = json.loads(notebook.read_text()) if isinstance(notebook, Path) else notebook
    return digest({"code": _code_cells(nb)}, length=16)


def _final_text(text: str) -> str:
    """What a terminal shows of ``text``: per line, what follows the last carriage return."""
    lines = re.split(r"(?<=\n)", text)
    return "".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\n") else line for line in lines)


def compact_streams(nb: dict[str, Any]) -> dict[str, Any]:
    """``nb`` with each run of consecutive stdout/stderr outputs of a cell merged into one and
    its progress-bar redraws (carriage returns) reduced to their final state."""
    for cell in nb.get("cells", []):
        merged: list[dict[str, Any]] = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged
                    and merged[-1].get("output_type") == "stream" and merged[-1]["name"] == out["name"]):
                merged[-1]["text"] += "".join(out["text"])
            else:
                merged.append(dict(out, text="".join(out["text"])) if out.get("output_type") == "stream"
                              else out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = _final_text(out["text"].replace("\r\n", "\n"))
        if "outputs" in cell:
            cell["outputs"] = merged
    return nb


def _results(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def publish(profile: str, executed: Iterable[Path]) -> Path:
    """Copy the ``executed`` notebooks (paths of ``runs/<profile>/notebooks/*.ipynb``) to
    ``figures/<profile>/notebooks/`` with their streams compacted, remove the ones of earlier
    plans, and write the manifest; returns the folder."""
    results = figures_dir(profile)
    out = results / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    sources = repo_root() / "notebooks"
    entries = {}
    for path in sorted(executed):
        nb = compact_streams(json.loads(path.read_text()))
        source = _source_of(path.name, sources)
        atomic.write_text(out / path.name, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        entries[path.name] = {"source": source.name, "code": notebook_code_sha(nb)}
    for old in out.glob("*.ipynb"):
        if old.name not in entries:
            old.unlink()
    atomic.write_json(out / MANIFEST, {"profile": profile, "notebooks": entries,
                                       "results": _results(results)})
    lines = [f"# Executed notebooks of the `{profile}` profile", "",
             f"Written by `./run_all.sh --profile {profile}` with the results in `figures/{profile}/`"
             " (regenerate them together). Sources: [`notebooks/`](../../../notebooks).", ""]
    lines += [f"- [{name}]({name})" for name in entries]
    atomic.write_text(out / "README.md", "\n".join(lines) + "\n")
    return out


def _source_of(executed_name: str, sources: Path) -> Path:
    """The source notebook of an executed one (``04_invariances_cnn10.ipynb`` ->
    ``04_invariances.ipynb``)."""
    stem = Path(executed_name).stem
    for src in sorted(sources.glob("*.ipynb"), key=lambda p: -len(p.stem)):
        if stem == src.stem or stem.startswith(src.stem + "_"):
            return src
    raise FileNotFoundError(f"no source notebook in {sources} for {executed_name}")


def stale(profile: str) -> list[str]:
    """Why the published companion of ``profile`` is not current (empty: it is): a result file
    added, removed or changed since it was published, a notebook whose code differs from its
    source, or no companion at all."""
    results = figures_dir(profile)
    manifest = results / FOLDER / MANIFEST
    if not manifest.is_file():
        return [f"{manifest.relative_to(repo_root())} is missing: run ./run_all.sh --profile {profile}"]
    meta = json.loads(manifest.read_text())
    problems = []
    now = _results(results)
    for name in sorted(set(now) | set(meta["results"])):
        if now.get(name) != meta["results"].get(name):
            problems.append(f"{name} changed since the executed notebooks were published")
    sources = repo_root() / "notebooks"
    for name, entry in meta["notebooks"].items():
        nb = results / FOLDER / name
        if not nb.is_file():
            problems.append(f"{name} is missing")
        elif notebook_code_sha(nb) != entry["code"]:
            problems.append(f"{name} is not the executed notebook the manifest lists")
        elif notebook_code_sha(sources / entry["source"]) != entry["code"]:
            problems.append(f"{name}: the code of notebooks/{entry['source']} changed since it ran")
    return problems
