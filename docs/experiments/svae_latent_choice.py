"""Which unconditional VAE should define s_VAE? (docs/spatial_latent.md)

Reads a finished run's invariances and its spatial unconditional VAE (``unconditional_spatial``)
and prints, per denoiser, s_VAE computed in that VAE's latent map: flattened, and averaged over
4 x 4 latent cells (16 x 16 px: content rather than noise). Compare with Table 2's s_VAE, which
uses the global unconditional VAE.

    .venv/bin/python docs/experiments/svae_latent_choice.py --profile default
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from invariscope.config.params import load_params
from invariscope.config.paths import run_dir
from invariscope.data import cohort
from invariscope.data.loader import Normalizer
from invariscope.names import UNCONDITIONAL_SPATIAL
from invariscope.stages import invariances as inv
from invariscope.stages import vae_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default")
    a = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(a.profile)
    ds = cohort.prepare_dataset(params, progress=False)
    norm = Normalizer.of(ds)
    root = run_dir(params.profile)
    vae = vae_training.load_vae(UNCONDITIONAL_SPATIAL, params, ds, root / "vae")
    c = vae.latent_shape[0]

    def encode(hu: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(norm(hu.astype(np.float32)), dtype=np.float32))[:, None]
            return vae.encode(x)[0]

    def pooled(mu: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(mu, 4).flatten(1)

    print(f"{'denoiser':10s} {'s_VAE, latent map':>20s} {'s_VAE, 4x4-cell means':>24s}  ({c} channels)")
    for name in params.denoisers.methods:
        res = inv.load_invariances(root / "invariances" / f"{name}.npz")
        mu_x = encode(res["x"])
        flat, pool = [], []
        for i in range(len(mu_x)):
            mu_t = encode(res["x_tilde"][i])
            flat.append(F.cosine_similarity(mu_t.flatten(1), mu_x[i:i + 1].flatten(1)).mean().item())
            pool.append(F.cosine_similarity(pooled(mu_t), pooled(mu_x[i:i + 1])).mean().item())
        print(f"{name:10s} {np.mean(flat):11.3f} ± {np.std(flat):.3f} {np.mean(pool):15.3f} ± {np.std(pool):.3f}")


if __name__ == "__main__":
    main()
