"""Provenance: what every stage's results depend on, and where its checkpoints are.

Each stage's key is built from the identity of what it reads, so that anything retrained
upstream makes everything downstream stale (and nothing else):

=============  =====================================================================
data           :func:`simulation_key` / :func:`import_key` (the cohort's cache folder),
               :func:`dataset_key` (a prepared data set's manifest)
denoiser       :func:`denoiser_fingerprint` -> :func:`denoiser_identity`
(c)VAE         :func:`vae_fingerprint` -> :func:`vae_identity`
cINN           :func:`cinn_fingerprint` -> :func:`cinn_identity`
invariances    :func:`invariance_key` (crops, counts, seed and the cINN's identity)
embedding      :func:`embedding_set_keys`, :func:`embedding_fingerprint`,
               :func:`embedding_checkpoint`
analysis       :func:`metrics_key`
=============  =====================================================================

A *fingerprint* is the configuration a checkpoint folder was trained with (a checkpoint with
another one is refused, :class:`invariscope.stages.training.CheckpointMismatchError`); an
*identity* adds the content of the checkpoint that is read (``<fingerprint>:<checkpoint_sha>``:
its weights, not its file's bytes, which change whenever the same weights are saved again).
Checkpoints are looked up with :func:`best_checkpoint` (``best.pt``, else ``last.pt``) in
:func:`stage_dir`. The workflow's job stamps (:func:`invariscope.pipeline.job_stamp`) decide
which notebooks run; these keys decide what a notebook that runs recomputes.

The payloads are frozen: changing one makes every finished run of every user stale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from invariscope import atomic
from invariscope.config.params import DataParams, Params, digest
from invariscope.config.paths import run_dir
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import CropSpec, fixed_crops
from invariscope.models.custom import resolve_file, spec
from invariscope.names import TRAINED_METHODS, check_name, cinn_name, is_unconditional, vae_name

__all__ = [
    "digest", "stage_dir", "best_checkpoint", "checkpoint_sha", "existing_checkpoint",
    "simulation_key", "tree_fingerprint", "import_key", "dataset_key",
    "custom_identity", "denoiser_fingerprint", "denoiser_identity", "pool_key",
    "vae_fingerprint", "vae_identity", "cinn_fingerprint", "cinn_identity",
    "INVARIANCE_FORMAT", "invariance_key", "invariance_file",
    "embedding_set_keys", "embedding_fingerprint", "embedding_checkpoint", "metrics_key",
]

#: Format of the stored invariance sets (:func:`invariance_key`).
INVARIANCE_FORMAT = 1
#: Sub-folders of ``runs/<profile>/`` per stage.
STAGE_DIRS = ("denoisers", "vae", "cinn", "invariances", "embedding", "analysis", "pools", "optimized",
              "natural", "layerwise")


# --------------------------------------------------------------------------------------
# Where
# --------------------------------------------------------------------------------------
def stage_dir(params: Params, stage: str, override: str | Path | None = None) -> Path:
    """``runs/<profile>/<stage>`` (``stage`` one of :data:`STAGE_DIRS`), or ``override``."""
    if override is not None:
        return Path(override)
    if stage not in STAGE_DIRS:
        raise ValueError(f"unknown stage folder {stage!r}; allowed values: {', '.join(STAGE_DIRS)}")
    return run_dir(params.profile) / stage


def best_checkpoint(ckpt_dir: str | Path) -> Path:
    """The checkpoint a stage loads: ``best.pt``, else ``last.pt`` (which may not exist)."""
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir / "best.pt" if (ckpt_dir / "best.pt").is_file() else ckpt_dir / "last.pt"


def checkpoint_sha(path: str | Path, length: int = 16) -> str:
    """The content of a checkpoint: a hash of its modules' weights (names, dtypes, shapes, values)
    and its step. The same weights give the same hash however and whenever the file was written
    (``best.pt`` restored from ``last.pt`` after Snakemake deleted it, another torch version)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    h = hashlib.sha256(f"step={ckpt.get('step')}".encode())
    for module in sorted(ckpt["modules"]):
        for key, value in ckpt["modules"][module].items():
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous().reshape(-1)
                h.update(f"{module}.{key}:{t.dtype}:{tuple(value.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
            else:
                h.update(f"{module}.{key}={value!r}".encode())
    return h.hexdigest()[:length]


def existing_checkpoint(ckpt_dir: str | Path, what: str, how: str) -> Path:
    """:func:`best_checkpoint` of ``ckpt_dir``; FileNotFoundError ("no checkpoint of ``what`` in
    ``ckpt_dir``: train it first (``how``)") when neither file exists."""
    path = best_checkpoint(ckpt_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint of {what} in {ckpt_dir}: train it first ({how})")
    return path


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def simulation_key(data: DataParams) -> str:
    """Cache key of a simulated cohort: every parameter that changes its content."""
    return digest({"sim": data.simulation.model_dump(mode="json"),
                   "split": data.split.model_dump(mode="json"), "split_seed": data.split_seed,
                   "format": 2})  # 2: noise draws of fixed random-number consumption


def tree_fingerprint(root: Path) -> str:
    """Digest of a folder tree's files (relative path, size, modification time): changes when a
    file is added, removed or rewritten."""
    entries = []
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            st = path.stat()
            entries.append([str(path.relative_to(root)), st.st_size, st.st_mtime_ns])
    return digest({"files": entries}, length=16)


def import_key(root: Path, on_error: str) -> str:
    """Cache key of an imported Mayo tree at ``root`` (resolved): its folder, ``data.on_error``
    and the files in it (a repaired, added or removed DICOM file is imported again)."""
    return digest({"root": str(root), "on_error": on_error, "tree": tree_fingerprint(root),
                   "format": 1})


def dataset_key(dataset: CTDataset) -> str:
    """A short hash of a dataset's manifest (source, parameters, patients, normalization)."""
    return digest(dataset.manifest)


# --------------------------------------------------------------------------------------
# Denoisers, (c)VAEs, cINNs
# --------------------------------------------------------------------------------------
def custom_identity(name: str, params: Params) -> str:
    """What a custom denoiser's output depends on: its entry, its module file and weights."""
    entry = spec(name, params)
    h = hashlib.sha256(entry.model_dump_json().encode())
    where = entry.module.rsplit(":", 1)[0]
    files = [resolve_file(where, params, "module file")] if where.endswith(".py") else []
    if entry.weights is not None:
        files.append(resolve_file(entry.weights, params, "weights"))
    for f in files:
        h.update(f.read_bytes())
    return f"custom-{name}-{h.hexdigest()[:16]}"


def denoiser_fingerprint(name: str, params: Params, dataset: CTDataset) -> str:
    """Configuration key of a method's checkpoints: its params section, seed, data set
    (and, for WGAN-VGG, the VGG weights setting). Another key makes a checkpoint unusable.

    ``iterations`` is left out: no setting depends on the run length, so raising it continues a
    finished run where it stopped (a checkpoint past the requested length is refused instead).
    """
    name = check_name(name, params)
    payload: dict[str, Any] = {"method": name, "seed": params.seed, "dataset": dataset_key(dataset)}
    if name in TRAINED_METHODS:
        cfg = getattr(params.denoisers, name)
        off = {k for k, v in (("lambda_pixel", 0), ("lr_final", 1))  # keys at their paper values
               if getattr(cfg, k, None) == v}  # leave the stamps of earlier runs alone
        payload["train"] = cfg.model_dump(mode="json", exclude={"iterations"} | off)
    if name == "wganvgg":
        payload["vgg_weights"] = params.denoisers.vgg_weights
    if name in TRAINED_METHODS and params.denoisers.select_by != "ssim":  # which step is best.pt
        payload["select_by"] = params.denoisers.select_by
    if name in params.denoisers.custom:
        payload["custom"] = custom_identity(name, params)
    return f"{name}-{digest(payload)}"


def denoiser_identity(denoiser: str | None, params: Params, dataset: CTDataset,
                      denoiser_dir: str | Path | None = None) -> str:
    """What a cVAE's ŷ depends on: the denoiser's configuration and its checkpoint's content.

    ``"none"`` (unconditional), ``"gaussri"`` (no checkpoint), :func:`custom_identity` or
    ``<fingerprint>:<checkpoint_sha of the checkpoint load_denoiser reads>`` (best.pt, else last.pt).
    """
    name = vae_name(denoiser, params)
    if is_unconditional(name):
        return "none"
    if name == "gaussri":
        return "gaussri"
    if name in params.denoisers.custom:
        return custom_identity(name, params)
    folder = stage_dir(params, "denoisers", denoiser_dir) / name
    path = existing_checkpoint(folder, f"denoiser {name}",
                               "01_denoiser.ipynb, ./run_all.sh --only denoiser")
    return f"{denoiser_fingerprint(name, params, dataset)}:{checkpoint_sha(path)}"


def pool_key(name: str, params: Params, dataset: CTDataset, crops: Sequence[CropSpec],
             denoiser_dir: str | Path | None = None) -> str:
    """Cache key of ŷ = f(x) of a fixed training pool (shared by a denoiser's spatial cVAE and
    cINN): the denoiser's identity, the data set and the crops."""
    return digest({"denoiser": denoiser_identity(name, params, dataset, denoiser_dir),
                   "dataset": dataset_key(dataset), "crops": [list(map(int, c)) for c in crops]})


def vae_fingerprint(denoiser: str | None, params: Params, dataset: CTDataset,
                    denoiser_dir: str | Path | None = None) -> str:
    """Configuration key of a VAE's checkpoints: the ``vae`` section (without ``iterations`` and
    ``n_test_crops``, which do not change the training), the seed, the data set and the denoiser
    (name and checkpoint identity)."""
    name = vae_name(denoiser, params)
    payload = {"vae": params.vae.model_dump(mode="json", exclude={"iterations", "n_test_crops"}),
               "seed": params.seed, "dataset": dataset_key(dataset), "denoiser": name,
               "denoiser_identity": denoiser_identity(name, params, dataset, denoiser_dir)}
    return f"vae-{name}-{digest(payload)}"


def vae_identity(denoiser: str, params: Params, dataset: CTDataset, vae_dir: str | Path | None = None,
                 denoiser_dir: str | Path | None = None) -> str:
    """``<VAE fingerprint>:<checkpoint_sha of the cVAE checkpoint load_vae reads>`` of a denoiser's cVAE."""
    name = cinn_name(denoiser, params)
    folder = stage_dir(params, "vae", vae_dir) / name
    path = existing_checkpoint(folder, f"the cVAE of {name}", "02_vae.ipynb, ./run_all.sh --only vae")
    fp = vae_fingerprint(name, params, dataset, stage_dir(params, "denoisers", denoiser_dir))
    return f"{fp}:{checkpoint_sha(path)}"


def cinn_fingerprint(denoiser: str, params: Params, dataset: CTDataset,
                     vae_dir: str | Path | None = None, denoiser_dir: str | Path | None = None) -> str:
    """Configuration key of a cINN's checkpoints: the ``cinn`` section (without ``iterations``
    when the learning rate is constant), the seed, the data set, the denoiser and the identity
    of its cVAE checkpoint."""
    name = cinn_name(denoiser, params)
    # iterations are left out (a finished run can be extended) unless a cosine schedule uses them
    kept = set() if params.cinn.lr_final < 1.0 else {"iterations"}
    payload = {"cinn": params.cinn.model_dump(mode="json", exclude=kept),
               "latent_dim": params.vae.latent_dim, "crop_size": params.vae.crop_size,
               "seed": params.seed, "dataset": dataset_key(dataset), "denoiser": name,
               "vae_identity": vae_identity(name, params, dataset, vae_dir, denoiser_dir)}
    return f"cinn-{name}-{digest(payload)}"


def cinn_identity(denoiser: str, params: Params, dataset: CTDataset,
                  out_dir: str | Path | None = None, vae_dir: str | Path | None = None,
                  denoiser_dir: str | Path | None = None) -> str:
    """``<cINN fingerprint>:<checkpoint_sha of the checkpoint load_cinn reads>``: what sampled invariances
    depend on (the ``models`` of :func:`invariance_key`)."""
    name = cinn_name(denoiser, params)
    folder = stage_dir(params, "cinn", out_dir) / name
    path = existing_checkpoint(folder, f"the cINN of {name}", "03_cinn.ipynb, ./run_all.sh --only cinn")
    return f"{cinn_fingerprint(name, params, dataset, vae_dir, denoiser_dir)}:{checkpoint_sha(path)}"


# --------------------------------------------------------------------------------------
# Invariances, embedding, analysis
# --------------------------------------------------------------------------------------
def invariance_key(crops: Sequence[CropSpec], n_invariances: int, seed: int, prior: bool,
                   split: str = "test", models: str = "", outputs: bool = True,
                   precision: str = "fp32") -> str:
    """Cache key of a set of invariances (crops, counts, seed, ablation flag, model identity,
    whether f(x̃) was computed, the generation's precision)."""
    payload = {"crops": [list(map(int, s)) for s in crops], "n": int(n_invariances),
               "seed": int(seed), "prior": bool(prior), "split": split, "models": models,
               "format": INVARIANCE_FORMAT}
    if not outputs:  # keys of sets with f(x̃) stay as they were
        payload["outputs"] = False
    if precision != "fp32":  # and those sampled in float32
        payload["precision"] = precision
    return digest(payload, length=16)


def invariance_file(inv_dir: str | Path, name: str) -> Path:
    """``<inv_dir>/<name>.npz``; FileNotFoundError naming the notebook to run when it is missing."""
    path = Path(inv_dir) / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run 04_invariances.ipynb for {name} first "
                                "(./run_all.sh --only invariances)")
    return path


def embedding_set_keys(params: Params, dataset: CTDataset, split: str,
                       cinn_dir: str | Path | None = None, vae_dir: str | Path | None = None,
                       denoiser_dir: str | Path | None = None) -> dict[str, tuple[str, str, list]]:
    """Per denoiser of the embedding's ``split`` set ("train" or "val"): ``(key, models, crops)``
    with the set's :func:`invariance_key`, its models' :func:`cinn_identity` and its crops."""
    cfg = params.embedding
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    n = cfg.n_train_crops if split == "train" else cfg.n_val_crops
    crops = fixed_crops(dataset, split, params.vae.crop_size, n, cfg.seed)
    out = {}
    for name in params.denoisers.methods:
        models = cinn_identity(name, params, dataset, cinn_dir, vae_dir, denoiser_dir)
        key = invariance_key(crops, cfg.n_invariances, cfg.seed, False, split, models, outputs=False,
                             precision=params.precision)
        out[name] = (key, models, crops)
    return out


def embedding_fingerprint(params: Params, data_key: str) -> str:
    """Configuration key of the embedding's checkpoints: the ``embedding`` section (without
    ``iterations``), the crop size and the key of the training and validation sets (crops,
    counts, seed, and the identity of every cINN/cVAE/denoiser checkpoint they were drawn with)."""
    payload = {"embedding": params.embedding.model_dump(mode="json", exclude={"iterations"}),
               "crop_size": params.vae.crop_size, "data": data_key}
    return f"embedding-{digest(payload)}"


def embedding_data_key(set_keys: Mapping[str, tuple[str, str, list]]) -> str:
    """The key of one split's pooled set from its :func:`embedding_set_keys`."""
    return digest({name: key for name, (key, _, _) in set_keys.items()})


def embedding_checkpoint(params: Params, dataset: CTDataset, out_dir: str | Path | None = None, *,
                         cinn_dir: str | Path | None = None, vae_dir: str | Path | None = None,
                         denoiser_dir: str | Path | None = None) -> Path:
    """The checkpoint the embedding stage loads (``best.pt``, else ``last.pt``) for the current
    denoisers, cINNs and settings; FileNotFoundError naming the notebook to run when it is missing."""
    out = stage_dir(params, "embedding", out_dir)
    keys = {s: embedding_data_key(embedding_set_keys(params, dataset, s, cinn_dir, vae_dir, denoiser_dir))
            for s in ("train", "val")}
    folder = out / embedding_fingerprint(params, digest(keys))
    path = best_checkpoint(folder)
    if path.is_file():
        return path
    others = sorted(p.parent.name for p in out.glob("*/last.pt"))
    why = (f"the embeddings there ({', '.join(others)}) were trained on other denoisers, cINNs or "
           "settings" if others else "it was not trained yet")
    raise FileNotFoundError(f"no embedding checkpoint in {folder}: {why}. run 05_embedding.ipynb "
                            "for this profile (after 03_cinn.ipynb for every denoiser)")


def metrics_key(inv_dir: str | Path, methods: Sequence[str], checkpoints: Sequence[str | Path],
                extra: Mapping[str, object] | None = None) -> str:
    """What the per-crop metrics of the analysis depend on: the key of every invariance set, the
    content of the ``checkpoints`` (unconditional VAE, embedding) and ``extra`` settings."""
    sets = {}
    for name in methods:
        path = invariance_file(inv_dir, name)
        with np.load(path, allow_pickle=False) as z:
            sets[name] = str(z["key"]) if "key" in z.files else atomic.file_sha(path)
    return digest({"sets": sets, "checkpoints": [checkpoint_sha(Path(c)) for c in checkpoints],
                   "extra": dict(extra or {})}, length=16)
