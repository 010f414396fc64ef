"""Invariances found by optimization in the input (talk 003, "Reconstructing invariances").

For a test crop x and a denoiser f, an invariance is a large change of the input that leaves the
output alone, the mirror image of an adversarial example:

    x_inv = argmin_x' d(f(x), f(x')) − α · min(d(x, x'), bound),   x' initialized as x + N(0, σ²)

with Adam for ``iterations`` steps and d one of the talk's distances
(:mod:`invariscope.evaluation.distances`: MSE, structural dissimilarity, VGG16 features). The
talk bounds the MSE by +1; the same bound applies to every d here (SSIM's is at most 1 anyway).
Crops and restarts (independent starting points) are optimized in one batch; the objective is a
sum over the batch, so every x' sees the gradient of its own objective only. Runs go through
:func:`invariscope.stages.training.train`: progress bar, atomic ``last.pt`` every
``checkpoint_every`` steps, resume, and a clear error on a non-finite objective.

Sets are stored like the cINN's (:mod:`invariscope.stages.invariances`): ``x``, ``y``, ``y_hat``,
``x_tilde`` (N, restarts, c, c), ``f_x_tilde``, ``crops``, in HU.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from invariscope import atomic
from invariscope.config.params import Params, digest
from invariscope.config.paths import RELATIVE_RULE, resolve_setting
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import CropDataset, CropSpec, Normalizer
from invariscope.device import module_device
from invariscope.evaluation.distances import DISTANCES, Distance, VGGDistance, distance
from invariscope.stages import training
from invariscope.stages.invariances import ARRAY_KEYS, load_invariances, stored_key

__all__ = [
    "OPT_FORMAT",
    "InputVariable",
    "frozen",
    "initial_inputs",
    "objective",
    "optimize_inputs",
    "load_crops",
    "optimized_invariances",
    "profile_invariances",
]

#: Version of the stored sets (part of their key).
OPT_FORMAT = 1


class InputVariable(nn.Module):
    """The inputs x' being optimized, as the one parameter of a module (so that
    :func:`~invariscope.stages.training.train` checkpoints and resumes them)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(init.detach().clone())


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with its parameters' ``requires_grad`` off (restored on exit):
    gradients reach the input only."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def initial_inputs(x: torch.Tensor, restarts: int, init_sd: float, seed: int,
                   first: int = 0) -> torch.Tensor:
    """x' = x + N(0, init_sd²) for every crop and restart, ``(N · restarts, 1, H, W)`` (crop-major).

    Crop ``first + i``, restart ``r`` draws from its own generator seeded with (seed, crop, r), on
    the CPU: the same starts whatever the batching and the device.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    out = []
    for i in range(len(x)):
        for r in range(restarts):
            g = torch.Generator().manual_seed(int(digest([seed, first + i, r], length=15), 16))
            out.append(x[i].cpu() + init_sd * torch.randn(x[i].shape, generator=g, dtype=x.dtype))
    return torch.stack(out).to(x.device)


def objective(f: nn.Module, x: torch.Tensor, y_hat: torch.Tensor, x_prime: torch.Tensor,
              dist: Distance, alpha: float, bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: ``(J, d_out, d_in)`` with d_out = d(f(x), f(x')), d_in = min(d(x, x'), bound) and
    J = d_out − α · d_in (``x``, ``y_hat`` = f(x) and ``x_prime`` of one shape)."""
    d_out = dist(f(x_prime), y_hat)
    d_in = dist(x_prime, x).clamp(max=bound)
    return d_out - alpha * d_in, d_out, d_in


def optimize_inputs(f: nn.Module, x: torch.Tensor, dist: Distance, *, alpha: float, bound: float,
                    init_sd: float, iterations: int, lr: float, restarts: int, seed: int,
                    ckpt_dir: str | Path, fingerprint: str, checkpoint_every: int = 100,
                    first: int = 0, progress: bool = True, desc: str = "optimize"
                    ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Optimize x' for the crops ``x`` (N, 1, H, W, normalized, on f's device): returns x_inv
    ``(N · restarts, 1, H, W)`` (crop-major) and the logged history (``objective``, ``d_out``,
    ``d_in``, means over the batch, every ``checkpoint_every`` steps).

    Resumes from ``<ckpt_dir>/last.pt`` when its ``fingerprint`` matches (a checkpoint of another
    configuration raises :class:`~invariscope.stages.training.CheckpointMismatchError`).
    ``first``: index of ``x[0]`` among all crops (the starting points' seeds).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    x = x.detach()
    with frozen(f), torch.no_grad():
        y_hat = f(x)
    x_rep = x.repeat_interleave(restarts, 0)
    y_rep = y_hat.repeat_interleave(restarts, 0)
    var = InputVariable(initial_inputs(x, restarts, init_sd, seed, first))
    opt = torch.optim.Adam(var.parameters(), lr=lr)

    def step(_: int, __: Any) -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        j, d_out, d_in = objective(f, x_rep, y_rep, var.x, dist, alpha, bound)
        j.sum().backward()
        opt.step()
        return {"objective": j.detach().mean(), "d_out": d_out.detach().mean(),
                "d_in": d_in.detach().mean()}

    def batches(_: int) -> Iterator[None]:
        return itertools.repeat(None)

    with frozen(f):
        result = training.train(step, batches, iterations, ckpt_dir, {"x": var}, {"adam": opt},
                                fingerprint, seed, checkpoint_every=checkpoint_every,
                                desc=desc, progress=progress)
    return var.x.detach(), result.history


def load_crops(dataset: CTDataset, crops: Sequence[CropSpec], size: int, split: str = "test"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-dose and full-dose crops ``(N, 1, size, size)`` (normalized) of ``crops``."""
    ds = CropDataset(dataset, split, size)
    pairs = [ds[tuple(int(v) for v in s)] for s in crops]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _key(crops: Sequence[CropSpec], settings: Mapping[str, Any], models: str) -> str:
    return digest({"crops": [list(map(int, s)) for s in crops], "settings": dict(settings),
                   "models": models, "format": OPT_FORMAT}, length=16)


def optimized_invariances(path: str | Path, f: nn.Module, dataset: CTDataset,
                          crops: Sequence[CropSpec], size: int, dist: Distance, *, alpha: float,
                          bound: float, init_sd: float, iterations: int, lr: float, restarts: int,
                          seed: int, batch_crops: int, checkpoint_every: int = 100,
                          settings: Mapping[str, Any] | None = None, models: str = "",
                          force: bool = False, progress: bool = True, mode: str = "opt"
                          ) -> dict[str, np.ndarray]:
    """:func:`optimize_inputs` for ``crops`` of the test split, ``batch_crops`` at a time, into
    ``path`` (.npz, reused when its key matches: crops, ``settings``, ``models``).

    ``settings``: everything else the result depends on (distance name and its options), part of
    the key; ``models``: the denoiser's identity. While running, each batch of crops checkpoints in
    ``<path stem>.work/<first>_<last>/`` (resume); that folder is removed at the end.
    ``force=True`` starts over. Returns the arrays of :data:`~invariscope.stages.invariances.ARRAY_KEYS`
    (HU; ``x_tilde``/``f_x_tilde`` (N, restarts, c, c) float16), ``mode``, ``key`` and the history
    of every batch (``history_step``, ``history_objective``, ``history_d_out``, ``history_d_in``:
    rows per batch of crops).
    """
    path = Path(path)
    crops = [tuple(int(v) for v in s) for s in crops]
    if not crops:
        raise ValueError("no crops given")
    if batch_crops < 1:
        raise ValueError(f"batch_crops must be >= 1, got {batch_crops}")
    conf = {"alpha": alpha, "bound": bound, "init_sd": init_sd, "iterations": iterations, "lr": lr,
            "restarts": restarts, "seed": seed, "size": size, "mode": mode, **(settings or {})}
    key = _key(crops, conf, models)
    work = path.with_name(path.stem + ".work")
    if force:
        path.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    if stored_key(path) == key:
        return load_invariances(path)
    norm = Normalizer.of(dataset)
    dev = module_device(f)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAY_KEYS}
    hist: dict[str, list[np.ndarray]] = {k: [] for k in ("step", "objective", "d_out", "d_in")}
    hu = lambda t: norm.to_hu(t[:, 0].detach().cpu()).numpy()  # noqa: E731
    for a in range(0, len(crops), batch_crops):
        b = min(a + batch_crops, len(crops))
        x, y = load_crops(dataset, crops[a:b], size)
        x = x.to(dev)
        x_inv, history = optimize_inputs(
            f, x, dist, alpha=alpha, bound=bound, init_sd=init_sd, iterations=iterations, lr=lr,
            restarts=restarts, seed=seed, ckpt_dir=work / f"{a:06d}_{b:06d}", fingerprint=key,
            checkpoint_every=checkpoint_every, first=a, progress=progress,
            desc=f"{mode} crops {a + 1}-{b}/{len(crops)}")
        with frozen(f), torch.no_grad():
            y_hat, f_inv = f(x), f(x_inv)
        n, c = b - a, x.shape[-1]
        parts["x"].append(hu(x).astype(np.float32))
        parts["y"].append(hu(y).astype(np.float32))
        parts["y_hat"].append(hu(y_hat).astype(np.float32))
        parts["x_tilde"].append(hu(x_inv).astype(np.float16).reshape(n, restarts, c, c))
        parts["f_x_tilde"].append(hu(f_inv).astype(np.float16).reshape(n, restarts, c, c))
        parts["crops"].append(np.asarray(crops[a:b], dtype=np.int64).reshape(n, 3))
        for k in hist:
            hist[k].append(np.asarray([h.get(k, np.nan) for h in history], dtype=np.float64))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out |= {f"history_{k}": np.stack(v) for k, v in hist.items()}
    out |= {"mode": np.asarray(mode), "key": np.asarray(key), "n_invariances": np.asarray(restarts)}
    atomic.save_npz(path, **out)
    shutil.rmtree(work, ignore_errors=True)
    return out



def profile_invariances(name: str, f: nn.Module, params: Params, dataset: CTDataset,
                        crops: Sequence[CropSpec], distance_name: str, out_dir: str | Path,
                        models: str = "", force: bool = False, progress: bool = True
                        ) -> dict[str, np.ndarray]:
    """:func:`optimized_invariances` of denoiser ``name`` with one distance and the profile's
    ``optimized`` settings, into ``<out_dir>/<name>_opt_<distance>.npz``."""
    cfg = params.optimized
    if cfg is None:
        raise ValueError(f"{params.source_file or 'the params file'} has no optimized section: add "
                         "one (see params/default.yaml) to optimize invariances")
    if distance_name not in DISTANCES:
        raise ValueError(f"unknown distance {distance_name!r}; allowed: {', '.join(DISTANCES)}")
    std = Normalizer.of(dataset).std_hu
    settings: dict[str, Any] = {"distance": distance_name}
    vgg = None
    if distance_name == "ssim":
        settings["data_range"] = cfg.ssim_range_hu / std
    if distance_name == "vgg":
        weights = None
        if cfg.vgg16_weights is not None:
            weights = resolve_setting(cfg.vgg16_weights, params.source_file)
            if not weights.is_file():
                raise FileNotFoundError(
                    f"optimized.vgg16_weights = {cfg.vgg16_weights!r}: no file {weights} "
                    f"({RELATIVE_RULE}). Copy torchvision's vgg16-397923af.pth there (downloaded "
                    "on a machine with internet access), or set the key to null for the fixed "
                    "random VGG16")
        vgg = VGGDistance(cfg.vgg_layers, weights, params_key="optimized.vgg16_weights")
        vgg = vgg.to(module_device(f))
        settings |= {"vgg_layers": list(cfg.vgg_layers),
                     "vgg_weights": atomic.file_sha(weights) if weights is not None else None}
    dist = distance(distance_name, settings.get("data_range", 1.0), vgg)
    return optimized_invariances(
        Path(out_dir) / f"{name}_opt_{distance_name}.npz", f, dataset, crops, params.vae.crop_size,
        dist, alpha=cfg.alpha[distance_name], bound=cfg.bound, init_sd=cfg.init_sd,
        iterations=cfg.iterations, lr=cfg.lr, restarts=cfg.restarts, seed=cfg.seed,
        batch_crops=cfg.batch_crops, checkpoint_every=cfg.checkpoint_every, settings=settings,
        models=models, force=force, progress=progress, mode=f"opt_{distance_name}")
