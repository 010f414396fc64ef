"""Benchmark invariance sampling: invariances per second and the cINN's share of the time.

Usage (from the repository root)::

    PYTHONPATH=lib .venv/bin/python benchmarks/bench_invariances.py            # benchmark
    PYTHONPATH=lib .venv/bin/python benchmarks/bench_invariances.py --write    # + update README
    PYTHONPATH=lib .venv/bin/python benchmarks/bench_invariances.py --sizes default --crops 8 --invariances 32

For each size (the ``default`` and ``paper`` profiles' ``vae`` and ``cinn`` sections) the cVAE and
the cINN are built with random weights (every ActNorm of the cINN initialized from a random
batch, as a trained model would be) and :func:`invariscope.stages.invariances.sample_invariances` draws
``crops x invariances`` invariances of random test crops, timing each part: the cINN (condition
embedding, once per crop, and the inverse flow), the decoder D(z̃, ŷ), the denoiser (f(x) and
f(x̃)), crop loading and conversion to float16 HU. The denoisers are Gauss+RI (no cost to speak
of) and RED-CNN (random weights; the most expensive of the paper's four). ``--write`` replaces the
"## Invariance sampling" section of ``benchmarks/README.md`` (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from invariscope.config.params import load_params  # noqa: E402
from invariscope.data.dataset import DatasetWriter  # noqa: E402
from invariscope.data.loader import fixed_crops  # noqa: E402
from invariscope.models.cinn import count_parameters  # noqa: E402
from invariscope.models.denoisers import build_denoiser  # noqa: E402
from invariscope.stages import invariances as inv  # noqa: E402
from invariscope.stages.cinn_training import build_cinn  # noqa: E402
from invariscope.stages.vae_training import build_vae  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
SECTION = "## Invariance sampling"


def synthetic_dataset(root: Path, size: int):
    """A small on-disk dataset (random smooth HU images) with train/val/test patients."""
    rng = np.random.default_rng(0)
    w = DatasetWriter(root, source="simulated", params={"benchmark": True})
    for i, split in enumerate(["train", "val", "test"]):
        full = rng.normal(-500.0, 300.0, (4, size, size))
        w.add_patient(f"B{i}", split, full + rng.normal(0, 60.0, full.shape), full, pixel_spacing_mm=1.0)
    return w.finalize()


def bench(profile: str, n_crops: int, n_inv: int, batch: int, denoiser: str) -> dict:
    params = load_params(profile)
    c = params.vae.crop_size
    vae = build_vae(True, params, load_pretrained=False,
                    spatial=params.vae.latent == "spatial").eval()
    cinn = build_cinn(params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cinn.initialize(1.5 * torch.randn(64, *vae.latent_shape, generator=g),
                        torch.randn(64, 1, c, c, generator=g))
    cinn.eval()
    torch.manual_seed(0)
    f = build_denoiser(denoiser).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ds = synthetic_dataset(Path(tmp) / "ds", c + 16)
        crops = fixed_crops(ds, "test", c, n_crops, seed=0)
        # warm-up (allocator, oneDNN kernels), not timed
        inv.sample_invariances(f, vae, cinn, ds, crops[:1], min(n_inv, batch), batch, 0, progress=False)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        inv.sample_invariances(f, vae, cinn, ds, crops, n_inv, batch, 0, progress=False,
                               timings=timings)
        total = time.perf_counter() - t0
    n = n_crops * n_inv
    gen = timings.get("cinn", 0.0) + timings.get("decoder", 0.0)
    per_profile = 2 * params.invariances.n_crops * params.invariances.n_invariances  # + prior ablation
    return {"profile": profile, "denoiser": denoiser, "crop": c,
            "latent": "×".join(map(str, vae.latent_shape)),
            "profile_n": per_profile, "profile_hours": per_profile / (n / total) / 3600,
            "cinn_params": count_parameters(cinn), "n": n, "batch": batch, "seconds": total,
            "inv_per_s": n / total, "cinn_s": timings.get("cinn", 0.0),
            "decoder_s": timings.get("decoder", 0.0), "denoiser_s": timings.get("denoiser", 0.0),
            "cinn_share_total": timings.get("cinn", 0.0) / total,
            "cinn_share_generation": timings.get("cinn", 0.0) / gen if gen else float("nan")}


def bench_train_step(profile: str, n_steps: int) -> dict:
    """Seconds per cINN training step at a profile's sizes and batch (random weights and data):
    ŷ = Gauss+RI(x), z ~ q(z | x, ŷ) from the cVAE encoder, NLL forward + backward + Adam."""
    params = load_params(profile)
    c, b = params.vae.crop_size, params.cinn.batch_size
    vae = build_vae(True, params, load_pretrained=False,
                    spatial=params.vae.latent == "spatial").eval()
    cinn = build_cinn(params)
    f = build_denoiser("gaussri").eval()
    opt = torch.optim.Adam(cinn.parameters(), lr=params.cinn.lr)
    g = torch.Generator().manual_seed(0)
    parts = {"encoder": 0.0, "cinn": 0.0}
    for step in range(n_steps + 1):  # step 0: warm-up and ActNorm initialization, not timed
        x = torch.randn(b, 1, c, c, generator=g)
        t0 = time.perf_counter()
        with torch.no_grad():
            y_hat = f(x)
            mu, logvar = vae.encode(x, y_hat)
            z = vae.reparameterize(mu, logvar)
        t1 = time.perf_counter()
        if step == 0:
            cinn.initialize(z, y_hat)
        loss = cinn.nll_loss(z, y_hat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step > 0:
            parts["encoder"] += t1 - t0
            parts["cinn"] += t2 - t1
    per = (parts["encoder"] + parts["cinn"]) / n_steps
    return {"profile": profile, "batch": b, "step_s": per, "encoder_s": parts["encoder"] / n_steps,
            "cinn_s": parts["cinn"] / n_steps, "iterations": params.cinn.iterations,
            "hours": per * params.cinn.iterations / 3600}


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.1f} min"


def table(rows: list[dict]) -> str:
    lines = ["| size | denoiser | crop | latent | cINN params | invariances (batch) | invariances / s "
             "| s / invariance | cINN | decoder | denoiser | cINN share of sampling | cINN share of x̃ generation "
             "| profile's N×M×2 at this rate |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['denoiser']} | {r['crop']}² | {r['latent']} | {r['cinn_params']:,} "
            f"| {r['n']} ({r['batch']}) | {r['inv_per_s']:.2f} | {1 / r['inv_per_s']:.3f} "
            f"| {r['cinn_s']:.2f} s | {r['decoder_s']:.2f} s | {r['denoiser_s']:.2f} s "
            f"| {100 * r['cinn_share_total']:.1f} % | {100 * r['cinn_share_generation']:.1f} % "
            f"| {r['profile_n']:,}: {_duration(r['profile_hours'])} |")
    return "\n".join(lines)


def write_section(text: str) -> None:
    old = README.read_text() if README.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    README.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="default,paper", help="profiles to take the sizes from")
    ap.add_argument("--denoisers", default="gaussri,redcnn")
    ap.add_argument("--crops", type=int, default=None, help="crops (default: 4 default, 2 paper)")
    ap.add_argument("--invariances", type=int, default=None,
                    help="invariances per crop (default: 32 default, 8 paper)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--write", action="store_true", help="update benchmarks/README.md")
    ap.add_argument("--no-train-step", action="store_true", help="skip the cINN training-step timing")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for profile in args.sizes.split(","):
        n_crops = args.crops or (2 if profile == "paper" else 4)
        n_inv = args.invariances or (8 if profile == "paper" else 32)
        batch = load_params(profile).invariances.batch_size
        for d in args.denoisers.split(","):
            r = bench(profile, n_crops, n_inv, min(batch, n_crops * n_inv), d)
            print(f"{profile:8s} {d:8s} {r['inv_per_s']:8.2f} inv/s  cINN {100 * r['cinn_share_total']:.1f} % "
                  f"of sampling, {100 * r['cinn_share_generation']:.1f} % of x̃ generation "
                  f"(cINN {r['cinn_s']:.2f} s, decoder {r['decoder_s']:.2f} s, denoiser "
                  f"{r['denoiser_s']:.2f} s, total {r['seconds']:.2f} s)", flush=True)
            rows.append(r)
    steps = []
    if not args.no_train_step:
        for profile in args.sizes.split(","):
            r = bench_train_step(profile, 2 if profile == "paper" else 5)
            print(f"{profile:8s} cINN training step {r['step_s']:.3f} s (batch {r['batch']})", flush=True)
            steps.append(r)
    step_lines = ""
    if steps:
        step_lines = ("\n\ncINN training step (`cinn_training.train_cinn`'s work: ŷ = Gauss+RI(x), z ~ q(z | x, ŷ) "
                      "from the cVAE encoder, NLL forward and backward, Adam), random weights and data:\n\n"
                      "| size | batch | s / step | cVAE encoder + ŷ | cINN (embedder + flow, fwd + bwd + Adam) "
                      "| profile's iterations at this rate |\n|---|---:|---:|---:|---:|---:|\n"
                      + "\n".join(f"| {r['profile']} | {r['batch']} | {r['step_s']:.3f} | {r['encoder_s']:.3f} s "
                                   f"| {r['cinn_s']:.3f} s | {r['iterations']:,}: {_duration(r['hours'])} |"
                                   for r in steps))
    text = (f"{SECTION}\n\n"
            "`invariscope.stages.invariances.sample_invariances` (ŷ = f(x), v ~ N(0, I), z̃ = t⁻¹(v | ŷ), "
            "x̃ = D(z̃, ŷ), and f(x̃)) with randomly initialised cVAE, cINN (ActNorm initialized from a "
            "random batch) and denoiser at the sizes of the default and paper profiles; each condition "
            "is embedded once per crop. Times are totals over the run; the cINN column is embedding + "
            "inverse flow. \"x̃ generation\" = cINN + decoder (f(x̃) excluded). The last column "
            "extrapolates to the profile's crops × invariances, with the prior ablation (× 2).\n\n"
            f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}. The machine was "
            "shared with other jobs, so timings are noisy.\n\n"
            + table(rows) + step_lines + "\n\n"
            "With several processes on the same cores, torch's default of one thread per core can be "
            "several times slower than `torch.set_num_threads(1)` for these small models (measured here: "
            "a default-size training step took 0.27 s with 1 thread and 1.75 s with 2 under load ~4).\n\n"
            "Rerun: `PYTHONPATH=lib .venv/bin/python benchmarks/bench_invariances.py --write`.\n")
    print()
    print(text)
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
