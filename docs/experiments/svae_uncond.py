"""s_VAE with a longer, slower global unconditional VAE: does Gauss+RI get the lowest s_VAE?

Table 2's s_VAE of a test crop x_i is mean_j cos(mu(x_i), mu(x~_ij)), mu the posterior mean of the
global unconditional VAE (vae name ``unconditional``). In the default profile that VAE is trained
for 250 steps at lr 1e-3 (batch 4) and holds ~10 nats; Gauss+RI ties WGAN-VGG on s_VAE although
the paper has it lowest. This script tries the suggested lever, a longer and slower VAE:

1. for every ``--variants`` params file (a profile that inherits ``params/default.yaml`` and
   changes keys of the ``vae:`` section that configure the global unconditional VAE, e.g.
   ``params/experiments/svae_uncond_s1000_lr5e-4.yaml``), train ONLY the unconditional VAE into
   ``runs/<run_name>/vae/unconditional/`` with the library's
   :func:`invariscope.stages.vae_training.train_vae` (checkpoints every ``vae.checkpoint_every``
   steps: an interrupted run resumes, a finished one is reused; the training time is kept in
   ``runs/<run_name>/svae_uncond.json``). A variant whose run folder is the invariance run's is
   refused, so ``runs/default`` is never written;
2. compute s_VAE of every method on the EXISTING invariance sets of ``runs/<--invariances>/``
   (default ``runs/default``: no denoiser, cVAE, cINN or embedding is retrained; s_DML is not
   computed, :func:`invariscope.stages.analysis.crop_metrics` takes ``embedder=None``), cached in
   ``runs/<run_name>/analysis/svae_metrics.csv`` (keyed by the invariance sets and the VAE's
   checkpoint);
3. the baseline row is the same computation with the committed unconditional VAE of the
   invariance run (``runs/default/vae/unconditional``, loaded, not retrained, nothing written
   there); it reproduces Table 2's s_VAE column (checked against ``runs/default/analysis/metrics.csv``).

The crops are the same in every method's set (the profile's fixed test crops), so Gauss+RI and
the runner-up (the other method with the lowest mean s_VAE) are compared per crop: a paired
bootstrap of the mean difference (95 % percentile interval, one-sided p = share of resamples with
a difference >= 0, and the share of resamples in which Gauss+RI has the lowest mean of all
methods, which also counts a change of runner-up) and a one-sided Wilcoxon signed-rank test
(scipy, H1: Gauss+RI lower). ``significant``: Gauss+RI strictly lowest, bootstrap interval below 0
and Wilcoxon p < 0.05.

Writes ``docs/experiments/<--out>.csv``, one row per VAE: variant, params, iterations, lr, batch,
best_step and val_mae_hu (the validation MAE in HU that picks best.pt), kl_nats / active_dims /
test_mae_hu (:func:`invariscope.stages.vae_training.reconstruction_report` of best.pt), train_s
(wall time of the training; the baseline's is the pipeline job's, runs/default/timings.csv),
s_vae_<method> (mean over crops), runner_up, gap (Gauss+RI minus the lowest other mean),
gaussri_lowest, diff_ci_low / diff_ci_high, p_boot, p_lowest_boot, wilcoxon_p, significant.

    OMP_NUM_THREADS=1 .venv/bin/python docs/experiments/svae_uncond.py            # the three variants
    .venv/bin/python docs/experiments/svae_uncond.py \\
        --variants params/experiments/svae_uncond_s1000_lr5e-4.yaml --out svae_uncond_one
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (see --threads)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from invariscope import atomic  # noqa: E402
from invariscope.config.params import Params, load_params  # noqa: E402
from invariscope.config.paths import ensure, repo_root, run_dir  # noqa: E402
from invariscope.data import cohort  # noqa: E402
from invariscope.data.loader import Normalizer  # noqa: E402
from invariscope.names import UNCONDITIONAL  # noqa: E402
from invariscope.provenance import best_checkpoint, metrics_key  # noqa: E402
from invariscope.stages import analysis, vae_training  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET = "gaussri"
DEFAULT_VARIANTS = ("svae_uncond_s1000_lr5e-4", "svae_uncond_s2000_lr3e-4_b8",
                    "svae_uncond_s3000_lr2e-4_b8")


def _rel(path: str | Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(repo_root()))
    except ValueError:
        return str(p)


def checkpoint_summary(ckpt_dir: Path) -> dict[str, object]:
    """Best step and validation MAE (HU) of a finished training, from its last.pt (else best.pt)."""
    last = ckpt_dir / "last.pt"
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        curve = [(int(h["step"]), round(float(h["val"]), 1)) for h in ck.get("history", []) if "val" in h]
        return {"steps_done": int(ck["step"]), "best_step": ck.get("best_step"),
                "val_mae_hu": ck.get("best_metric"), "val_curve": curve}
    ck = torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=False)
    return {"steps_done": None, "best_step": ck.get("step"), "val_mae_hu": ck.get("metric"),
            "val_curve": []}


def train_variant(params: Params, dataset, progress: bool) -> tuple[torch.nn.Module, dict]:
    """Train (resume, or reuse) only the unconditional VAE of ``params`` into
    ``runs/<run_name>/vae``; the accumulated training wall time is kept beside it."""
    root = ensure(run_dir(params.profile))
    ckpt_dir = root / "vae" / UNCONDITIONAL
    info_file = root / "svae_uncond.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {"train_s": 0.0}
    done = checkpoint_summary(ckpt_dir)["steps_done"] if (ckpt_dir / "last.pt").is_file() else 0
    if done is None or done < params.vae.iterations:
        t0 = time.time()
        trained = vae_training.train_vae(None, params, dataset, root / "vae", progress=progress)
        info["train_s"] = float(info.get("train_s", 0.0)) + time.time() - t0
        info["threads"] = torch.get_num_threads()
        atomic.write_json(info_file, info)
        vae = trained.model
    else:
        vae = vae_training.load_vae(None, params, dataset, root / "vae")
    return vae, {**checkpoint_summary(ckpt_dir), "train_s": info.get("train_s")}


def pipeline_seconds(run: str, job: str = "vae[unconditional]") -> float | None:
    """A job's wall time in ``runs/<run>/timings.csv`` (None when absent)."""
    path = run_dir(run) / "timings.csv"
    if not path.is_file():
        return None
    t = pd.read_csv(path)
    hit = t[t.job == job]
    return float(hit.seconds.iloc[0]) if len(hit) else None


def svae_metrics(vae: torch.nn.Module, inv_dir: Path, methods: list[str], norm: Normalizer,
                 batch_size: int, cache: Path | None = None,
                 checkpoint: Path | None = None) -> pd.DataFrame:
    """Per-crop s_VAE (and MD) of every method's invariances in ``inv_dir`` (s_DML left NaN);
    with ``cache``, reused while the sets and the VAE's ``checkpoint`` are unchanged."""
    key = ""
    if cache is not None and checkpoint is not None:
        key = metrics_key(inv_dir, methods, [checkpoint], {"batch_size": batch_size, "embedder": None})
    metrics, _ = analysis.analyze(inv_dir, methods, vae, None, norm, batch_size=batch_size,
                                  cache=cache, key=key)
    return metrics


def compare(metrics: pd.DataFrame, methods: list[str], target: str = TARGET,
            n_boot: int = 10000, seed: int = 0) -> dict[str, object]:
    """Mean s_VAE per method and the paired comparison of ``target`` with the runner-up."""
    wide = metrics.pivot(index="crop", columns="denoiser", values="s_vae")[methods]
    means = wide.mean()
    others = means.drop(target)
    runner = str(others.idxmin())
    d = (wide[target] - wide[runner]).to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(wide), size=(n_boot, len(wide)))
    boot_d = d[idx].mean(1)
    vals = wide.to_numpy(dtype=np.float64)  # (crops, methods): resample crops, all methods together
    boot_means = vals[idx].mean(1)  # (n_boot, methods)
    t = methods.index(target)
    lowest = (boot_means[:, t][:, None] < np.delete(boot_means, t, axis=1)).all(1)
    lo, hi = np.percentile(boot_d, [2.5, 97.5])
    p_w = float(wilcoxon(d, alternative="less").pvalue) if np.any(d != 0) else 1.0
    gap = float(means[target] - others.min())
    out = {f"s_vae_{m}": float(means[m]) for m in methods}
    out.update(runner_up=runner, gap=gap, gaussri_lowest=bool(gap < 0),
               diff_ci_low=float(lo), diff_ci_high=float(hi),
               p_boot=float((np.sum(boot_d >= 0) + 1) / (n_boot + 1)),
               p_lowest_boot=float(lowest.mean()), wilcoxon_p=p_w)
    out["significant"] = bool(gap < 0 and hi < 0 and p_w < 0.05)
    return out


def row(name: str, params: Params, vae: torch.nn.Module, summary: dict, dataset, metrics: pd.DataFrame,
        methods: list[str], n_boot: int) -> dict[str, object]:
    rep = vae_training.reconstruction_report(vae, None, dataset, params)
    cfg = params.vae
    return {"variant": name, "params": _rel(params.source_file), "iterations": cfg.iterations,
            "lr": cfg.lr, "batch": cfg.batch_size, "best_step": summary["best_step"],
            "val_mae_hu": summary["val_mae_hu"], "kl_nats": rep["kl_nats"],
            "active_dims": rep["active_dims"], "test_mae_hu": rep["mae_hu"],
            "train_s": summary["train_s"], **compare(metrics, methods, n_boot=n_boot)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--variants", nargs="*",
                    default=[str(repo_root() / f"params/experiments/{v}.yaml") for v in DEFAULT_VARIANTS],
                    help="params files of the unconditional-VAE variants (default: the three "
                         "svae_uncond_*.yaml); none: the baseline row only")
    ap.add_argument("--invariances", default="default", metavar="PROFILE",
                    help="the finished run whose invariance sets and unconditional VAE (baseline "
                         "row) are used (default: default)")
    ap.add_argument("--out", default="svae_uncond", help="stem of the csv in docs/experiments")
    ap.add_argument("--n-boot", type=int, default=10000, help="paired bootstrap resamples")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    progress = not a.quiet

    base = load_params(a.invariances)
    dataset = cohort.prepare_dataset(base, progress=progress)
    norm = Normalizer.of(dataset)
    methods = list(base.denoisers.methods)
    if TARGET not in methods:
        raise SystemExit(f"{a.invariances} has no {TARGET} invariances")
    base_root = run_dir(base.profile)
    inv_dir = base_root / "invariances"
    bs = base.analysis.batch_size

    rows, seconds = [], {}
    # baseline: the committed unconditional VAE of the invariance run (read only)
    t0 = time.time()
    vae = vae_training.load_vae(None, base, dataset, base_root / "vae")
    metrics = svae_metrics(vae, inv_dir, methods, norm, bs, cache=None)
    committed = base_root / "analysis" / "metrics.csv"
    if committed.is_file():
        old = pd.read_csv(committed).set_index(["denoiser", "crop"]).s_vae
        new = metrics.set_index(["denoiser", "crop"]).s_vae
        print(f"baseline s_VAE vs {_rel(committed)}: max |diff| {float((old - new).abs().max()):.2e}")
    summary = {**checkpoint_summary(base_root / "vae" / UNCONDITIONAL),
               "train_s": pipeline_seconds(base.profile)}
    rows.append(row("baseline", base, vae, summary, dataset, metrics, methods, a.n_boot))
    seconds["baseline"] = time.time() - t0

    for path in a.variants:
        params = load_params(path)
        if run_dir(params.profile).resolve() == base_root.resolve():
            raise SystemExit(f"{path}: run_name {params.profile!r} is the invariance run's; give the "
                             "variant its own run_name (runs/{a.invariances} is never written)")
        if params.data != base.data:
            raise SystemExit(f"{path}: its data section differs from {a.invariances}'s; the "
                             "invariance sets belong to that data set")
        t0 = time.time()
        vae, summary = train_variant(params, dataset, progress)
        cache = ensure(run_dir(params.profile) / "analysis") / "svae_metrics.csv"
        metrics = svae_metrics(vae, inv_dir, methods, norm, bs, cache,
                               best_checkpoint(run_dir(params.profile) / "vae" / UNCONDITIONAL))
        rows.append(row(params.profile, params, vae, summary, dataset, metrics, methods, a.n_boot))
        seconds[params.profile] = time.time() - t0
        print(f"{params.profile}: best step {summary['best_step']} val {summary['val_mae_hu']:.1f} HU, "
              f"curve {summary['val_curve']}")

    table = pd.DataFrame(rows)
    atomic.write_text(HERE / f"{a.out}.csv", table.to_csv(index=False, float_format="%.5g"))
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(table.drop(columns="params").round(4).to_string(index=False))
    print("wall time of this call per row (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
