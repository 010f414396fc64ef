"""The measurements of ``benchmarks/gpu_check.sh`` on one device, and its report.

    python benchmarks/gpu_check.py compare CPU_FIGURES GPU_FIGURES --out RESULT.json
    python benchmarks/gpu_check.py steps --out RESULT.json [--dry-run]
    torchrun --nproc-per-node 2 benchmarks/gpu_check.py ddp --out RESULT.json [--dry-run]
    python benchmarks/gpu_check.py report --out benchmarks/gpu/<device>.md RESULT.json ...

``compare``: the smoke tables of a GPU run against the CPU run's, number by number, with the
tolerance of ``./run_all.sh --check`` (3 seed SDs of the default profile's seed spread, at least
the printed rounding). ``steps``: 20 training steps (after 3 warm-up steps) of every paper-size
training stage (the library's own step functions, random weights and data at the paper's batch
and crop sizes) in fp32 and bf16: steps/s, peak memory, and the paper profile's hours at that
rate; plus one stage with deterministic algorithms (``INVARISCOPE_DETERMINISTIC=1``). ``ddp``
(under torchrun): the same steps of one stage data-parallel over the processes, the global
batch split across them. ``--dry-run``: on the CPU, 1 step after 1 warm-up at a batch of 2 (the
code paths, not the speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from invariscope import distributed  # noqa: E402
from invariscope.config.params import load_params  # noqa: E402
from invariscope.evaluation import headline  # noqa: E402
from invariscope.models.denoisers import build_denoiser  # noqa: E402
from invariscope.names import TRAINED_METHODS  # noqa: E402
from invariscope.precision import Precision  # noqa: E402
from invariscope.stages import denoiser_training as dt  # noqa: E402
from invariscope.stages import vae_training as vt  # noqa: E402
from invariscope.stages.cinn_training import build_cinn, encode_latents  # noqa: E402
from invariscope.stages.embedding import build_embedder  # noqa: E402

NO_WEIGHTS = {"denoisers.vgg_weights": None, "vae.vgg16_weights": None,
              "vae.imagenet_weights": None, "embedding.imagenet_weights": None}
#: How many of each stage's jobs the paper profile trains (five cVAEs, cINNs, ...).
JOBS = {"cvae": 5, "cinn": 5}


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run")
    return torch.device("cuda", torch.cuda.current_device())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def stage_steps(params: Any, dev: torch.device, batch_cap: int | None) -> dict[str, tuple[Callable[[], None], int, int]]:
    """Per stage: (one training step, its batch size, its paper iterations x jobs)."""
    fake = SimpleNamespace(normalization=(-542.55, 502.19))
    mp = Precision(params.precision, dev)
    out: dict[str, tuple[Callable[[], None], int, int]] = {}

    def size(b: int) -> int:
        return min(b, batch_cap) if batch_cap else b

    for name in TRAINED_METHODS:
        cfg = getattr(params.denoisers, name)
        setup = dt._setup(name, params, fake, dev)
        b, p = size(cfg.batch_size), cfg.patch_size
        batch = (torch.randn(b, 1, p, p, device=dev), torch.randn(b, 1, p, p, device=dev))
        out[f"denoiser {name}"] = (lambda s=setup, x=batch: s.step_fn(1, distributed.shard(x)), b,
                                   cfg.iterations)
    v = params.vae
    f = build_denoiser("redcnn").to(dev).eval()
    for q in f.parameters():
        q.requires_grad_(False)
    b, c = size(v.batch_size), v.crop_size
    x = (torch.randn(b, 1, c, c, device=dev),)
    for conditional in (False, True):
        vae = vt.build_vae(conditional, params).to(dev)
        critic = vt._build_critic(conditional, params).to(dev)
        perceptual = vt.build_perceptual_loss(None).to(dev)
        step, _ = vt._make_step(vae, critic, f if conditional else None, params, perceptual, mp)
        key = "cVAE (RED-CNN's ŷ)" if conditional else "VAE, unconditional"
        out[key] = (lambda s=step: s(0, distributed.shard(x)), b,
                    v.iterations * (JOBS["cvae"] if conditional else 1))
    ci = params.cinn
    cinn = build_cinn(params).to(dev)
    vae = vt.build_vae(True, params).to(dev).eval()
    opt = torch.optim.Adam(cinn.parameters(), lr=ci.lr)
    bc = size(ci.batch_size)
    xc = torch.randn(bc, 1, c, c, device=dev)

    def cinn_step() -> None:
        z, y_hat = encode_latents(vae, f, distributed.shard(xc))
        if not cinn.is_initialized:
            cinn.initialize(distributed.gather(z), distributed.gather(y_hat))
        with mp.autocast():
            loss = cinn.nll_loss(z, y_hat)
        mp.update(loss, opt)

    out["cINN (RED-CNN's ŷ)"] = (cinn_step, bc, ci.iterations * JOBS["cinn"])
    e = params.embedding
    phi = build_embedder(params, load_pretrained=False).to(dev)
    opt_e = torch.optim.Adam(phi.parameters(), lr=e.lr)
    be = size(e.crops_per_batch * (1 + e.invariances_per_crop))
    imgs = torch.randn(be, 1, c, c, device=dev)

    def embedding_step() -> None:
        with mp.autocast():
            loss = phi(distributed.shard(imgs)).float().pow(2).mean()
        mp.update(loss, opt_e)

    out["embedding"] = (embedding_step, be, e.iterations)
    return out


def time_steps(step: Callable[[], None], dev: torch.device, warmup: int, n: int) -> tuple[float, float | None]:
    """(steps/s, peak GPU memory in GB or None on the CPU) of ``n`` steps after ``warmup``."""
    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(dev)
    rate = n / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    return rate, peak


def cmd_steps(args: argparse.Namespace) -> dict[str, Any]:
    dev = _device(args.dry_run)
    warmup, n, cap = (0, 1, 2) if args.dry_run else (3, 20, None)
    rows = []
    for prec in ("fp32", "bf16"):
        params = load_params("paper", {**NO_WEIGHTS, "precision": prec, "device": str(dev)})
        torch.manual_seed(0)
        for name, (step, batch, total) in stage_steps(params, dev, cap).items():
            rate, peak = time_steps(step, dev, warmup, n)
            rows.append({"stage": name, "precision": prec, "batch": batch, "steps_per_s": rate,
                         "peak_gb": peak, "paper_steps": total, "hours": total / rate / 3600})
            print(f"{prec} {name}: {rate:.3g} steps/s, peak {peak} GB", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    det = None
    if dev.type == "cuda":  # what deterministic algorithms cost, on the cheapest stage
        params = load_params("paper", {**NO_WEIGHTS, "device": str(dev)})
        os.environ["INVARISCOPE_DETERMINISTIC"] = "1"
        from invariscope import device as devices

        devices.configure_cuda()
        step, batch, _ = stage_steps(params, dev, cap)["denoiser cnn10"]
        det = {"stage": "denoiser cnn10", "precision": "fp32",
               "steps_per_s": time_steps(step, dev, warmup, n)[0]}
        torch.use_deterministic_algorithms(False)
    return {"kind": "steps", "device": describe(dev), "rows": rows, "deterministic": det,
            "dry_run": args.dry_run}


def cmd_ddp(args: argparse.Namespace) -> dict[str, Any] | None:
    dev = _device(args.dry_run)
    w, dev = distributed.init_from_env(dev)
    warmup, n, cap = (1, 1, 4) if args.dry_run else (3, 20, None)
    params = load_params("paper", {**NO_WEIGHTS, "precision": "bf16" if dev.type == "cuda" else "fp32",
                                   "device": str(dev)})
    torch.manual_seed(0)
    stage = "denoiser redcnn"
    step, batch, total = stage_steps(params, dev, cap)[stage]
    rate, peak = time_steps(step, dev, warmup, n)
    torch.distributed.destroy_process_group()
    if not w.is_main:
        return None
    return {"kind": "ddp", "device": describe(dev), "processes": w.size, "stage": stage,
            "global_batch": batch, "steps_per_s": rate, "peak_gb": peak, "paper_steps": total,
            "precision": params.precision, "dry_run": args.dry_run}


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    cpu, gpu = headline.from_folder(Path(args.cpu)), headline.from_folder(Path(args.gpu))
    spread_file = ROOT / headline.SPREAD_FILE
    import pandas as pd

    sds = pd.read_csv(spread_file, index_col=0)["sd"].dropna().to_dict() if spread_file.is_file() else {}
    table = headline.check(gpu, cpu, sds)
    return {"kind": "compare", "rows": table.to_dict(orient="records"),
            "within": int((table["verdict"] == "within").sum()), "total": len(table)}


def describe(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def cmd_report(args: argparse.Namespace) -> str:
    parts = [json.loads(Path(p).read_text()) for p in args.results if Path(p).is_file()]
    by = {p["kind"]: p for p in parts}
    steps = by.get("steps")
    device = steps["device"] if steps else "unknown device"
    lines = [f"# GPU check: {device}", "",
             f"`benchmarks/gpu_check.sh{' --dry-run' if steps and steps['dry_run'] else ''}`, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.", ""]
    if steps and steps["dry_run"]:
        lines += ["**Dry run on the CPU** (1 step at a batch of 2): the code paths work; the rates "
                  "below are not a GPU's.", ""]
    comp = by.get("compare")
    lines += ["## (a) Smoke pipeline on the device against the CPU run", ""]
    if comp:
        lines.append(f"{comp['within']} of {comp['total']} numbers within the `--check` tolerance "
                     "(3 seed SDs of the default profile's spread, at least the printed rounding).")
        outside = [r for r in comp["rows"] if r["verdict"] != "within"]
        if outside:
            lines += ["", "| number | CPU | device | tolerance | verdict |", "|---|---:|---:|---:|---|"]
            lines += [f"| {r['number']} | {r['committed']:.4g} | {r['this run']} | {r['tolerance']:.3g} | "
                      f"{r['verdict']} |" for r in outside]
    else:
        lines.append("not run")
    lines += ["", "## (b) Paper-size training steps", ""]
    if steps:
        lines += ["| stage | precision | batch | steps/s | peak GB | paper steps | hours at this rate |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in steps["rows"]:
            peak = "–" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
            lines.append(f"| {r['stage']} | {r['precision']} | {r['batch']} | {r['steps_per_s']:.3g} | "
                         f"{peak} | {r['paper_steps']:,} | {r['hours']:,.1f} |")
        for prec in ("fp32", "bf16"):
            h = sum(r["hours"] for r in steps["rows"] if r["precision"] == prec)
            lines.append(f"\nTraining stages of the paper profile at these rates, {prec}: **{h:,.1f} h** "
                         "on one device (sampling and analysis, a few % of the work, not included).")
        det = steps.get("deterministic")
        if det:
            base = next(r for r in steps["rows"] if r["stage"] == det["stage"] and r["precision"] == "fp32")
            lines.append(f"\nDeterministic algorithms (`INVARISCOPE_DETERMINISTIC=1`), {det['stage']}: "
                         f"{det['steps_per_s']:.3g} steps/s against {base['steps_per_s']:.3g} with cuDNN "
                         "autotuning.")
    ddp = by.get("ddp")
    lines += ["", "## (c) Data-parallel step through torchrun", ""]
    if ddp:
        one = next((r for r in (steps or {}).get("rows", []) if r["stage"] == ddp["stage"]
                    and r["precision"] == ddp["precision"]), None)
        eff = ""
        if one and not ddp["dry_run"]:
            eff = f"; one device: {one['steps_per_s']:.3g} steps/s, scaling {ddp['steps_per_s'] / one['steps_per_s'] / ddp['processes']:.0%}"
        lines.append(f"{ddp['stage']}, {ddp['processes']} processes, global batch {ddp['global_batch']}, "
                     f"{ddp['precision']}: {ddp['steps_per_s']:.3g} steps/s{eff}.")
    else:
        lines.append("not run (fewer than two devices visible)")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("steps", "ddp"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("compare")
    p.add_argument("cpu")
    p.add_argument("gpu")
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("results", nargs="*")
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.cmd == "report":
        print(cmd_report(args))
        return 0
    result = {"steps": cmd_steps, "ddp": cmd_ddp, "compare": cmd_compare}[args.cmd](args)
    if result is not None:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
