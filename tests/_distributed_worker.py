"""Stage trainings run in one process or in several gloo processes (tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from invariscope import distributed
from invariscope.config.params import load_params
from invariscope.data.dataset import CTDataset
from invariscope.stages import cinn_training, denoiser_training, embedding, vae_training


def run_jobs(jobs: list[dict[str, Any]], ds_root: str) -> None:
    """Train every job in order: ``{"stage", "name", "overrides", "out", ...dirs}`` on the smoke
    profile with ``overrides``; ``"dump": True`` also saves each process's weights to
    ``<out>/rank<r>.pt``."""
    ds = CTDataset(ds_root)
    for job in jobs:
        params = load_params("smoke", job["overrides"])
        stage, name, out = job["stage"], job.get("name"), Path(job["out"])
        dirs = {k: job[k] for k in ("vae_dir", "denoiser_dir", "cinn_dir") if k in job}
        if stage == "denoiser":
            model = denoiser_training.train_denoiser(name, params, ds, out, progress=False).model
        elif stage == "vae":
            model = vae_training.train_vae(name, params, ds, out, progress=False, **dirs).model
        elif stage == "cinn":
            model = cinn_training.train_cinn(name, params, ds, out, progress=False, **dirs).model
        else:
            model = embedding.train_embedding(params, ds, out, progress=False, **dirs).model
        if job.get("dump"):
            torch.save(model.state_dict(), out / f"rank{distributed.world().rank}.pt")


def worker(rank: int, size: int, init_file: str, jobs: list[dict[str, Any]], ds_root: str) -> None:
    """One of ``size`` gloo processes (``torch.multiprocessing.spawn`` target)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        run_jobs(jobs, ds_root)
    finally:
        dist.destroy_process_group()
