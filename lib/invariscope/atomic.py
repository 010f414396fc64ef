"""Atomic writes: a file is either the old one or the complete new one, never half written."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON (indented, sorted keys) atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save one array as ``.npy`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Save several arrays as compressed ``.npz`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically (checkpoints)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def file_sha(path: str | Path, length: int = 16) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:length]
