"""Where the invariances' missing low-frequency noise is lost: cVAE or cINN? (docs/spatial_latent.md)

Reads a finished run's invariances (``runs/<profile>/invariances/<denoiser>.npz``) and the
denoiser's cVAE and cINN, and prints per denoiser the power (HU² per pixel) in three radial bands
of the sampling frequency (below 0.125, 0.125-0.25, above 0.25 cycles per pixel) of:

* ``LD - FD``: the simulated noise; ``x - f(x)``: what the denoiser removes;
* ``x - mean inv``: the real crop's deviation from the mean of its invariances. Under the model,
  x is one draw from p(x | f(x)), so a perfect model gives it the spectrum of the next row;
* ``inv - mean inv``: the invariances' deviations from their mean (the controls' ``hf_share``);
* ``post - mean post``: decoded samples of the encoder's own posterior q(z | x, f(x));
* ``rec(mu) - f(x)``: the cVAE's reconstruction of what the denoiser removes.

and, on the latent grid (cells), the share of power below a quarter of the cell sampling
frequency of ``mu - mean z~`` (the real crop's latent deviation from the cINN samples' mean) and of
``z~ - mean z~`` (the cINN's samples), and of ``v = t(mu | f(x))``, which a perfect flow makes white
(white: pi/16 = 0.196).

    .venv/bin/python docs/experiments/spectrum_diagnosis.py --profile default --denoisers wganvgg cnn10
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from invariscope.data.loader import Normalizer
from invariscope.notebook import setup
from invariscope.stages import cinn_training
from invariscope.stages import invariances as inv

BANDS = (0.0, 0.125, 0.25, np.inf)


def band_power(images: np.ndarray) -> np.ndarray:
    """Mean power per pixel (the variance's share) of ``images`` (..., c, c) in the radial BANDS."""
    a = np.asarray(images, np.float64)
    c = a.shape[-1]
    f = np.fft.fftfreq(c)
    r = np.hypot(f[:, None], f[None, :])
    p = np.abs(np.fft.fft2(a.reshape(-1, c, c))) ** 2 / c**4
    return np.array([p[:, (r >= lo) & (r < hi)].sum(1).mean() for lo, hi in zip(BANDS[:-1], BANDS[1:])])


def low_share(maps: np.ndarray, cutoff: float = 0.25) -> float:
    """Share of the spatial power of ``maps`` (..., h, w) below ``cutoff`` cycles per cell."""
    a = np.asarray(maps, np.float64)
    h = a.shape[-1]
    f = np.fft.fftfreq(h)
    low = np.hypot(f[:, None], f[None, :]) < cutoff
    p = np.abs(np.fft.fft2(a.reshape(-1, h, h))) ** 2
    return float(p[:, low].sum() / p.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--denoisers", nargs="+", default=["cnn10", "redcnn", "wganvgg", "dugan", "gaussri"])
    ap.add_argument("--crops", type=int, default=48)
    a = ap.parse_args()
    torch.set_num_threads(1)
    nb = setup(a.profile)
    params, ds, n_inv = nb.params, nb.dataset, 16
    norm = Normalizer.of(ds)
    print("bands (cycles/px): <0.125 | 0.125-0.25 | >0.25, HU^2 per pixel; hf = share above 0.25")
    for name in a.denoisers:
        res = inv.load_invariances(nb.dir("invariances") / f"{name}.npz")
        x, y, yh, xt = (np.asarray(res[k], np.float64)[: a.crops] for k in ("x", "y", "y_hat", "x_tilde"))
        den, vae = cinn_training.load_models(name, params, ds)
        cinn = cinn_training.load_cinn(name, params, ds, nb.dir("cinn"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            xn = torch.from_numpy(np.asarray(norm(x.astype(np.float32)), np.float32))[:, None]
            yn = den(xn)
            mu, logvar = vae.encode(xn, yn)
            rec = norm.to_hu(vae.decode(mu, yn)[:, 0]).numpy().astype(np.float64)
            eps = torch.randn((n_inv, *mu.shape), generator=g)
            post = np.stack([norm.to_hu(vae.decode(mu + torch.exp(0.5 * logvar) * eps[j], yn)[:, 0]).numpy()
                             for j in range(n_inv)], 1).astype(np.float64)
            cond = cinn.embed(yn)
            zt = torch.stack([cinn.inverse_embedded(torch.randn(mu.shape, generator=g), cond)
                              for _ in range(n_inv)], 1)  # (B, n, C, h, w)
            v, _ = cinn.forward_embedded(mu, cond)
        mean_inv = xt.mean(1, keepdims=True)
        rows = {
            "LD - FD": x - y,
            "x - f(x)": x - yh,
            "x - mean inv": x - mean_inv[:, 0],
            "inv - mean inv": xt - mean_inv,
            "post - mean post": post - post.mean(1, keepdims=True),
            "rec(mu) - f(x)": rec - yh,
        }
        print(f"\n{name}")
        for k, img in rows.items():
            p = band_power(img)
            print(f"  {k:18s} {p[0]:9.0f} {p[1]:9.0f} {p[2]:9.0f}   total {p.sum():8.0f}  hf {p[2] / p.sum():.3f}")
        zm = zt.mean(1).numpy()
        print(f"  latent low share (<0.25 cyc/cell): mu - mean z~ {low_share(mu.numpy() - zm):.3f}, "
              f"z~ - mean z~ {low_share((zt - zt.mean(1, keepdim=True)).numpy()):.3f}, "
              f"v = t(mu) {low_share(v.numpy()):.3f}, v - mean_c v {low_share((v - v.mean(0)).numpy()):.3f} "
              f"(white 0.196); var v {float(v.var()):.3f}")


if __name__ == "__main__":
    main()
