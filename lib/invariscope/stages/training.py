"""The training loop every stage shares: progress, checkpoint/resume, NaN guard, best model.

A stage supplies a ``step_fn(step, batch) -> dict of losses`` (it owns its models and
optimizers) and an optional ``validate_fn() -> float``. :func:`train` then

* resumes from ``<ckpt_dir>/last.pt`` when it exists (refusing a checkpoint written by another
  configuration, with a message naming the file),
* reseeds torch at every step from (seed, step), and draws the batches of step ``s`` from a
  stream that depends only on (seed, s), so a resumed run continues the same random sequence,
* writes ``last.pt`` every ``checkpoint_every`` steps (atomically) and ``best.pt`` whenever
  the validation metric improves; ``last.pt`` also keeps the best weights, so a deleted
  ``best.pt`` is restored from it (the workflow deletes a job's outputs before rerunning it),
* stops with :class:`NonFiniteLossError` when a loss turns NaN/inf, keeping the last good
  checkpoint untouched.

Under ``torchrun`` (:mod:`invariscope.distributed`) every process draws the same global batch,
keeps its rows, and logs the processes' mean losses; rank 0 validates (its score is broadcast)
and writes the checkpoints, so a run resumes on any number of processes.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from invariscope import atomic, distributed
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import CropDataset, PatientWeightedCropSampler
from invariscope.device import module_device, to_device
from invariscope.provenance import best_checkpoint

CHECKPOINT_VERSION = 1


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stopped, the last good checkpoint is kept."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint was written by a different configuration than the one asked for."""


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    steps: int
    best_metric: float | None
    best_step: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


class BatchStream:
    """Batches of patient-weighted random crops, addressable by step (resume-exact).

    Step ``s`` belongs to epoch ``s // steps_per_epoch``; each epoch's crops come from
    :class:`~invariscope.data.loader.PatientWeightedCropSampler` with that epoch's seed.
    """

    def __init__(self, dataset: CTDataset, crop_size: int, batch_size: int, seed: int,
                 split: str = "train", steps_per_epoch: int = 100, num_workers: int = 0) -> None:
        self.sampler = PatientWeightedCropSampler(dataset, split, crop_size,
                                                  steps_per_epoch * batch_size, seed=seed)
        self.crops = CropDataset(dataset, split, crop_size)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.num_workers = num_workers

    def iterate_from(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of steps ``step, step+1, ...`` forever."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            specs = self.sampler.draw(self.steps_per_epoch * self.batch_size, epoch=epoch)
            batches = [specs[i * self.batch_size:(i + 1) * self.batch_size]
                       for i in range(offset, self.steps_per_epoch)]
            yield from DataLoader(self.crops, batch_sampler=batches, num_workers=self.num_workers)
            epoch, offset = epoch + 1, 0


def _state(objs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.state_dict() for k, v in objs.items()}


def save_checkpoint(path: Path, modules: Mapping[str, nn.Module], optimizers: Mapping[str, Any],
                    fingerprint: str, **extra: Any) -> None:
    """Write a checkpoint atomically (modules, optimizers, fingerprint and extra fields)."""
    atomic.torch_save(path, {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
                             "modules": _state(modules), "optimizers": _state(optimizers), **extra})


def load_checkpoint(path: Path, modules: Mapping[str, nn.Module], optimizers: Mapping[str, Any],
                    fingerprint: str | None) -> dict[str, Any]:
    """Load a checkpoint into ``modules``/``optimizers``; check its configuration fingerprint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated/corrupt file
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {exc}. Delete it to start "
                                      "over.") from exc
    if fingerprint is not None and ckpt.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by another configuration (fingerprint "
            f"{ckpt.get('fingerprint')!r}, this run {fingerprint!r}). Its parameters differ from the "
            "current params file: retrain from scratch with ./run_all.sh --force and --only / --denoisers "
            "for that stage (the notebook's force=True), or move the file away."
        )
    for name, module in modules.items():
        if name not in ckpt["modules"]:
            raise CheckpointMismatchError(f"checkpoint {path} has no module {name!r}")
        module.load_state_dict(ckpt["modules"][name])
    for name, opt in optimizers.items():
        if name in ckpt.get("optimizers", {}):
            opt.load_state_dict(ckpt["optimizers"][name])
    return ckpt


def train(
    step_fn: Callable[[int, Any], Mapping[str, float]],
    batches: Callable[[int], Iterator[Any]],
    n_steps: int,
    ckpt_dir: str | Path,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, Any],
    fingerprint: str,
    seed: int,
    checkpoint_every: int = 100,
    validate_fn: Callable[[], float] | None = None,
    validate_every: int | None = None,
    higher_is_better: bool = True,
    desc: str = "train",
    progress: bool = True,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Run (or resume) ``n_steps`` training steps; see the module docstring.

    ``device``: where every tensor of a batch is moved before ``step_fn`` sees it (None: left
    where the stream made it); the modules must already live there.
    """
    ckpt_dir = Path(ckpt_dir)
    last, best = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    start, best_metric, best_step, history, best_state = 0, None, None, [], None
    w = distributed.world()
    collective_device = module_device(next(iter(modules.values()), None))  # processes' collectives
    if last.is_file():
        ckpt = load_checkpoint(last, modules, optimizers, fingerprint)
        start, best_metric, best_step = ckpt["step"], ckpt.get("best_metric"), ckpt.get("best_step")
        history, best_state = ckpt.get("history", []), ckpt.get("best_modules")
        if best_state is not None and not best.is_file() and w.is_main:  # deleted (by hand, or by Snakemake
            # before it reruns an interrupted job): last.pt keeps a copy of the best weights
            atomic.torch_save(best, {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
                                     "modules": best_state, "optimizers": {}, "step": best_step,
                                     "metric": best_metric})
        if start > n_steps:  # a finished longer run cannot be shortened silently
            raise CheckpointMismatchError(
                f"checkpoint {last} holds {start} training steps ({desc}), more than the {n_steps} "
                "iterations asked for: rerun with --force (run_all.sh) / force=True to retrain, "
                "or raise the iterations in the params file."
            )
    validate_every = validate_every or checkpoint_every
    saved_step = start if last.is_file() else None
    t0 = time.time()

    def checkpoint(step: int) -> None:
        nonlocal saved_step
        if w.is_main:
            save_checkpoint(last, modules, optimizers, fingerprint, step=step,
                            best_metric=best_metric, best_step=best_step, history=history,
                            best_modules=best_state)
        saved_step = step

    if start >= n_steps:
        distributed.barrier()
        return TrainResult(start, best_metric, best_step, history, resumed_from=start)
    for m in modules.values():
        m.train()
    stream = batches(start)
    bar = tqdm(range(start, n_steps), initial=start, total=n_steps, desc=desc,
               disable=not progress or not w.is_main, mininterval=2.0)
    running: dict[str, float] = {}
    for step in bar:
        batch = distributed.shard(next(stream), w)  # before seeding: loaders may draw from the RNG
        if device is not None:
            batch = to_device(batch, torch.device(device))
        torch.manual_seed(seed * 1_000_003 + step)
        logs = distributed.mean_logs(step_fn(step, batch), collective_device)
        bad = [k for k, v in logs.items() if not math.isfinite(float(v))]
        if bad:
            where = f"{last} (step {saved_step})" if saved_step is not None else "none written yet"
            raise NonFiniteLossError(
                f"{desc}: loss {', '.join(bad)} became {logs[bad[0]]} at step {step}. Training "
                f"stopped; the last good checkpoint is kept: {where}. Lower the learning rate or "
                "check the input data, then rerun to resume from it."
            )
        for k, v in logs.items():
            running[k] = 0.9 * running.get(k, float(v)) + 0.1 * float(v)
        done = step + 1
        if done % 10 == 0 or done == n_steps:
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(running.items())[:4]})
        if validate_fn is not None and (done % validate_every == 0 or done == n_steps):
            for m in modules.values():
                m.eval()
            with torch.no_grad():
                metric = float(validate_fn()) if w.is_main else None
            metric = distributed.broadcast_float(metric, collective_device)
            for m in modules.values():
                m.train()
            if best_metric is None or (metric > best_metric if higher_is_better else metric < best_metric):
                best_metric, best_step = metric, done
                best_state = copy.deepcopy(_state(modules))
                if w.is_main:
                    save_checkpoint(best, modules, {}, fingerprint, step=done, metric=metric)
            history.append({"step": done, "val": metric, **running})
        elif done % checkpoint_every == 0:
            history.append({"step": done, **running})
        if done % checkpoint_every == 0 or done == n_steps:
            checkpoint(done)
    for m in modules.values():
        m.eval()
    distributed.barrier()  # every checkpoint is written before any process reads it
    return TrainResult(n_steps, best_metric, best_step, history, resumed_from=start,
                       seconds=time.time() - t0)


def pool_batches(seed: int, n: int, batch_size: int) -> Callable[[int], Iterator[torch.Tensor]]:
    """Batches of indices into a fixed pool of ``n`` items for :func:`train`: the batch of step
    ``s`` depends only on (seed, s), so a resumed run draws what an uninterrupted one would."""

    def batches(start: int) -> Iterator[torch.Tensor]:
        for step in itertools.count(start):
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            yield torch.randperm(n, generator=g)[:batch_size]

    return batches


def cosine_lr(step: int, total: int, lr: float, final_fraction: float) -> float:
    """Cosine decay from ``lr`` at step 0 to ``final_fraction * lr`` at step ``total - 1``."""
    frac = min(step / max(total - 1, 1), 1.0)
    return lr * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def clear_checkpoints(ckpt_dir: str | Path, *extra: str) -> None:
    """Delete a stage's ``last.pt`` and ``best.pt`` (and the ``extra`` cache files) in ``ckpt_dir``:
    what ``force=True`` does before retraining from scratch."""
    for f in ("last.pt", "best.pt", *extra):
        (Path(ckpt_dir) / f).unlink(missing_ok=True)


def checkpoint_dir(out_dir: str | Path, name: str, force: bool = False,
                   extra: tuple[str, ...] = ()) -> Path:
    """``out_dir/name``, a stage's checkpoint folder; ``force=True`` clears it first
    (:func:`clear_checkpoints`, with the ``extra`` cache files)."""
    path = Path(out_dir) / name
    if force:
        if distributed.world().is_main:  # one process clears, before any writes
            clear_checkpoints(path, *extra)
        distributed.barrier()
    return path


def load_best(ckpt_dir: str | Path, modules: Mapping[str, nn.Module], fingerprint: str | None) -> int:
    """Load ``best.pt`` (falling back to ``last.pt``) into ``modules``; returns its step."""
    path = best_checkpoint(ckpt_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train this stage first")
    return int(load_checkpoint(path, modules, {}, fingerprint)["step"])
