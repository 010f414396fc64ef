"""Train one stage of a profile on several processes: what ``run_all.sh --gpus-per-job N`` runs.

    torchrun --standalone --nproc-per-node 4 -m invariscope.trainer cinn:dugan --profile paper

trains DU-GAN's cINN on 4 GPUs (one process each; gloo processes on a CPU-only machine) with the
params file's global batch split across them (:mod:`invariscope.distributed`). The checkpoints
land where the stage's notebook looks for them, so the notebook, run afterwards in one process,
finds the finished training and goes on with it (nothing is retrained). Jobs: ``denoiser:<name>``,
``vae:<name>`` (``vae:unconditional`` and ``vae:unconditional_spatial`` too), ``cinn:<name>``
and ``embedding``. Without torchrun it trains in this one process.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from invariscope import device as devices
from invariscope import distributed
from invariscope.notebook import setup
from invariscope.stages import cinn_training, denoiser_training, embedding, vae_training

#: Stages with a training loop.
TRAINING_STAGES = ("denoiser", "vae", "cinn", "embedding")


def train_job(spec: str, profile: str, data_root: str = "", force: bool = False) -> None:
    """Train the job ``spec`` (``STAGE[:NAME]``) of ``profile`` in this process, joining the
    process group of torchrun's environment when there is one."""
    stage, _, name = spec.partition(":")
    if stage not in TRAINING_STAGES:
        raise ValueError(f"{spec}: stage must be one of {', '.join(TRAINING_STAGES)}")
    if (stage == "embedding") != (not name):
        raise ValueError(f"{spec}: give STAGE:NAME for {stage}" if stage != "embedding"
                         else f"{spec}: the embedding is one job for every denoiser, give 'embedding'")
    nb = setup(profile, data_root)
    w, dev = distributed.init_from_env(devices.of(nb.params))
    if dev.type == "cuda":  # every stage asks devices.of(): this process's GPU
        os.environ[devices.ENV] = str(dev)
    try:
        shown = w.is_main
        if stage == "denoiser":
            denoiser_training.train_denoiser(name, nb.params, nb.dataset, nb.dir("denoisers"),
                                             force=force, progress=shown)
        elif stage == "vae":
            vae_training.train_vae(name, nb.params, nb.dataset, nb.dir("vae"), force=force,
                                   progress=shown)
        elif stage == "cinn":
            cinn_training.train_cinn(name, nb.params, nb.dataset, nb.dir("cinn"), force=force,
                                     progress=shown)
        else:
            embedding.train_embedding(nb.params, nb.dataset, nb.dir("embedding", create=True),
                                      force=force, progress=shown)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m invariscope.trainer",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("job", metavar="STAGE[:NAME]",
                    help="denoiser:<method>, vae:<method | unconditional>, cinn:<method> or embedding")
    ap.add_argument("--profile", default="default", help="smoke | default | paper, or a params YAML file")
    ap.add_argument("--data", default="", metavar="DIR", help="Mayo LDCT-and-Projection-data folder")
    ap.add_argument("--force", action="store_true", help="delete the stage's checkpoints first")
    args = ap.parse_args(argv)
    try:
        train_job(args.job, args.profile, args.data, args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
