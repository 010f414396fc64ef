"""Projection-domain low-dose CT simulation (the way the Mayo low-dose data were made).

Geometry
--------
Parallel beam over 180° (``n_views`` equally spaced angles ``k·π/n_views``), a flat detector
whose bin spacing equals the image pixel size, centred on the rotation axis. The Mayo data come
from a helical fan-beam scanner (Siemens SOMATOM Definition Flash); we use parallel beam because
it keeps the simulator small, fast and *exactly* adjoint: the system matrix ``A`` is an explicit
sparse matrix, forward projection is ``A @ x`` and backprojection is ``Aᵀ @ y`` with the very same
numbers. Noise insertion in the projection domain (Poisson quanta + Gaussian electronic noise,
then log and FBP) reproduces the physics that matters here: noise that is non-stationary,
streaky along highly attenuating paths, and correlated exactly as filtered backprojection
correlates it.

System matrix: pixel-driven, at most two detector bins per pixel and view. Each pixel centre is
projected onto the detector; by default (``footprint="box"``) the pixel's shadow is a box of
width ``d·max(|cos θ|, |sin θ|)`` centred there and split between the two bins it overlaps in
proportion to the overlap (linear interpolation of the box onto the bins, the distance-driven
footprint; ``footprint="linear"`` is plain linear interpolation of the centre, which ripples).
Entries are weighted by ``pixel_area / bin_width`` (= the pixel size ``d`` in mm), so ``A @ μ``
are line integrals of μ (1/mm) over mm, i.e. dimensionless. Image convention: ``image[r, c]``
has centre ``x = (c - (N-1)/2)·d``, ``y = ((N-1)/2 - r)·d`` (y points up, towards row 0).

FBP: ramp filter (Kak & Slaney spatial-domain discretisation, which avoids the DC error of a
sampled ``|f|``), optional Shepp–Logan or Hann apodisation, zero padding to at least twice the
detector length, then backprojection with ``Aᵀ`` scaled by ``π / (n_views · d²)``.

Storage and threads: ``Aᵀ`` is stored as CSR (pixel-major; equivalently ``A`` in CSC) in
``n_blocks`` view blocks (8, whatever the machine: the backprojection sums the blocks in a fixed
order, so its result does not depend on the thread count); ``A_k = Aᵀ_k.T`` is a zero-copy view, so one copy of the matrix serves
both directions (2 nonzeros per pixel and view: 47 M, ≈ 0.38 GB at the default geometry).
scipy's sparse products release the GIL, so the blocks run in parallel in a thread pool.

Same numbers on every machine: the noise draws consume a fixed number of random numbers (one
uniform per ray and dose for the Poisson quanta, by inversion of the Poisson CDF; one normal for
the electronic noise), so a last-bit difference of an expected count cannot shift the random
stream, and ``exp``/``log`` of the noise model run in float64, whose vectorized versions differ
between CPUs far below the float32 rounding of the stored images (:func:`simulate_dose_pair`).
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import scipy.fft
import scipy.sparse as sp
import scipy.special

__all__ = [
    "DEFAULT_SIZE",
    "DEFAULT_FOV_MM",
    "DEFAULT_N_VIEWS",
    "DEFAULT_MU_WATER_PER_MM",
    "DEFAULT_DOSE_FRACTION",
    "DEFAULT_FULL_DOSE_PHOTONS",
    "DEFAULT_ELECTRONIC_NOISE_SD",
    "DEFAULT_FILTER",
    "COUNT_FLOOR",
    "N_BLOCKS",
    "ParallelBeamProjector",
    "default_n_det",
    "get_projector",
    "hu_to_mu",
    "mu_to_hu",
    "measured_line_integrals",
    "poisson_quantile",
    "simulate_dose_pair",
    "reconstruct_noiseless",
]

FilterName = Literal["ram-lak", "shepp-logan", "hann"]

DEFAULT_SIZE = 256
DEFAULT_FOV_MM = 400.0
DEFAULT_N_VIEWS = 360
DEFAULT_MU_WATER_PER_MM = 0.0192  # water at ~70 keV effective energy
DEFAULT_DOSE_FRACTION = 0.1  # Mayo low-dose data: 10 % of the routine dose for chest
DEFAULT_FILTER: FilterName = "ram-lak"

# Calibration (``benchmarks/bench_simulator.py --calibrate``): default geometry (256², 400 mm,
# 360 views, 367 bins), dose 0.1, μ_water 0.0192/mm, Ram-Lak FBP, phantoms of
# :mod:`invariscope.data.phantom` (6 slices over each patient's chest slab, as the cohort has 4–10).
# N0 is chosen so that the per-slice RMSE between low- and full-dose HU images, both clipped to
# [-1024, 1900] as in the paper's Table 1, averaged over whole slices of random patients, is
# close to the paper's low-dose 236 HU (benchmarks/README.md has the measured value).
# N0 is low because a 1.56 mm pixel grid with 360 views must carry the per-pixel noise of the
# paper's 0.7 mm data, and ~53 % of a 400 mm slice is air (where clipping at -1024 removes much
# of the error). Large patients are partly photon-starved at 10 % dose (streaks); the log uses
# the offset LOG_BIAS_OFFSET, which removes the first-order bias of log(Poisson) so the mean
# soft-tissue HU of low-dose images stays within a few HU of the noise-free reconstruction
# (without it: about +20 HU on chest slices).
# Electronic noise: 1 count SD, i.e. σ_e²/N0 ≈ 1.7e-4, the order of a clinical detector's ratio.
DEFAULT_FULL_DOSE_PHOTONS = 6.0e3
DEFAULT_ELECTRONIC_NOISE_SD = 1.0
_CHUNK = 16  # slices per internal batch of simulate_dose_pair
#: counts + 1/2 before the log: E[log(N + 1/2)] = log λ + O(1/λ²) for Poisson N (Anscombe).
LOG_BIAS_OFFSET = 0.5
COUNT_FLOOR = 1.0  # measured counts are clamped to this before the log (photon starvation)
#: View blocks of the system matrix: fixed, so that sums over blocks (the backprojection) are
#: the same on a machine with any number of cores.
N_BLOCKS = 8


def default_n_det(size: int) -> int:
    """Detector bins that cover the image diagonal: ``ceil(size·√2) + 4``."""
    return int(np.ceil(size * np.sqrt(2.0))) + 4


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=_default_threads(), thread_name_prefix="ctsim")
        return _POOL


def _map(fn, items: list) -> list:
    if len(items) == 1:
        return [fn(items[0])]
    return list(_pool().map(fn, items))


class ParallelBeamProjector:
    """Parallel-beam projector with an explicit sparse system matrix (see module docstring).

    Parameters
    ----------
    size: image side in pixels (square images).
    fov_mm: reconstruction field of view (image side) in mm; pixel size ``d = fov_mm / size``.
    n_views: number of projection angles over 180°.
    n_det: detector bins (spacing ``d``); default :func:`default_n_det` covers the whole square.
    n_blocks: number of view blocks (default :data:`N_BLOCKS`; the blocks run in a thread pool of
        the usable CPUs, at most 8; results do not depend on the thread count).
    footprint: how a projected pixel is spread over detector bins (both pixel-driven, ≤ 2 bins
        per pixel and view): ``"box"`` (default) spreads a box of width ``d·max(|cos θ|, |sin θ|)``
        centred on the projected pixel centre by its overlap with each bin (the distance-driven
        footprint; these boxes tile the detector exactly, so a uniform region projects without
        the moiré ripple of point sampling); ``"linear"`` is classic linear interpolation of the
        projected centre (ripple up to ~10 % of the chord at some angles).
    """

    def __init__(
        self,
        size: int,
        fov_mm: float,
        n_views: int,
        n_det: int | None = None,
        n_blocks: int = N_BLOCKS,
        footprint: Literal["box", "linear"] = "box",
    ) -> None:
        if footprint not in ("box", "linear"):
            raise ValueError("footprint must be 'box' or 'linear'")
        self.footprint = footprint
        self.size = int(size)
        self.fov_mm = float(fov_mm)
        self.n_views = int(n_views)
        self.n_det = int(n_det) if n_det is not None else default_n_det(self.size)
        self.pixel_mm = self.fov_mm / self.size
        self.det_spacing_mm = self.pixel_mm
        self.angles = (np.arange(self.n_views) * np.pi / self.n_views).astype(np.float64)
        n_blocks = max(1, min(int(n_blocks), self.n_views))
        self.view_bounds = np.linspace(0, self.n_views, n_blocks + 1).round().astype(int)
        # Aᵀ per view block k as CSR (P × n_k·D); A_k = Aᵀ_k.T is a zero-copy CSC view, whose
        # products are as fast as CSR ones, so A itself is never stored.
        self._at_blocks: list[sp.csr_matrix] = _map(self._build_block, list(range(n_blocks)))
        self._filters: dict[tuple[str, int], np.ndarray] = {}

    # ------------------------------------------------------------------ construction
    def _build_block(self, k: int) -> sp.csr_matrix:
        n, d, n_det = self.size, self.pixel_mm, self.n_det
        v0, v1 = self.view_bounds[k], self.view_bounds[k + 1]
        nv = v1 - v0
        coords = ((np.arange(n) - (n - 1) / 2.0)).astype(np.float32)  # in units of d
        x = np.tile(coords, n)  # column coordinate, row-major pixel order
        y = np.repeat(coords[::-1], n)  # y up
        theta = self.angles[v0:v1]
        cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
        n_pix = n * n
        indices = np.empty((n_pix, nv, 2), dtype=np.int32)
        data = np.empty((n_pix, nv, 2), dtype=np.float32)
        col_base = (np.arange(nv, dtype=np.int32) * n_det)[None, :]
        centre = (n_det - 1) / 2.0
        # box footprint half-width in bins: d·max(|cos|, |sin|) / (2·bin width) <= 1/2
        half_w = np.float32(0.5) * np.maximum(np.abs(cos), np.abs(sin))
        step = max(1, 4_000_000 // max(nv, 1))
        for s in range(0, n_pix, step):
            e = min(n_pix, s + step)
            u = x[s:e, None] * cos[None, :] + y[s:e, None] * sin[None, :] + np.float32(centre)
            if self.footprint == "box":
                lo, hi = u - half_w[None, :], u + half_w[None, :]
                ja = np.clip(np.floor(lo + np.float32(0.5)), 0, n_det - 2)
                wa = np.clip(np.minimum(hi, ja + 0.5) - np.maximum(lo, ja - 0.5), 0.0, None)
                wb = np.clip(np.minimum(hi, ja + 1.5) - np.maximum(lo, ja + 0.5), 0.0, None)
                wa /= 2.0 * half_w[None, :]
                wb /= 2.0 * half_w[None, :]
            else:
                ja = np.clip(np.floor(u), 0, n_det - 2)
                wa = np.maximum(0.0, 1.0 - np.abs(u - ja))  # triangle kernel
                wb = np.maximum(0.0, 1.0 - np.abs(u - ja - 1.0))
            ja = ja.astype(np.int32) + col_base
            indices[s:e, :, 0] = ja
            indices[s:e, :, 1] = ja + 1
            data[s:e, :, 0] = wa * np.float32(d)  # pixel area / bin width = d (mm)
            data[s:e, :, 1] = wb * np.float32(d)
        indptr = np.arange(0, n_pix * nv * 2 + 1, nv * 2, dtype=np.int64)
        if indptr[-1] < np.iinfo(np.int32).max:
            indptr = indptr.astype(np.int32)
        at = sp.csr_matrix(
            (data.ravel(), indices.ravel(), indptr), shape=(n_pix, nv * n_det), copy=False
        )
        at.has_sorted_indices = True
        return at

    @property
    def matrix(self) -> sp.csr_matrix:
        """The full system matrix ``A`` (rays × pixels, rays view-major) as one CSR (a copy)."""
        return sp.hstack(self._at_blocks, format="csr").T.tocsr()

    @property
    def shape_sino(self) -> tuple[int, int]:
        return self.n_views, self.n_det

    # ------------------------------------------------------------------ operators
    def _as_batch(self, arr: np.ndarray, tail: tuple[int, int]) -> tuple[np.ndarray, bool]:
        arr = np.asarray(arr, dtype=np.float32)
        single = arr.ndim == 2
        if single:
            arr = arr[None]
        if arr.shape[1:] != tail:
            raise ValueError(f"expected trailing shape {tail}, got {arr.shape[1:]}")
        return arr, single

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Line integrals ``A x``: (B, size, size) or (size, size) -> (B, n_views, n_det)."""
        imgs, single = self._as_batch(images, (self.size, self.size))
        b = imgs.shape[0]
        x = np.ascontiguousarray(imgs.reshape(b, -1).T)  # (P, B)
        parts = _map(lambda at: at.T @ x, self._at_blocks)  # each (n_k·D, B)
        sino = np.concatenate(parts, axis=0).T.reshape(b, self.n_views, self.n_det)
        sino = np.ascontiguousarray(sino, dtype=np.float32)
        return sino[0] if single else sino

    def backproject(self, sinograms: np.ndarray) -> np.ndarray:
        """Exact adjoint ``Aᵀ y``: (B, n_views, n_det) -> (B, size, size)."""
        sinos, single = self._as_batch(sinograms, (self.n_views, self.n_det))
        b = sinos.shape[0]

        def block(k: int) -> np.ndarray:
            v0, v1 = self.view_bounds[k], self.view_bounds[k + 1]
            y = np.ascontiguousarray(sinos[:, v0:v1, :].reshape(b, -1).T)  # (n_k·D, B)
            return self._at_blocks[k] @ y  # (P, B)

        parts = _map(block, list(range(len(self._at_blocks))))
        out = parts[0]
        for p in parts[1:]:
            out += p
        img = np.ascontiguousarray(out.T, dtype=np.float32).reshape(b, self.size, self.size)
        return img[0] if single else img

    def _filter(self, name: str, n_pad: int) -> np.ndarray:
        key = (name, n_pad)
        if key not in self._filters:
            # Kak & Slaney: h[0] = 1/4, h[n odd] = -1/(π n)², h[n even] = 0 (unit sample spacing).
            n = np.concatenate([np.arange(0, n_pad // 2 + 1), np.arange(n_pad // 2 - 1, 0, -1)])
            h = np.zeros(n_pad)
            h[0] = 0.25
            odd = n % 2 == 1
            h[odd] = -1.0 / (np.pi * n[odd]) ** 2
            ramp = np.real(np.fft.rfft(h))
            f = np.fft.rfftfreq(n_pad)  # cycles per sample, 0 … 0.5
            if name == "ram-lak":
                win = np.ones_like(f)
            elif name == "shepp-logan":
                win = np.sinc(f)
            elif name == "hann":
                win = 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
            else:
                raise ValueError(f"unknown filter {name!r}; use 'ram-lak', 'shepp-logan' or 'hann'")
            self._filters[key] = (ramp * win).astype(np.float32)
        return self._filters[key]

    def filter_sinograms(self, sinograms: np.ndarray, filter: FilterName = DEFAULT_FILTER) -> np.ndarray:
        """Ramp-filter along the detector axis (zero padded to ≥ 2·n_det, power of two)."""
        sinos = np.asarray(sinograms, dtype=np.float32)
        n_pad = max(64, int(2 ** np.ceil(np.log2(2 * self.n_det))))
        spec = scipy.fft.rfft(sinos, n=n_pad, axis=-1, workers=_default_threads())
        spec *= self._filter(filter, n_pad)
        out = scipy.fft.irfft(spec, n=n_pad, axis=-1, workers=_default_threads())
        return np.ascontiguousarray(out[..., : self.n_det], dtype=np.float32)

    def fbp(self, sinograms: np.ndarray, filter: FilterName = DEFAULT_FILTER) -> np.ndarray:
        """Filtered backprojection: (B, n_views, n_det) -> (B, size, size), same units as μ."""
        q = self.filter_sinograms(sinograms, filter)
        img = self.backproject(q)
        img *= np.float32(np.pi / (self.n_views * self.pixel_mm * self.det_spacing_mm))
        return img


@functools.lru_cache(maxsize=4)
def get_projector(
    size: int = DEFAULT_SIZE,
    fov_mm: float = DEFAULT_FOV_MM,
    n_views: int = DEFAULT_N_VIEWS,
    n_det: int | None = None,
) -> ParallelBeamProjector:
    """Cached :class:`ParallelBeamProjector` per geometry (the default one takes ~0.75 GB)."""
    return ParallelBeamProjector(size, fov_mm, n_views, n_det)


def measured_line_integrals(
    p: np.ndarray, n0: np.ndarray, electronic_noise_sd: float, rng: np.random.Generator
) -> np.ndarray:
    """Noisy line integrals ``log(N0 / (N + 1/2))`` of noise-free ones ``p`` at each incident
    photon count of ``n0`` (one per dose): float32, shape ``(len(n0), *p.shape)``.

    Counts: Poisson of ``N0·exp(−p)`` (:func:`poisson_quantile` of one uniform per ray) plus
    Gaussian electronic noise (SD in counts), clamped at :data:`COUNT_FLOOR`; all in float64.
    The random numbers consumed depend on the shape only, never on the values.
    """
    p = np.asarray(p, dtype=np.float64)
    n0 = np.asarray(n0, dtype=np.float64).reshape((-1,) + (1,) * p.ndim)
    expected = n0 * np.exp(-p)[None]
    # one uniform per ray and dose, however large the count (numpy's own Poisson sampler
    # rejects a value-dependent number of draws: a last-bit change shifts the whole stream)
    counts = poisson_quantile(rng.random(expected.shape), expected)
    if electronic_noise_sd > 0:
        counts += electronic_noise_sd * rng.standard_normal(counts.shape)
    np.maximum(counts, COUNT_FLOOR, out=counts)
    return (np.log(n0) - np.log(counts + LOG_BIAS_OFFSET)).astype(np.float32)


def poisson_quantile(u: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Poisson quantiles: the smallest ``k`` with ``P(N <= k; lam) >= u``, elementwise (float64).

    Equals ``scipy.stats.poisson.ppf(u, lam)`` for ``u`` in (0, 1), about five times faster: a
    Cornish–Fisher start, then steps of one against the exact CDF (``scipy.special.pdtr``).
    With ``u`` uniform this draws Poisson counts with one random number each, and a tiny change
    of ``lam`` changes ``k`` only when ``u`` lies within that change of a CDF step.
    """
    u = np.asarray(u, dtype=np.float64)
    lam = np.asarray(lam, dtype=np.float64)
    u, lam = np.broadcast_arrays(u, lam)
    z = scipy.special.ndtri(u)
    k = np.maximum(np.floor(lam + np.sqrt(lam) * z + (z * z - 1.0) / 6.0 + 0.5), 0.0)
    todo = np.flatnonzero(scipy.special.pdtr(k, lam) < u)  # start too low: step up
    while todo.size:
        k.flat[todo] += 1.0
        todo = todo[scipy.special.pdtr(k.flat[todo], lam.flat[todo]) < u.flat[todo]]
    todo = np.flatnonzero(k > 0)  # start too high: step down while P(N <= k - 1) >= u
    todo = todo[scipy.special.pdtr(k.flat[todo] - 1.0, lam.flat[todo]) >= u.flat[todo]]
    while todo.size:
        k.flat[todo] -= 1.0
        todo = todo[k.flat[todo] > 0]
        todo = todo[scipy.special.pdtr(k.flat[todo] - 1.0, lam.flat[todo]) >= u.flat[todo]]
    return k


def hu_to_mu(hu: np.ndarray, mu_water_per_mm: float = DEFAULT_MU_WATER_PER_MM) -> np.ndarray:
    """Linear attenuation (1/mm) from HU: ``μ_w (1 + HU/1000)``, clipped at 0."""
    mu = np.float32(mu_water_per_mm) * (1.0 + np.asarray(hu, dtype=np.float32) / np.float32(1000.0))
    return np.maximum(mu, np.float32(0.0))


def mu_to_hu(mu: np.ndarray, mu_water_per_mm: float = DEFAULT_MU_WATER_PER_MM) -> np.ndarray:
    """HU from linear attenuation (1/mm): ``1000 (μ/μ_w − 1)``."""
    mu = np.asarray(mu, dtype=np.float32)
    return (np.float32(1000.0) * (mu / np.float32(mu_water_per_mm) - np.float32(1.0))).astype(np.float32)


def _resolve_projector(hu: np.ndarray, projector: ParallelBeamProjector | None) -> ParallelBeamProjector:
    if projector is None:
        return get_projector(int(hu.shape[-1]), DEFAULT_FOV_MM, DEFAULT_N_VIEWS)
    return projector


def reconstruct_noiseless(
    hu: np.ndarray,
    projector: ParallelBeamProjector | None = None,
    *,
    mu_water_per_mm: float = DEFAULT_MU_WATER_PER_MM,
    filter: FilterName = DEFAULT_FILTER,
) -> np.ndarray:
    """FBP (in HU) of the noise-free sinogram of ``hu`` (B, H, W) or (H, W)."""
    proj = _resolve_projector(np.asarray(hu), projector)
    sino = proj.forward(hu_to_mu(hu, mu_water_per_mm))
    return mu_to_hu(proj.fbp(sino, filter), mu_water_per_mm)


def simulate_dose_pair(
    hu: np.ndarray,
    *,
    projector: ParallelBeamProjector | None = None,
    full_dose_photons: float = DEFAULT_FULL_DOSE_PHOTONS,
    dose_fraction: float = DEFAULT_DOSE_FRACTION,
    electronic_noise_sd: float = DEFAULT_ELECTRONIC_NOISE_SD,
    mu_water_per_mm: float = DEFAULT_MU_WATER_PER_MM,
    rng: np.random.Generator,
    filter: FilterName = DEFAULT_FILTER,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate (low-dose, full-dose) reconstructions in HU of phantom slices ``hu`` (B, H, W).

    HU -> μ, one noise-free forward projection ``p``; expected counts ``N0·exp(−p)`` with
    ``N0 = full_dose_photons`` (full dose) or ``full_dose_photons·dose_fraction`` (low dose);
    independent Poisson noise per dose (:func:`poisson_quantile` of one uniform per ray) plus
    Gaussian electronic noise (SD in counts), in float64; counts
    clamped at :data:`COUNT_FLOOR`; ``−log((N + 1/2)/N0)`` (nearly unbiased, see
    :data:`LOG_BIAS_OFFSET`); FBP; back to HU. Both outputs are float32
    with the shape of ``hu``. Random draws come from ``rng`` only (same seed -> same output).
    """
    hu = np.asarray(hu, dtype=np.float32)
    single = hu.ndim == 2
    batch = hu[None] if single else hu
    proj = _resolve_projector(batch, projector)
    n0 = np.array([full_dose_photons * dose_fraction, full_dose_photons], dtype=np.float64)
    low = np.empty(batch.shape, dtype=np.float32)
    full = np.empty(batch.shape, dtype=np.float32)
    for s in range(0, batch.shape[0], _CHUNK):  # bounded memory; fixed chunks keep rng order
        e = min(batch.shape[0], s + _CHUNK)
        b = e - s
        p = proj.forward(hu_to_mu(batch[s:e], mu_water_per_mm)).astype(np.float64)  # (b, V, D)
        noisy = measured_line_integrals(p, n0, electronic_noise_sd, rng)  # (2, b, V, D)
        recon = proj.fbp(noisy.reshape(2 * b, proj.n_views, proj.n_det), filter)
        out = mu_to_hu(recon, mu_water_per_mm).reshape(2, b, proj.size, proj.size)
        low[s:e], full[s:e] = out[0], out[1]
    if single:
        return low[0], full[0]
    return low, full
