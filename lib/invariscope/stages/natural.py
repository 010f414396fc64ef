"""Natural (on-manifold) invariances (talk 003): a conditional generator trained per denoiser.

The optimization of :mod:`invariscope.stages.optimized` finds inputs off the manifold of low-dose
images, and needs a new optimization for every new invariance. The talk's answer: train a
generator x_inv = G(x, z) (:class:`~invariscope.models.natural.NaturalGenerator`) against

    MSE(f(x), f(x_inv)) − α · min(MSE(x, x_inv), bound) − λ_adv · C(x_inv)

together with a Wasserstein critic C (:class:`~invariscope.models.natural.PatchCritic`, gradient
penalty) that tells low-dose patches from perturbed ones, so the perturbations stay natural. Once
trained, new invariances of any crop cost one forward pass. Training goes through
:func:`invariscope.stages.training.train` (resume, atomic checkpoints, best.pt by the validation
objective without the critic term, lower is better).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from invariscope import atomic
from invariscope.config.params import Params, digest
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import CropSpec, Normalizer, fixed_crops
from invariscope.device import module_device
from invariscope.provenance import checkpoint_sha
from invariscope.evaluation.distances import mse
from invariscope.models.natural import NaturalGenerator, PatchCritic
from invariscope.stages.denoiser_training import gradient_penalty
from invariscope.stages.invariances import ARRAY_KEYS, load_invariances, stored_key
from invariscope.stages.optimized import frozen, load_crops
from invariscope.stages.training import BatchStream, checkpoint_dir, load_best, train

__all__ = ["TrainedNatural", "natural_fingerprint", "build_networks", "natural_objective",
           "train_natural", "sample_natural"]

#: Version of the stored sets (part of their key).
NATURAL_FORMAT = 1


@dataclass
class TrainedNatural:
    """What :func:`train_natural` returns (the generator in eval mode, best.pt loaded)."""

    generator: NaturalGenerator
    best_step: int | None
    best_metric: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    identity: str = ""


def natural_fingerprint(params: Params, models: str) -> str:
    """Configuration key of a generator's checkpoints: the ``natural`` section, the seed and the
    denoiser's identity ``models``."""
    if params.natural is None:
        raise ValueError(f"{params.source_file or 'the params file'} has no natural section")
    return "natural-" + digest({"natural": params.natural.model_dump(mode="json"),
                                "seed": params.seed, "models": models})


def build_networks(params: Params) -> tuple[NaturalGenerator, PatchCritic]:
    """Generator and critic with the seeded initial weights of ``natural.seed``."""
    cfg = params.natural
    if cfg is None:
        raise ValueError("no natural section in the params file")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return NaturalGenerator(cfg.width, cfg.noise_channels), PatchCritic(cfg.critic_width)


def natural_objective(f: nn.Module, x: torch.Tensor, y_hat: torch.Tensor, x_inv: torch.Tensor,
                      alpha: float, bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per crop ``(J, d_out, d_in)``: J = MSE(f(x_inv), f(x)) − α · min(MSE(x_inv, x), bound)."""
    d_out = mse(f(x_inv), y_hat)
    d_in = mse(x_inv, x).clamp(max=bound)
    return d_out - alpha * d_in, d_out, d_in


def train_natural(name: str, f: nn.Module, params: Params, dataset: CTDataset, out_dir: str | Path,
                  models: str = "", force: bool = False, progress: bool = True) -> TrainedNatural:
    """Train (or resume, or reuse) the natural-invariance generator of denoiser ``name``
    (checkpoints in ``out_dir/<name>/``); ``models``: the denoiser's identity (part of the
    fingerprint: a retrained denoiser retrains its generator). ``f`` stays frozen."""
    cfg = params.natural
    if cfg is None:
        raise ValueError(f"{params.source_file or 'the params file'} has no natural section")
    t0 = time.time()
    dev = module_device(f)
    gen, critic = build_networks(params)
    gen, critic = gen.to(dev), critic.to(dev)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(cfg.beta1, cfg.beta2))
    fp = natural_fingerprint(params, models)
    ckpt_dir = checkpoint_dir(out_dir, name, force)
    stream = BatchStream(dataset, cfg.patch_size, cfg.batch_size, seed=params.seed + cfg.seed,
                         num_workers=params.loader.num_workers)
    val_x, _ = load_crops(dataset, fixed_crops(dataset, "val", cfg.patch_size, cfg.n_val_crops,
                                               cfg.seed), cfg.patch_size, split="val")
    val_x = val_x.to(dev)
    val_z = gen.noise(val_x, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        val_y = f(val_x)

    def validate() -> float:
        j, _, _ = natural_objective(f, val_x, val_y, gen(val_x, val_z), cfg.alpha, cfg.bound)
        return float(j.mean())

    def step_fn(step: int, batch: Any) -> dict[str, float]:
        x = batch[0]
        with torch.no_grad():
            y_hat = f(x)
        fake = gen(x, gen.noise(x))
        critic.requires_grad_(True)
        for _ in range(cfg.critic_steps):
            wdist = critic(x).mean() - critic(fake.detach()).mean()
            gp = gradient_penalty(critic, x, fake.detach())
            loss_d = -wdist + cfg.gp_weight * gp
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        critic.requires_grad_(False)
        j, d_out, d_in = natural_objective(f, x, y_hat, fake, cfg.alpha, cfg.bound)
        adv = -critic(fake).mean()
        loss_g = j.mean() + cfg.lambda_adv * adv
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        critic.requires_grad_(True)
        return {"objective": j.detach().mean().item(), "d_out": d_out.detach().mean().item(),
                "d_in": d_in.detach().mean().item(), "wdist": wdist.item(), "gp": gp.item()}

    with frozen(f):
        result = train(step_fn, stream.iterate_from, cfg.iterations, ckpt_dir,
                       {"generator": gen, "critic": critic}, {"generator": opt_g, "critic": opt_d},
                       fp, seed=params.seed + cfg.seed, checkpoint_every=cfg.checkpoint_every,
                       validate_fn=validate, validate_every=cfg.validate_every,
                       higher_is_better=False, desc=f"natural {name}", progress=progress, device=dev)
    best_step = load_best(ckpt_dir, {"generator": gen}, fp)
    gen.eval()
    return TrainedNatural(gen, result.best_step or best_step, result.best_metric, result.history,
                          time.time() - t0, f"{fp}:{checkpoint_sha(ckpt_dir / 'best.pt')}")


@torch.no_grad()
def sample_natural(path: str | Path, gen: NaturalGenerator, f: nn.Module, dataset: CTDataset,
                   crops: Sequence[CropSpec], size: int, n_samples: int, seed: int,
                   models: str = "", force: bool = False) -> dict[str, np.ndarray]:
    """``n_samples`` natural invariances G(x, z) per test crop with f of each, into ``path`` (.npz,
    reused when its key matches: crops, counts, seed and ``models``, the generator's identity).
    Crop i, sample s draws z from its own generator seeded with (seed, i, s). Arrays as
    :mod:`invariscope.stages.invariances` (HU; ``x_tilde``/``f_x_tilde`` (N, n_samples, c, c))."""
    path = Path(path)
    crops = [tuple(int(v) for v in s) for s in crops]
    key = digest({"crops": [list(s) for s in crops], "n": n_samples, "seed": seed, "size": size,
                  "models": models, "format": NATURAL_FORMAT}, length=16)
    if force:
        path.unlink(missing_ok=True)
    if stored_key(path) == key:
        return load_invariances(path)
    norm = Normalizer.of(dataset)
    dev = module_device(f)
    hu = lambda t: norm.to_hu(t[:, 0].cpu()).numpy()  # noqa: E731
    x, y = load_crops(dataset, crops, size)
    x = x.to(dev)
    y_hat = f(x)
    xt, ft = [], []
    for i in range(len(crops)):
        xi = x[i:i + 1].expand(n_samples, -1, -1, -1)
        z = torch.cat([gen.noise(x[i:i + 1], torch.Generator().manual_seed(
            int(digest([seed, i, s], length=15), 16))) for s in range(n_samples)])
        inv = gen(xi, z)
        xt.append(hu(inv).astype(np.float16))
        ft.append(hu(f(inv)).astype(np.float16))
    out: dict[str, np.ndarray] = {
        "x": hu(x).astype(np.float32), "y": hu(y).astype(np.float32),
        "y_hat": hu(y_hat).astype(np.float32), "x_tilde": np.stack(xt), "f_x_tilde": np.stack(ft),
        "crops": np.asarray(crops, dtype=np.int64).reshape(len(crops), 3),
        "mode": np.asarray("natural"), "key": np.asarray(key), "n_invariances": np.asarray(n_samples)}
    assert set(ARRAY_KEYS) <= set(out)
    atomic.save_npz(path, **out)
    return out

