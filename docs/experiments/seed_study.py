"""Seed study: the controls of the sampled invariances for several training seeds.

For every seed and denoiser: train the denoiser (CNN-10 and the other trained methods; Gauss+RI
has nothing to train), its cVAE and its cINN with ``seed`` set to that value, sample the
invariances and their prior ablation on the profile's fixed test crops, and compute
:func:`invariscope.stages.invariances.control_measures` and the targets of
:func:`invariscope.stages.invariances.check_targets`. Everything goes to ``runs/<run_name>/seed<k>/``
(checkpoints resume; finished parts are reused); the table to ``docs/experiments/<out>.csv`` and
a markdown summary beside it.

    .venv/bin/python docs/experiments/seed_study.py --params params/experiments/seed_study.yaml \\
        --seeds 1332 1 2 --denoisers gaussri cnn10

``--reuse default`` trains only the cINN (variants of the cINN, e.g. ``coarse_blocks``) on the
denoisers and cVAEs of ``runs/default/`` (seed 1332, the pipeline's run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from invariscope import atomic
from invariscope.config.params import load_params
from invariscope.config.paths import ensure, repo_root, run_dir
from invariscope.data import cohort
from invariscope.data.loader import fixed_crops
from invariscope.provenance import cinn_identity
from invariscope.stages import cinn_training, denoiser_training
from invariscope.stages import invariances as inv
from invariscope.stages import vae_training

HERE = Path(__file__).resolve().parent


def run_one(params_file: str, seed: int, name: str, progress: bool,
            reuse: str | None = None) -> dict[str, float]:
    params = load_params(params_file, {"seed": seed})
    dataset = cohort.prepare_dataset(params, progress=progress)
    root = ensure(run_dir(params.profile) / f"seed{seed}")
    dirs = {k: root / k for k in ("denoisers", "vae", "cinn", "invariances")}
    if reuse:  # a cINN variant: the denoiser and cVAE of a finished run (their fingerprints must match)
        dirs.update(denoisers=run_dir(reuse) / "denoisers", vae=run_dir(reuse) / "vae")
    else:
        denoiser_training.train_denoiser(name, params, dataset, dirs["denoisers"], progress=progress)
        vae_training.train_vae(name, params, dataset, dirs["vae"], progress=progress,
                               denoiser_dir=dirs["denoisers"])
    trained = cinn_training.train_cinn(name, params, dataset, dirs["cinn"], progress=progress,
                                       vae_dir=dirs["vae"], denoiser_dir=dirs["denoisers"])
    models = cinn_identity(name, params, dataset, dirs["cinn"], dirs["vae"], dirs["denoisers"])
    cfg = params.invariances
    crops = fixed_crops(dataset, "test", params.vae.crop_size, cfg.n_crops, cfg.seed)
    common = dict(dataset=dataset, crops=crops, n_invariances=cfg.n_invariances,
                  batch_size=cfg.batch_size, seed=cfg.seed, models=models,
                  chunk_crops=cfg.chunk_crops, progress=progress)
    out = ensure(dirs["invariances"])
    res = inv.sample_invariances_cached(out / f"{name}.npz", trained.denoiser, trained.vae,
                                        trained.model, **common)
    prior = inv.sample_invariances_cached(out / f"{name}_prior.npz", trained.denoiser, trained.vae,
                                          None, prior=True, **common)
    return {"seed": seed, "denoiser": name, **inv.control_measures(res, prior)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(repo_root() / "params/experiments/seed_study.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1332, 1, 2])
    ap.add_argument("--denoisers", nargs="+", default=["gaussri", "cnn10"])
    ap.add_argument("--out", default="seed_study", help="stem of the csv/md files in docs/experiments")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reuse", default=None, metavar="RUN",
                    help="train only the cINN, on the denoisers and cVAEs of runs/RUN/ (a finished "
                         "run of the same seed, data, denoiser and vae settings)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [run_one(a.params, s, d, not a.quiet, a.reuse) for s in a.seeds for d in a.denoisers]
    table = pd.DataFrame(rows)
    atomic.write_text(HERE / f"{a.out}.csv", table.to_csv(index=False, float_format="%.4g"))
    lines = []
    for s in a.seeds:
        t = inv.check_targets(table[table.seed == s].drop(columns="seed"),
                              max_calibration_gap=0.05 if "hf_share_x" in table else None,
                              max_hf_gap_q_nyquist=0.1 if "hf_share_q_nyquist" in table else None)
        lines.append(f"seed {s}: {int(t.passed.sum())} of {len(t)} targets met"
                     + "".join(f"\n  FAIL {r.denoiser} {r.target}: {r.value:.3f} vs {r.threshold:.3f}"
                               for r in t.itertuples() if not r.passed))
    summary = "\n".join(lines)
    atomic.write_text(HERE / f"{a.out}_targets.txt", summary + "\n")
    print(table.round(3).to_string(index=False))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
