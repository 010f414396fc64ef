"""Every path of the companion, built from one repository-root anchor.

The anchor is the repository root (the folder holding ``pyproject.toml`` and ``params/``),
found from this file's location (the package is installed editable from ``lib/``).
``INVARISCOPE_ROOT`` overrides it, e.g. for a copy of the notebooks outside the clone.
Notebooks therefore run the same under papermill, nbval and JupyterLab, whatever their
working directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The repository root (``$INVARISCOPE_ROOT`` or two levels above the package ``lib/invariscope``)."""
    env = os.environ.get("INVARISCOPE_ROOT")
    here = Path(__file__).resolve()  # <root>/lib/invariscope/config/paths.py
    root = Path(env).expanduser().resolve() if env else here.parents[3]
    if not (root / "params").is_dir():
        raise FileNotFoundError(
            f"{root} does not look like the invariscope repository (no params/ folder). "
            "Install the package editable from a clone (pip install -e .) or set INVARISCOPE_ROOT."
        )
    return root


#: The one rule for relative paths in params files (error messages quote it).
RELATIVE_RULE = ("a relative path in a params file is looked up next to that params file first, "
                 "then in the repository root")


def setting_candidates(setting: str | os.PathLike[str],
                       source_file: str | os.PathLike[str] | None) -> list[Path]:
    """Where a path setting of a params file is looked for, in order (:data:`RELATIVE_RULE`):
    itself when absolute (``~`` expanded), else next to ``source_file``, then the repository root."""
    path = Path(setting).expanduser()
    if path.is_absolute():
        return [path]
    beside = [Path(source_file).expanduser().resolve().parent / path] if source_file else []
    return [*beside, repo_root() / path]


def resolve_setting(setting: str | os.PathLike[str], source_file: str | os.PathLike[str] | None
                    ) -> Path:
    """A path setting of a params file: the first of :func:`setting_candidates` that exists,
    else the last (so that errors name it)."""
    candidates = setting_candidates(setting, source_file)
    return next((c for c in candidates if c.exists()), candidates[-1])


def params_dir() -> Path:
    """Folder of the profile YAML files."""
    return repo_root() / "params"


def data_dir() -> Path:
    """Cache of built/imported datasets (``$INVARISCOPE_DATA`` overrides; git-ignored)."""
    env = os.environ.get("INVARISCOPE_DATA")
    return Path(env).expanduser().resolve() if env else repo_root() / "data"


def run_dir(profile: str) -> Path:
    """Per-profile run folder: executed notebooks, checkpoints, intermediate results."""
    return repo_root() / "runs" / profile


def figures_dir(profile: str) -> Path:
    """Per-profile folder of the figures and tables the notebooks write."""
    return repo_root() / "figures" / profile


def ensure(path: Path) -> Path:
    """Create ``path`` (a folder) if needed and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path
