"""Data-parallel training across processes with ``torch.distributed``, launched by ``torchrun``.

``run_all.sh --gpus-per-job N`` (or ``torchrun --nproc-per-node N -m invariscope.trainer ...``)
starts N processes per training job. Each joins the process group torchrun describes
(:func:`init_from_env`: NCCL on GPUs, gloo on CPUs) and then

* gets the same batch of every step from the same stream and keeps its share of it
  (:func:`shard`: rows ``rank * B/N .. (rank + 1) * B/N`` of the params file's global batch B),
* draws per-sample noise for the whole global batch and keeps its rows (:func:`randn_like`,
  :func:`rand`), so N processes draw exactly what one process draws at every step,
* averages its gradients with the other processes' before every optimizer step
  (:func:`average_gradients`, called by :meth:`invariscope.precision.Precision.update`): the
  all-reduce of :class:`torch.nn.parallel.DistributedDataParallel`, done after the backward
  instead of overlapped with it, because the stages call methods other than ``forward`` (the
  cINN's NLL, the VAE's decoder) and take the WGAN-GP's double backward, neither of which DDP's
  reducer supports,
* leaves checkpoints and validation to rank 0 (:class:`World.is_main`).

With mean-reduced losses the averaged gradient is the gradient of the global batch, so the
parameters after k steps equal one process's to float tolerance (``tests/test_distributed.py``).
BatchNorm (the global VAE, the embedding's ResNet) normalizes per process unless converted to
``SyncBatchNorm``, which :func:`sync_batchnorm` does on CUDA (PyTorch has no CPU SyncBatchNorm).
One process (no torchrun) is the default; every function here is then the identity.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "world", "init_from_env", "shard", "randn_like", "rand", "gather",
           "mean_over_processes", "average_gradients", "mean_logs", "broadcast_float", "barrier",
           "main_first", "sync_batchnorm"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and validates."""
        return self.rank == 0


def world() -> World:
    """The process group this process belongs to (``World()`` when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1) and
    return it with this process's device (``cuda:<LOCAL_RANK>`` on GPUs). Without torchrun:
    ``(World(), device)``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not (dist.is_available() and dist.is_initialized()):
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return world(), device


def _rows(n_local: int, w: World) -> slice:
    return slice(w.rank * n_local, (w.rank + 1) * n_local)


def shard(batch: Any, w: World | None = None) -> Any:
    """This process's rows of a global batch (tensors in tuples, lists and dicts, recursively;
    other values unchanged). Raises ValueError when the batch does not split evenly."""
    w = w or world()
    if w.size == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        if len(batch) % w.size:
            raise ValueError(f"a batch of {len(batch)} does not split over {w.size} processes: "
                             "make the params file's batch size a multiple of the process count")
        return batch[_rows(len(batch) // w.size, w)]
    if isinstance(batch, Mapping):
        return {k: shard(v, w) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard(v, w) for v in batch)
    return batch


def randn_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(t)`` for this process's rows of a global batch: the noise of every
    row of the global batch is drawn (from the global RNG), this process keeps its rows. Half
    precision ``t`` (under autocast) gets float32 noise: the same draws as a float32 run."""
    w = world()
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    if w.size == 1:
        return torch.randn_like(t, dtype=dtype)
    full = torch.randn((len(t) * w.size, *t.shape[1:]), dtype=dtype, device=t.device)
    return full[_rows(len(t), w)]


def rand(n: int, *shape: int, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.rand(n, *shape)`` for this process's ``n`` rows of a global batch (see
    :func:`randn_like`)."""
    w = world()
    if w.size == 1:
        return torch.rand(n, *shape, dtype=dtype, device=device)
    return torch.rand(n * w.size, *shape, dtype=dtype, device=device)[_rows(n, w)]


def gather(t: torch.Tensor) -> torch.Tensor:
    """The global batch of ``t`` (every process's rows, in rank order; no gradient)."""
    w = world()
    if w.size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(w.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the processes (no gradient): e.g. a per-process batch mean made the
    global batch's mean."""
    w = world()
    if w.size == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / w.size


def average_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Replace every gradient by its mean over the processes (one all-reduce of the flattened
    gradients). No-op for one process."""
    w = world()
    if w.size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_logs(logs: Mapping[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """A step's logged losses averaged over the processes (for mean-reduced losses: the global
    batch's value; a NaN on one process reaches all)."""
    w = world()
    if w.size == 1 or not logs:
        return dict(logs)
    t = torch.tensor([float(v) for v in logs.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(logs, (t / w.size).tolist()))


def broadcast_float(value: float | None, device: torch.device | str = "cpu") -> float | None:
    """Rank 0's value on every process (None stays None on every process)."""
    w = world()
    if w.size == 1:
        return value
    t = torch.tensor([float("nan") if value is None else float(value), float(value is None)],
                     dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return None if t[1].item() else float(t[0].item())


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if world().size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (e.g. sampling into a cache), the other processes after it
    (reading that cache); yields whether this process is rank 0."""
    w = world()
    if not w.is_main:
        barrier()
    yield w.is_main
    if w.is_main:
        barrier()


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with its BatchNorm layers synchronized across the processes (CUDA only; on the
    CPU, or for one process, unchanged)."""
    if world().size > 1 and any(p.is_cuda for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module
