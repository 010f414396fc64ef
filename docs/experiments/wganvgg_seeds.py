"""WGAN-VGG across training seeds: Table 1's PSNR and the mean intensity offset of ``best.pt``.

Trains WGAN-VGG of a params file for each seed (``runs/<run_name>/wganvgg_seed<k>/``; finished
runs are reused), evaluates it on the full test slices as Table 1 does, and prints per seed the
step ``best.pt`` was taken from, the lung-window PSNR and SSIM, the RMSE and the mean offset
(denoised − full dose, HU, over body pixels of the test slices). docs/reproducibility.md has the
results for the files below.

    .venv/bin/python docs/experiments/wganvgg_seeds.py --params params/experiments/wganvgg_paper_loss.yaml
    .venv/bin/python docs/experiments/wganvgg_seeds.py --params params/experiments/wganvgg_pixel1.yaml
    .venv/bin/python docs/experiments/wganvgg_seeds.py --params params/experiments/wganvgg_psnr_select.yaml
    .venv/bin/python docs/experiments/wganvgg_seeds.py --params params/default.yaml
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from invariscope.config.params import load_params
from invariscope.config.paths import run_dir
from invariscope.data import cohort
from invariscope.data.loader import Normalizer
from invariscope.evaluation.denoising import evaluate_on_split
from invariscope.stages.denoiser_training import denoise_hu, train_denoiser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1332, 2, 1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        params = load_params(args.params, {"seed": seed})
        ds = cohort.prepare_dataset(params, progress=False)
        res = train_denoiser("wganvgg", params, ds, run_dir(params.profile) / f"wganvgg_seed{seed}",
                             progress=False)
        norm = Normalizer.of(ds)
        df = evaluate_on_split(ds, lambda a: denoise_hu(res.model, a, norm), progress=False)
        offsets = []
        for pid in ds.patients("test"):
            low = np.asarray(ds.volume(pid, "low"), np.float32)
            full = np.asarray(ds.volume(pid, "full"), np.float32)
            diff, body = denoise_hu(res.model, low, norm) - full, full > -500
            offsets += [float(diff[k][body[k]].mean()) for k in range(len(low))]
        print(f"seed {seed}: best.pt from step {res.best_step}, PSNR {df.psnr.mean():.2f} dB, "
              f"SSIM {df.ssim.mean():.3f}, RMSE {df.rmse.mean():.1f} HU, "
              f"offset {np.mean(offsets):+.1f} HU", flush=True)


if __name__ == "__main__":
    main()
