"""Sampling invariances of a denoiser and the controls that check them (paper Sec. 2.3.3, Fig. 5).

For a low-dose crop x and a denoiser f (paper Sec. 2.3.3):

1. ŷ = f(x);
2. v ~ N(0, I) (``n_invariances`` draws per crop);
3. z̃ = t⁻¹(v | ŷ) with the trained cINN (the condition ŷ is embedded once per crop);
4. x̃ = D(z̃, ŷ) with the decoder of the conditional VAE.

Each x̃ is an invariance of f for x; f(x̃) is stored with it. The *prior ablation*
(``prior=True``) skips step 3 (z̃ = v ~ N(0, I), decoded directly) and uses the same v, so
the two sets are paired draw by draw. A *posterior diagnostic* (``posterior=True``) draws
z̃ = μ + σ·v from the encoder's own posterior q(z | x, f(x)) of each crop instead: what the
decoded images do when z is as well informed as the cVAE allows, a reference for how much of a
poor control is the cVAE's doing rather than the cINN's.

Storage: one compressed ``.npz`` per set (:func:`save_invariances`, atomic): x, y (full dose),
ŷ = f(x) as float32 HU (N, c, c), x̃ and f(x̃) as float16 HU (N, M, c, c), the crop specs and the
seed. float16 keeps 0.25–0.5 HU steps in the lung and soft-tissue range (−1024 to 1024 HU) and
halves the size of float32; the paper's 1000 crops × 100 invariances of 128² are still about
3.3 GB per array in memory (less on disk after compression).
:func:`sample_invariances_cached` writes chunk files while it samples, so an interrupted run
resumes per chunk, and merges them at the end.

Controls (:func:`control_measures`): Gauss+RI is blind inside its centred 30×30 square and sees
a blurred image elsewhere, so its invariances must vary inside the square and nearly nowhere
else; every invariance must change the input much more than the output.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter
from torch import nn
from tqdm import tqdm

from invariscope import atomic
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import CropDataset, CropSpec, Normalizer
from invariscope.device import module_device
from invariscope.models.denoisers import GaussRI
from invariscope.precision import Precision
from invariscope.provenance import INVARIANCE_FORMAT, invariance_key

__all__ = [
    "CONTROL_COLUMNS",
    "MEASURES",
    "ARRAY_KEYS",
    "sample_invariances",
    "sample_invariances_cached",
    "save_invariances",
    "load_invariances",
    "region_masks",
    "invariance_sd",
    "high_frequency_share",
    "control_measures",
    "check_targets",
]

#: Columns of ``figures/<profile>/controls.csv``.
CONTROL_COLUMNS = ("denoiser", "sd_ratio_smoothed", "sd_ratio_raw", "sd_ratio_smoothed_prior",
                   "input_change_hu", "output_change_hu", "output_change_hu_prior",
                   "invariance_sd_hu", "ld_noise_sd_hu", "hf_share", "hf_share_ld_noise",
                   "hf_share_x", "hf_share_q_nyquist", "hf_share_ld_noise_q_nyquist",
                   "sd_raw_inside_hu", "sd_raw_outside_hu", "sd_smoothed_inside_hu",
                   "sd_smoothed_outside_hu")
#: Cut-off of ``hf_share`` (cycles per pixel): a quarter of the sampling frequency, the issue's words.
HF_CUTOFF = 0.25
#: Cut-off of ``hf_share_q_nyquist``: a quarter of the Nyquist frequency, the only cut-off that
#: reproduces the spatial-latent probe's hf_share table (its LD − FD 0.96, invariances 0.99).
Q_NYQUIST_CUTOFF = 0.125
#: The keys :func:`control_measures` returns.
MEASURES = CONTROL_COLUMNS[1:]
#: Per-crop arrays of a result (first axis: crops).
ARRAY_KEYS = ("x", "y", "y_hat", "x_tilde", "f_x_tilde", "crops")


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------
def _crop_seed(seed: int, index: int) -> int:
    """Seed of the v draws of crop ``index``: independent of chunking and batch size."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
               % (2**63 - 1))


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _sample_chunk(denoiser_model: nn.Module, vae: nn.Module, cinn: nn.Module | None,
                  crops: CropDataset, first: int, specs: Sequence[CropSpec], n_inv: int,
                  batch_size: int, seed: int, mode: str, norm: Normalizer,
                  timings: dict[str, float] | None, outputs: bool = True,
                  precision: str = "fp32",
                  condition: nn.Module | None = None) -> dict[str, np.ndarray]:
    t = timings if timings is not None else {}
    dev = module_device(vae)
    mp = Precision(precision, dev)  # the generation only: f(x) and f(x̃) stay float32
    sync = timings is not None and dev.type == "cuda"  # GPU kernels run asynchronously

    def tick(name: str, t0: float) -> float:
        if sync:
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        t[name] = t.get(name, 0.0) + now - t0
        return now

    t0 = time.perf_counter()
    pairs = [crops[tuple(s)] for s in specs]
    x = torch.stack([p[0] for p in pairs])
    y = torch.stack([p[1] for p in pairs])
    x_dev = x.to(dev)
    t0 = tick("load", t0)
    y_hat = _batched(denoiser_model, x_dev, batch_size)
    t0 = tick("denoiser", t0)
    latent_shape = tuple(vae.latent_shape)
    cond = mu = std = None
    if mode == "cinn":
        c_in = y_hat if condition is None else _batched(condition, x_dev, batch_size)
        with mp.autocast():
            cond = _batched(cinn.embed, c_in, batch_size).float()
        t0 = tick("cinn", t0)
    elif mode == "posterior":
        enc = [vae.encode(x_dev[i:i + batch_size], y_hat[i:i + batch_size])
               for i in range(0, len(x), batch_size)]
        mu = torch.cat([e[0] for e in enc])
        std = torch.exp(0.5 * torch.cat([e[1] for e in enc]))
        t0 = tick("encoder", t0)
    b, c = len(specs), x.shape[-1]
    v = torch.cat([torch.randn(n_inv, *latent_shape,  # on the CPU: the same v on every device
                               generator=torch.Generator().manual_seed(_crop_seed(seed, first + i)))
                   for i in range(b)]).to(dev)
    owner = torch.arange(b, device=dev).repeat_interleave(n_inv)
    x_tilde = np.empty((b * n_inv, c, c), dtype=np.float16)
    f_x_tilde = np.empty((b * n_inv, c, c) if outputs else (b, 0, c, c), dtype=np.float16)
    t0 = tick("other", t0)
    for s in range(0, b * n_inv, batch_size):
        rows = slice(s, s + batch_size)
        who = owner[rows]
        with mp.autocast():
            if mode == "cinn":
                z = cinn.inverse_embedded(v[rows], cond[who]).float()
                t0 = tick("cinn", t0)
            elif mode == "posterior":
                z = mu[who] + std[who] * v[rows]
            else:
                z = v[rows]
            xt = vae.decode(z, y_hat[who]).float()
        t0 = tick("decoder", t0)
        x_tilde[rows] = norm.to_hu(xt[:, 0].cpu()).numpy()
        if outputs:
            ft = denoiser_model(xt)
            t0 = tick("denoiser", t0)
            f_x_tilde[rows] = norm.to_hu(ft[:, 0].cpu()).numpy()
        t0 = tick("other", t0)
    hu = lambda a: norm.to_hu(a[:, 0]).numpy().astype(np.float32)  # noqa: E731
    return {"x": hu(x), "y": hu(y), "y_hat": hu(y_hat.cpu()),
            "x_tilde": x_tilde.reshape(b, n_inv, c, c),
            "f_x_tilde": f_x_tilde.reshape(b, n_inv, c, c) if outputs else f_x_tilde,
            "crops": np.asarray(specs, dtype=np.int64).reshape(b, 3)}


def _meta(seed: int, n_inv: int, mode: str, split: str, key: str) -> dict[str, np.ndarray]:
    return {"mode": np.asarray(mode), "seed": np.asarray(seed, dtype=np.int64),
            "n_invariances": np.asarray(n_inv, dtype=np.int64), "prior": np.asarray(mode == "prior"),
            "split": np.asarray(split), "key": np.asarray(key), "format": np.asarray(INVARIANCE_FORMAT, dtype=np.int64)}


@torch.no_grad()
def sample_invariances(denoiser_model: nn.Module, vae: nn.Module, cinn: nn.Module | None,
                       dataset: CTDataset, crops: Sequence[CropSpec], n_invariances: int,
                       batch_size: int, seed: int, prior: bool = False, *, split: str = "test",
                       chunk_dir: str | Path | None = None, chunk_crops: int = 16, key: str = "",
                       progress: bool = True, desc: str | None = None,
                       timings: dict[str, float] | None = None,
                       posterior: bool = False, outputs: bool = True,
                       precision: str = "fp32",
                       condition: nn.Module | None = None) -> dict[str, np.ndarray]:
    """``n_invariances`` invariances x̃ of ``denoiser_model`` for each crop, with f(x̃).

    ``crops``: (slice index, top, left) specs of ``split`` (e.g. from
    :func:`invariscope.data.loader.fixed_crops`), of the cVAE's crop size. ``batch_size``: invariances
    per decoder/cINN pass. Crop i draws its v from its own generator seeded with ``(seed, i)``,
    so results do not depend on ``batch_size`` or chunking. ``prior=True``: the ablation
    without cINN (z̃ = v). ``posterior=True``: a diagnostic, not an invariance set: z̃ = μ + σ·v
    drawn from the encoder's own posterior q(z | x, f(x)) of each crop (the cINN is not used):
    how much the decoded images vary when z is as well informed as the cVAE allows (a ceiling for
    what a perfect cINN could keep fixed). All networks must be in eval mode (they are not
    switched here).

    ``chunk_dir``: write every ``chunk_crops`` crops to a chunk file there (atomically) and reuse
    chunk files of the same ``key`` (resume); ``timings``: a dict that accumulates seconds per
    part (``load``, ``denoiser``, ``cinn``, ``decoder``, ``other``). ``outputs=False`` skips
    f(x̃) (``f_x_tilde`` then has shape (N, 0, c, c)): for uses that need x̃ only.
    ``precision``: the generation (cINN and decoder) under autocast (:mod:`invariscope.precision`);
    the denoiser's f(x) and f(x̃) always run in float32. ``condition``: what the cINN is
    conditioned on, as a module of x (None: ŷ = f(x); a layer's
    :class:`~invariscope.models.layers.LayerFeatures` for layer-wise invariances).

    Returns a dict of arrays: ``x``, ``y``, ``y_hat`` (N, c, c) float32 HU; ``x_tilde``,
    ``f_x_tilde`` (N, M, c, c) float16 HU; ``crops`` (N, 3) int64; and 0-d ``seed``,
    ``n_invariances``, ``mode`` ("cinn", "prior" or "posterior"), ``prior``, ``split``, ``key``,
    ``format``.
    """
    if prior and posterior:
        raise ValueError("prior and posterior exclude each other")
    mode = "prior" if prior else "posterior" if posterior else "cinn"
    if mode == "cinn" and cinn is None:
        raise ValueError("sampling invariances needs the trained cINN (or prior=True for the ablation)")
    if n_invariances < 1 or batch_size < 1 or chunk_crops < 1:
        raise ValueError("n_invariances, batch_size and chunk_crops must be >= 1")
    crops = [tuple(int(v) for v in s) for s in crops]
    if not crops:
        raise ValueError("no crops given")
    size = vae.config.crop_size
    crop_ds = CropDataset(dataset, split, size)
    norm = Normalizer.of(dataset)
    chunk_path = Path(chunk_dir) if chunk_dir is not None else None
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(total=len(crops), desc=desc or {"cinn": "invariances", "prior": "prior ablation",
                                               "posterior": "posterior samples"}[mode],
               unit="crop", disable=not progress)
    for a in range(0, len(crops), chunk_crops):
        b = min(a + chunk_crops, len(crops))
        part = None
        f = chunk_path / f"chunk_{a:06d}_{b:06d}.npz" if chunk_path is not None else None
        if f is not None and f.is_file():
            try:
                with np.load(f, allow_pickle=False) as z:
                    if str(z["key"]) == key and z["crops"].tolist() == [list(s) for s in crops[a:b]]:
                        part = {k: z[k] for k in ARRAY_KEYS}
            except Exception:  # noqa: BLE001 - a damaged chunk is recomputed
                part = None
        if part is None:
            part = _sample_chunk(denoiser_model, vae, cinn, crop_ds, a, crops[a:b], n_invariances,
                                 batch_size, seed, mode, norm, timings, outputs, precision,
                                 condition)
            if f is not None:
                atomic.save_npz(f, key=np.asarray(key), **part)
        parts.append(part)
        bar.update(b - a)
    bar.close()
    out = {k: np.concatenate([p[k] for p in parts]) for k in ARRAY_KEYS}
    out.update(_meta(seed, n_invariances, mode, split, key))
    return out


def sample_invariances_cached(path: str | Path, denoiser_model: nn.Module, vae: nn.Module,
                              cinn: nn.Module | None, dataset: CTDataset, crops: Sequence[CropSpec],
                              n_invariances: int, batch_size: int, seed: int, prior: bool = False,
                              *, split: str = "test", models: str = "", chunk_crops: int = 16,
                              force: bool = False, progress: bool = True,
                              outputs: bool = True, precision: str = "fp32",
                              condition: nn.Module | None = None) -> dict[str, np.ndarray]:
    """:func:`sample_invariances` into ``path`` (.npz), reusing it when its key matches.

    ``models``: identity of the networks (e.g. :func:`invariscope.provenance.cinn_identity`);
    a file of other crops, counts, seed or models is resampled. While sampling, chunk files go to
    ``<path stem>.chunks/`` beside it (an interrupted run resumes there); they are merged into
    ``path`` and deleted at the end. ``force=True`` resamples everything. ``outputs=False``: skip
    f(x̃) (see :func:`sample_invariances`); ``precision``: of the generation (part of the key);
    ``condition``: see :func:`sample_invariances` (its identity belongs in ``models``).
    """
    path = Path(path)
    key = invariance_key(crops, n_invariances, seed, prior, split, models, outputs, precision)
    chunks = path.with_name(path.stem + ".chunks")
    if force:
        path.unlink(missing_ok=True)
        shutil.rmtree(chunks, ignore_errors=True)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = str(z["key"]) if "key" in z.files else None
        except Exception:  # noqa: BLE001 - unreadable: resample
            stored = None
        if stored == key:
            return load_invariances(path)
    result = sample_invariances(denoiser_model, vae, cinn, dataset, crops, n_invariances, batch_size,
                                seed, prior, split=split, chunk_dir=chunks, chunk_crops=chunk_crops,
                                key=key, progress=progress, outputs=outputs, precision=precision,
                                condition=condition)
    save_invariances(path, result)
    shutil.rmtree(chunks, ignore_errors=True)
    return result


def save_invariances(path: str | Path, result: Mapping[str, np.ndarray]) -> Path:
    """Write a result of :func:`sample_invariances` as a compressed ``.npz`` (atomic)."""
    path = Path(path)
    missing = [k for k in ARRAY_KEYS if k not in result]
    if missing:
        raise ValueError(f"not a result of sample_invariances: missing {', '.join(missing)}")
    atomic.save_npz(path, **{k: np.asarray(v) for k, v in result.items()})
    return path


def load_invariances(path: str | Path, crops: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Read a file of :func:`save_invariances`; ``crops``: keep only these crop positions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run 04_invariances.ipynb for this denoiser "
                                "first (./run_all.sh --only invariances)")
    out: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as z:
        for k in z.files:
            a = z[k]
            if crops is not None and k in ARRAY_KEYS:
                a = a[np.asarray(list(crops), dtype=np.int64)].copy()
            out[k] = a
    return out


def stored_key(path: str | Path) -> str | None:
    """The :func:`~invariscope.provenance.invariance_key` a stored set was sampled with (None when
    the file is missing or unreadable: resample)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["key"])
    except Exception:  # noqa: BLE001 - missing or unreadable: resample
        return None


# --------------------------------------------------------------------------------------
# Controls
# --------------------------------------------------------------------------------------
def region_masks(size: int, square: int = 30, band: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, outside)`` boolean ``(size, size)`` masks around the centred ``square``.

    The square is Gauss+RI's (:meth:`GaussRI.square_slices`); a ``band`` of pixels on both
    sides of its edge belongs to neither region (the 9-tap blur reaches a few pixels across it).
    """
    rows, cols = GaussRI(square_size=square).square_slices(size, size)
    inside = np.zeros((size, size), dtype=bool)
    inside[rows.start + band:rows.stop - band, cols.start + band:cols.stop - band] = True
    grown = np.zeros((size, size), dtype=bool)
    grown[max(rows.start - band, 0):rows.stop + band, max(cols.start - band, 0):cols.stop + band] = True
    return inside, ~grown


def invariance_sd(x_tilde: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Per-pixel SD over invariances ``(N, c, c)`` of ``x_tilde`` ``(N, M, c, c)`` (ddof 1).

    ``sigma``: first smooth every invariance with the same Gaussian (scipy ``gaussian_filter``,
    reflect boundaries). Computed crop by crop in float64.
    """
    x_tilde = np.asarray(x_tilde)
    if x_tilde.ndim != 4 or x_tilde.shape[1] < 2:
        raise ValueError(f"x_tilde must be (N, M >= 2, c, c), got {x_tilde.shape}")
    out = np.empty((x_tilde.shape[0], *x_tilde.shape[2:]), dtype=np.float64)
    for i, inv in enumerate(x_tilde):
        a = inv.astype(np.float64)
        if sigma:
            a = gaussian_filter(a, sigma=(0.0, sigma, sigma))
        out[i] = a.std(axis=0, ddof=1)
    return out


def _hf_power(images: np.ndarray, cutoff: float | Sequence[float] = HF_CUTOFF) -> np.ndarray:
    """``[power above cutoff, total power]`` of ``images`` (..., c, c), summed over the images;
    with several cut-offs ``[power above each, ..., total power]`` from one FFT."""
    a = np.asarray(images)
    c = a.shape[-1]
    if a.shape[-2] != c:
        raise ValueError(f"images must be square, got {a.shape[-2:]}")
    f = np.fft.fftfreq(c)
    radius = np.hypot(f[:, None], f[None, :])
    power = np.abs(np.fft.fft2(a.reshape(-1, c, c).astype(np.float64))) ** 2
    cutoffs = np.atleast_1d(np.asarray(cutoff, np.float64))
    return np.array([float(power[:, radius > k].sum()) for k in cutoffs] + [float(power.sum())])


def high_frequency_share(images: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    """Share of the power of ``images`` (..., c, c) at radial frequencies above ``cutoff`` cycles
    per pixel (0.25: a quarter of the sampling frequency, half of Nyquist), pooled over all images.

    Noise-like texture has most of its power there (white noise: 1 − π/16 ≈ 0.80; FBP noise with
    its ramp filter more); smooth blotches and anatomy have little.
    """
    hi, total = _hf_power(images, cutoff)
    return hi / total if total > 0 else math.nan


def _ratio(sd: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> float:
    if not inside.any() or not outside.any():
        return math.nan
    num, den = float(sd[:, inside].mean()), float(sd[:, outside].mean())
    if den == 0.0:
        return math.inf if num > 0 else math.nan
    return num / den


def _mean_abs_change(a: np.ndarray, ref: np.ndarray) -> float:
    """mean |a[i, m] - ref[i]| over crops, invariances and pixels (crop by crop, float64)."""
    total = sum(float(np.abs(a[i].astype(np.float64) - ref[i].astype(np.float64)[None]).sum())
                for i in range(len(a)))
    return total / a.size


def control_measures(result: Mapping[str, np.ndarray], prior_result: Mapping[str, np.ndarray] | None,
                     square: int = 30, band: int = 3, sigma: float = 1.0) -> dict[str, float]:
    """The controls of a set of invariances (and of its prior ablation), all in HU or ratios.

    * ``sd_ratio_smoothed``: smooth every invariance with a Gaussian (``sigma`` px), take the
      per-pixel SD over invariances, divide its mean inside the centred ``square`` by its mean
      outside (pooled over crops; a ``band`` around the square's edge belongs to neither);
    * ``sd_ratio_raw``: the same without smoothing;
    * ``sd_ratio_smoothed_prior``: ``sd_ratio_smoothed`` of ``prior_result`` (z̃ ~ N(0, I));
    * ``input_change_hu``: mean |x̃ − x|; ``output_change_hu``: mean |f(x̃) − f(x)|;
    * ``output_change_hu_prior``: ``output_change_hu`` of ``prior_result``;
    * ``invariance_sd_hu``: mean per-pixel SD over invariances (raw);
    * ``ld_noise_sd_hu``: SD of low dose − full dose over the same crops;
    * ``hf_share``: :func:`high_frequency_share` of x̃ minus its crop's mean invariance (what
      varies between invariances: noise-like texture or blotches);
      ``hf_share_ld_noise``: the same of low dose − full dose in the same crops;
      ``hf_share_x``: the same of x minus its crop's mean invariance, less the mean's own
      sampling variance (σ²/n). x is one draw from p(x | f(x)) and the mean invariance depends
      on f(x) only, so this is the share that invariances drawn from the true p(x | f(x)) have,
      up to the mean's error: the calibrated reference for ``hf_share`` (a band in which x
      deviates from the mean invariance less than the invariances do is over-dispersed, and
      vice versa);
    * ``hf_share_q_nyquist`` / ``hf_share_ld_noise_q_nyquist``: ``hf_share`` and
      ``hf_share_ld_noise`` above a quarter of the Nyquist frequency (``Q_NYQUIST_CUTOFF``), the
      convention of the spatial-latent probe's numbers;
    * ``sd_raw_inside_hu`` / ``sd_raw_outside_hu`` / ``sd_smoothed_inside_hu`` /
      ``sd_smoothed_outside_hu``: the two regions' mean per-pixel SDs behind the ratios.

    Ratios are NaN when a region is empty (a crop too small for the square and band), and the
    prior measures NaN when ``prior_result`` is None.
    """

    xt = np.asarray(result["x_tilde"])
    inside, outside = region_masks(xt.shape[-1], square, band)
    raw_sd, smooth_sd = invariance_sd(xt), invariance_sd(xt, sigma)
    smoothed, raw_ratio = _ratio(smooth_sd, inside, outside), _ratio(raw_sd, inside, outside)
    region = lambda sd, m: float(sd[:, m].mean()) if m.any() else math.nan  # noqa: E731
    x = np.asarray(result["x"], np.float64)
    cutoffs = (HF_CUTOFF, Q_NYQUIST_CUTOFF)
    hf, hf_x = np.zeros(3), np.zeros(3)  # [above HF_CUTOFF, above Q_NYQUIST_CUTOFF, total]
    for a, inv in zip(x, xt):  # per crop: its invariances' and x's deviations from their mean
        inv = inv.astype(np.float64)
        mean = inv.mean(0)
        hf += _hf_power(inv - mean, cutoffs)
        hf_x += _hf_power(a - mean, cutoffs)
    n = xt.shape[1]
    # E|x - mean|² = E|x - E[x | ŷ]|² + E|E[x | ŷ] - m|² + σ²/n, with σ²/n = hf / (n (n - 1))
    hf_x = hf_x - hf / (n * (n - 1)) if n > 1 else hf_x
    noise = x - np.asarray(result["y"], np.float64)
    noise_hf = _hf_power(noise, cutoffs)
    share = lambda p, i: float(p[i] / p[-1]) if p[-1] > 0 else math.nan  # noqa: E731
    out = {
        "sd_ratio_smoothed": smoothed,
        "sd_ratio_raw": raw_ratio,
        "sd_ratio_smoothed_prior": math.nan,
        "input_change_hu": _mean_abs_change(result["x_tilde"], result["x"]),
        "output_change_hu": _mean_abs_change(result["f_x_tilde"], result["y_hat"]),
        "output_change_hu_prior": math.nan,
        "invariance_sd_hu": float(raw_sd.mean()),
        "ld_noise_sd_hu": float(np.std(noise)),
        "hf_share": share(hf, 0),
        "hf_share_ld_noise": share(noise_hf, 0),
        "hf_share_x": share(hf_x, 0),
        "hf_share_q_nyquist": share(hf, 1),
        "hf_share_ld_noise_q_nyquist": share(noise_hf, 1),
        "sd_raw_inside_hu": region(raw_sd, inside),
        "sd_raw_outside_hu": region(raw_sd, outside),
        "sd_smoothed_inside_hu": region(smooth_sd, inside),
        "sd_smoothed_outside_hu": region(smooth_sd, outside),
    }
    if prior_result is not None:
        xp = np.asarray(prior_result["x_tilde"])
        out["sd_ratio_smoothed_prior"] = _ratio(invariance_sd(xp, sigma),
                                                *region_masks(xp.shape[-1], square, band))
        out["output_change_hu_prior"] = _mean_abs_change(prior_result["f_x_tilde"],
                                                         prior_result["y_hat"])
    return out


def check_targets(table: pd.DataFrame, min_ratio: float = 10.0, max_output_fraction: float = 0.5,
                  min_sd_fraction: float = 0.5, max_hf_gap: float | None = 0.1,
                  max_calibration_gap: float | None = None,
                  max_hf_gap_q_nyquist: float | None = None) -> pd.DataFrame:
    """Pass/fail of every control target, one row per (target, denoiser).

    Targets: Gauss+RI ``sd_ratio_smoothed >= min_ratio`` and above its prior ablation; for every
    denoiser ``output_change_hu`` below ``output_change_hu_prior`` and below
    ``max_output_fraction * input_change_hu``; for every trained denoiser (not gaussri)
    ``invariance_sd_hu >= min_sd_fraction * ld_noise_sd_hu`` and (``max_hf_gap`` not None)
    ``|hf_share − hf_share_ld_noise| <= max_hf_gap`` (what varies is noise-like texture, not
    blotches) and (``max_calibration_gap`` not None) ``|hf_share − hf_share_x| <=
    max_calibration_gap`` (what varies has the spectrum by which x itself deviates from the mean
    invariance) and (``max_hf_gap_q_nyquist`` not None) ``|hf_share_q_nyquist −
    hf_share_ld_noise_q_nyquist| <= max_hf_gap_q_nyquist`` (the spectrum target at the probe's
    cut-off). NaN values fail.
    """
    rows = []

    def add(target: str, denoiser: str, value: float, threshold: float, passed: bool) -> None:
        rows.append({"target": target, "denoiser": denoiser, "value": value,
                     "threshold": threshold, "passed": bool(passed)})

    for r in table.to_dict("records"):
        d = r["denoiser"]
        if d == "gaussri":
            add(f"sd_ratio_smoothed >= {min_ratio:g}", d, r["sd_ratio_smoothed"], min_ratio,
                r["sd_ratio_smoothed"] >= min_ratio)
            add("sd_ratio_smoothed > sd_ratio_smoothed_prior", d, r["sd_ratio_smoothed"],
                r["sd_ratio_smoothed_prior"], r["sd_ratio_smoothed"] > r["sd_ratio_smoothed_prior"])
        add("output_change_hu < output_change_hu_prior", d, r["output_change_hu"],
            r["output_change_hu_prior"], r["output_change_hu"] < r["output_change_hu_prior"])
        add(f"output_change_hu < {max_output_fraction:g} x input_change_hu", d,
            r["output_change_hu"], max_output_fraction * r["input_change_hu"],
            r["output_change_hu"] < max_output_fraction * r["input_change_hu"])
        if d != "gaussri":
            add(f"invariance_sd_hu >= {min_sd_fraction:g} x ld_noise_sd_hu", d, r["invariance_sd_hu"],
                min_sd_fraction * r["ld_noise_sd_hu"],
                r["invariance_sd_hu"] >= min_sd_fraction * r["ld_noise_sd_hu"])
            if max_hf_gap is not None:
                gap = abs(r["hf_share"] - r["hf_share_ld_noise"])
                add(f"|hf_share - hf_share_ld_noise| <= {max_hf_gap:g}", d, gap, max_hf_gap,
                    gap <= max_hf_gap)
            if max_calibration_gap is not None:
                gap = abs(r["hf_share"] - r["hf_share_x"])
                add(f"|hf_share - hf_share_x| <= {max_calibration_gap:g}", d, gap,
                    max_calibration_gap, gap <= max_calibration_gap)
            if max_hf_gap_q_nyquist is not None:
                gap = abs(r["hf_share_q_nyquist"] - r["hf_share_ld_noise_q_nyquist"])
                add(f"|hf_share_q_nyquist - hf_share_ld_noise_q_nyquist| <= {max_hf_gap_q_nyquist:g}",
                    d, gap, max_hf_gap_q_nyquist, gap <= max_hf_gap_q_nyquist)
    return pd.DataFrame(rows, columns=["target", "denoiser", "value", "threshold", "passed"])
