"""Training and evaluation of the conditional VAEs (one per denoiser) and the unconditional VAE.

Paper Sec. 2.3.1 / Eq. 4 and the authors' trainer: per step

1. draw a batch of low-dose crops x (patient-weighted, :class:`~invariscope.stages.training.BatchStream`)
   and, for a cVAE, compute ŷ = f(x) with the frozen, eval-mode denoiser (no gradient);
2. encode and decode once: x_rec = D(z, ŷ) with z ~ q(z | x, ŷ) (reparameterised);
3. ``critic_steps`` WGAN-GP critic updates on [x, ŷ] (real) against [x_rec, ŷ] (fresh fakes of the
   current VAE, detached);
4. one encoder/decoder update with ``w_l1 * L1 + w_kl * KL + w_perc * VGG16 + w_adv * (-critic)``
   (:func:`invariscope.models.vae.vae_loss_terms`) while the critic is frozen.

Steps 3 and 4 share the forward pass of step 2 (the VAE does not change in between, so the
critic sees exactly the fakes a separate forward pass would give for the same z; with
``critic_steps > 1`` every critic update uses these same fakes).
``perceptual_every = k > 1`` adds the perceptual term on every k-th step only (CPU profiles);
``free_bits > 0`` replaces the KL by ``sum_d max(free_bits, mean_batch KL_d)`` (not in the paper);
``mode_seeking > 0`` (cVAEs only; not in the paper) also decodes a prior draw z' ~ N(0, I) with
the same ŷ and adds ``mode_seeking * mean(|μ - z'|₁ / |x_rec - D(z', ŷ)|₁)``
(:func:`invariscope.models.vae.mode_seeking_term`) and ``w_adv * (-critic(D(z', ŷ)))``.

Validation: mean |D(mu, ŷ) - x| in HU on ``n_val_crops`` fixed validation crops, reconstructed
from the posterior mean (lower is better) -> ``best.pt``. Checkpoints:
``<out_dir>/<denoiser | "unconditional">/{last,best}.pt`` via :func:`invariscope.stages.training.train`
(resume, NaN guard). The configuration fingerprint covers the ``vae`` section, the seed, the data
set, the denoiser's name and the identity of its checkpoint (its weights' hash), so a VAE is never
silently reused with another denoiser.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from invariscope import atomic
from invariscope import device as devices
from invariscope import distributed
from invariscope.config.params import Params
from invariscope.config.paths import resolve_setting
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import CropDataset, CropSpec, Normalizer, fixed_crops
from invariscope.evaluation.metrics import ssim_lung
from invariscope.models.spatial import SpatialVAE, elbo_terms
from invariscope.models.vae import (ConditionalVAE, Critic, VAELossWeights, active_dimensions,
                                    build_perceptual_loss, critic_loss_terms, kl_divergence,
                                    mode_seeking_term, vae_loss_terms)
from invariscope.names import UNCONDITIONAL, UNCONDITIONAL_SPATIAL, is_unconditional, vae_name
from invariscope.precision import Precision, full
from invariscope.provenance import pool_key, stage_dir, vae_fingerprint
from invariscope.stages.denoiser_training import load_denoiser
from invariscope.stages.training import (BatchStream, checkpoint_dir, cosine_lr, load_best, pool_batches,
                                         train)

__all__ = [
    "is_spatial",
    "extra_vaes",
    "training_pool",
    "REPORT_COLUMNS",
    "TrainedVAE",
    "train_vae",
    "load_vae",
    "build_vae",
    "get_denoiser",
    "resolve_weights",
    "free_bits_kl",
    "reconstruct",
    "reconstruct_hu",
    "reconstruction_report",
    "reconstruction_table",
]

#: Columns of ``figures/<profile>/vae_reconstruction.csv``.
REPORT_COLUMNS = ("vae", "mae_hu", "ssim", "kl_nats", "active_dims", "latent_dims")


@dataclass
class TrainedVAE:
    """A VAE after :func:`train_vae` (``model`` holds the best checkpoint, eval mode).

    ``denoiser``: the frozen denoiser that makes ŷ (None for the unconditional VAE).
    """

    name: str
    model: ConditionalVAE
    denoiser: nn.Module | None
    best_step: int | None
    best_val_mae_hu: float | None
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    vgg_pretrained: bool = False
    encoder_pretrained: bool = False


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
def is_spatial(name: str | None, params: Params) -> bool:
    """Whether the VAE ``name`` has a spatial latent: every cVAE with ``vae.latent: spatial`` and the
    spatial unconditional VAE; the (global) unconditional VAE never."""
    name = vae_name(name, params)
    return name == UNCONDITIONAL_SPATIAL or (name != UNCONDITIONAL and params.vae.latent == "spatial")


def extra_vaes(params: Params) -> tuple[str, ...]:
    """The unconditional VAEs a profile trains: the global one (s_VAE, Figure 4) and, with
    ``vae.latent: spatial``, the spatial one (Figure 4)."""
    return (UNCONDITIONAL, UNCONDITIONAL_SPATIAL) if params.vae.latent == "spatial" else (UNCONDITIONAL,)


def resolve_weights(setting: str | None, source_file: str | None = None) -> Path | None:
    """A weights-file setting of the params file ``source_file`` as a path
    (:data:`~invariscope.config.paths.RELATIVE_RULE`); None stays None.

    Existence is checked where the file is loaded, with a message on how to obtain it.
    """
    return None if setting is None else resolve_setting(setting, source_file)


def get_denoiser(denoiser: str | None, params: Params, dataset: CTDataset,
                 denoiser_dir: str | Path | None = None) -> nn.Module | None:
    """The frozen, eval-mode denoiser that conditions a cVAE (None for the unconditional VAE), on
    the profile's device."""
    name = vae_name(denoiser, params)
    if is_unconditional(name):
        return None
    model = load_denoiser(name, params, dataset, stage_dir(params, "denoisers", denoiser_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_vae(conditional: bool, params: Params, load_pretrained: bool = True,
              spatial: bool = False) -> ConditionalVAE | SpatialVAE:
    """The (c)VAE of the profile, initialised from the seed (and ImageNet weights if set);
    ``spatial``: the spatial-latent design of ``vae.spatial``."""
    cfg = params.vae
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        if spatial:
            return SpatialVAE(cfg.spatial_config(conditional))
        model = ConditionalVAE(cfg.config(conditional))
    if load_pretrained and cfg.imagenet_weights is not None:
        model.encoder.load_imagenet_weights(resolve_weights(cfg.imagenet_weights, params.source_file),
                                            params_key="vae.imagenet_weights")
    return model


def _build_critic(conditional: bool, params: Params) -> Critic:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed + 1)
        return Critic.from_config(params.vae.config(conditional))


# --------------------------------------------------------------------------------------
# Losses and inference
# --------------------------------------------------------------------------------------
def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL with a floor per latent dimension: ``sum_d max(free_bits, mean_b KL_bd)`` (nats), in
    float32; the batch mean covers the global batch under data-parallel training."""
    mu, logvar = full(mu), full(logvar)
    per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean(dim=0)
    if distributed.world().size == 1:
        return torch.clamp(per_dim, min=free_bits).sum()
    # the floor applies to the global batch's mean; each process's gradient flows through its
    # own rows where that mean is above the floor (averaged over the processes: the gradient
    # of one process's loss on the global batch)
    mean = distributed.mean_over_processes(per_dim)
    active = (mean > free_bits).to(per_dim.dtype)
    return torch.clamp(mean, min=free_bits).sum() + (active * (per_dim - per_dim.detach())).sum()


@torch.no_grad()
def _condition(denoiser: nn.Module | None, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor | None:
    """ŷ = denoiser(x) in batches, on x's device."""
    if denoiser is None:
        return None
    return torch.cat([denoiser(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruct(vae: ConditionalVAE, denoiser: nn.Module | None, x: torch.Tensor,
                batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_rec, mu, logvar)`` of normalized crops ``(N, 1, c, c)``, decoded from the posterior mean.

    ŷ = denoiser(x) for a cVAE. Runs the VAE in eval mode (restoring its mode afterwards), batch
    by batch on the VAE's device; the results are on the CPU.
    """
    was_training = vae.training
    vae.eval()
    dev = devices.module_device(vae)
    try:
        recs, mus, lvs = [], [], []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            rec, mu, lv = vae(xb, _condition(denoiser, xb), sample=False)
            recs.append(rec.cpu())
            mus.append(mu.cpu())
            lvs.append(lv.cpu())
    finally:
        vae.train(was_training)
    return torch.cat(recs), torch.cat(mus), torch.cat(lvs)


def reconstruct_hu(vae: ConditionalVAE, denoiser: nn.Module | None, low_hu: np.ndarray,
                   normalizer: Normalizer) -> np.ndarray:
    """Reconstruct low-dose HU crops ``(N, c, c)`` (or one ``(c, c)``); float32 HU out."""
    arr = np.asarray(low_hu, dtype=np.float32)
    single = arr.ndim == 2
    x = torch.from_numpy(np.asarray(normalizer(arr[None] if single else arr), dtype=np.float32))
    rec = normalizer.to_hu(reconstruct(vae, denoiser, x[:, None])[0][:, 0]).numpy()
    return rec[0] if single else rec


def _crops_tensor(dataset: CTDataset, split: str, crop_size: int, n: int,
                  seed: int) -> tuple[torch.Tensor, list[CropSpec]]:
    specs = fixed_crops(dataset, split, crop_size, n, seed)
    crops = CropDataset(dataset, split, crop_size, specs)
    return torch.stack([crops[i][0] for i in range(len(specs))]), specs


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _make_step(vae: ConditionalVAE, critic: Critic, denoiser: nn.Module | None, params: Params,
               perceptual: nn.Module, mp: Precision,
               pool: Mapping[str, torch.Tensor | None] | None = None
               ) -> tuple[Callable[[int, Any], dict[str, float]], dict[str, torch.optim.Optimizer]]:
    """One step of the global (c)VAE: critic (WGAN-GP), then encoder and decoder. ``pool``: x and
    ŷ of fixed crops on the CPU (``vae.pool_crops``; the batch then holds indices into it)."""
    cfg = params.vae
    opt_g = torch.optim.Adam(vae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(cfg.beta1, cfg.beta2))
    w = cfg.weights
    weights = VAELossWeights(l1=w.l1, kl=0.0 if cfg.free_bits > 0 else w.kl,
                             perceptual=w.perceptual, adversarial=w.adversarial)

    def step_fn(step: int, batch: Any) -> dict[str, float]:
        if pool is not None:
            rows, dev = batch.cpu(), devices.module_device(vae)
            x, y_hat = pool["x"][rows].to(dev), pool["y_hat"][rows].to(dev)
        else:
            x = batch[0]
            with mp.autocast():
                y_hat = _condition(denoiser, x)
            y_hat = None if y_hat is None else y_hat.float()
        with mp.autocast():
            x_rec, mu, logvar = vae(x, y_hat)
            x_rec = x_rec.float()
        # critic: WGAN-GP on fresh fakes of the current VAE
        _requires_grad(critic, True)
        for _ in range(cfg.critic_steps):
            with mp.autocast():
                d = critic_loss_terms(critic, x, x_rec.detach(), y_hat, gp_weight=cfg.gp_weight)
            mp.update(d["total"], opt_d)
        # encoder + decoder, critic frozen
        _requires_grad(critic, False)
        use_perc = w.perceptual > 0 and step % cfg.perceptual_every == 0
        with mp.autocast():
            g = vae_loss_terms(x, x_rec, mu, logvar, y_hat=y_hat,
                               critic=critic if w.adversarial > 0 else None,
                               perceptual=perceptual if use_perc else None, weights=weights)
            total = g["total"]
            if cfg.free_bits > 0:
                total = total + w.kl * free_bits_kl(mu, logvar, cfg.free_bits)
            ms = None
            if cfg.mode_seeking > 0 and y_hat is not None:  # a prior draw, decoded with the same ŷ
                z_prior = distributed.randn_like(mu)
                x_prior = vae.decode(z_prior, y_hat).float()
                ms = mode_seeking_term(x_rec, x_prior, mu.detach(), z_prior)
                total = total + cfg.mode_seeking * ms
                if w.adversarial > 0:
                    total = total - w.adversarial * critic(x_prior, y_hat).float().mean()
        mp.update(total, opt_g)
        _requires_grad(critic, True)
        logs = {"loss": total.item(), "l1": g["l1"].item() / weights.reference_pixels,
                "kl": g["kl"].item(), "adv": g["adversarial"].item(), "d_w": d["wasserstein"].item(),
                "gp": d["gp"].item()}
        if use_perc:
            logs["perc"] = g["perceptual"].item()
        if ms is not None:
            logs["ms"] = ms.item()
        return logs

    return step_fn, mp.register({"vae": opt_g, "critic": opt_d})


def training_pool(name: str | None, params: Params, dataset: CTDataset, denoiser: nn.Module | None,
                  n: int, pool_dir: str | Path, progress: bool = True,
                  denoiser_dir: str | Path | None = None) -> dict[str, torch.Tensor | None]:
    """``{"x", "y_hat"}`` of ``n`` fixed patient-weighted training crops (seed + 1), normalized, on
    the CPU; ``y_hat`` = f(x) (None for an unconditional VAE).

    ŷ is computed once per denoiser checkpoint and cached in ``<pool_dir>/<name>_<n>_<key>.pt``
    (the stages use ``runs/<profile>/pools``), keyed by the denoiser's identity, the data set and
    the crops: the spatial cVAE and the cINN of a denoiser train on the same pool, and f(x) of
    the RED-CNN family costs more than a training step on a CPU.
    """
    name = vae_name(name, params)
    size = params.vae.crop_size
    specs = fixed_crops(dataset, "train", size, n, params.seed + 1)
    crops = CropDataset(dataset, "train", size, specs)
    x = torch.stack([crops[i][0] for i in range(len(specs))])
    if denoiser is None:
        return {"x": x, "y_hat": None}
    key = pool_key(name, params, dataset, specs, denoiser_dir)
    path = Path(pool_dir) / f"{name}_{n}_{key[:8]}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return {"x": x, "y_hat": cached["y_hat"]}
        except Exception:  # noqa: BLE001 - unreadable: recompute
            pass
    dev = devices.module_device(denoiser)
    parts = []
    with torch.no_grad():
        for i in tqdm(range(0, n, 64), desc=f"ŷ of the {name} pool", disable=not progress,
                      mininterval=2.0):
            parts.append(denoiser(x[i:i + 64].to(dev)).cpu())
    y_hat = torch.cat(parts)
    atomic.torch_save(path, {"key": key, "y_hat": y_hat})
    return {"x": x, "y_hat": y_hat}


def _make_spatial_step(vae: SpatialVAE, denoiser: nn.Module | None, params: Params,
                       pool: Mapping[str, torch.Tensor | None] | None, mp: Precision
                       ) -> tuple[Callable[[int, Any], dict[str, float]], dict[str, torch.optim.Optimizer]]:
    """One ELBO step of the spatial (c)VAE (Gaussian decoder of fixed SD, analytic KL)."""
    sp = params.vae.spatial
    opt = torch.optim.Adam(vae.parameters(), lr=sp.lr)

    def step_fn(step: int, batch: Any) -> dict[str, float]:
        if pool is not None:  # batch: indices into the pool
            x = pool["x"][batch]
            y_hat = None if pool["y_hat"] is None else pool["y_hat"][batch]
        else:
            x = batch[0]
            with mp.autocast():
                y_hat = _condition(denoiser, x)
            y_hat = None if y_hat is None else y_hat.float()
        if sp.hflip:  # f is (nearly) flip-equivariant: flip x and ŷ together
            flip = (distributed.rand(len(x)) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(flip, x.flip(-1), x)
            if y_hat is not None:
                y_hat = torch.where(flip, y_hat.flip(-1), y_hat)
        with mp.autocast():
            x_rec, mu, logvar = vae(x, y_hat)
        t = elbo_terms(x, x_rec, mu, logvar, sp.decoder_sd)  # float32
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, sp.iterations, sp.lr, sp.lr_final)
        mp.update(t["total"], opt, clip=sp.grad_clip)
        return {"loss": t["total"].item(), "rec": t["rec"].item(), "kl": t["kl"].item()}

    return step_fn, mp.register({"vae": opt})


def train_vae(denoiser: str | None, params: Params, dataset: CTDataset, out_dir: str | Path,
              force: bool = False, progress: bool = True,
              denoiser_dir: str | Path | None = None) -> TrainedVAE:
    """Train (or resume, or reuse) the cVAE of ``denoiser`` (None / "unconditional": the VAE).

    Checkpoints in ``out_dir/<denoiser | "unconditional">/``; the denoiser's checkpoint is read from
    ``denoiser_dir/<denoiser>/`` (default ``runs/<profile>/denoisers``; ``gaussri`` needs none).
    ``force=True`` deletes the VAE's ``last.pt``/``best.pt`` first. A checkpoint of another
    configuration (vae params, seed, data set, denoiser checkpoint) raises
    :class:`~invariscope.stages.training.CheckpointMismatchError`; a NaN loss raises
    :class:`~invariscope.stages.training.NonFiniteLossError` keeping the last good checkpoint. Returns the
    best checkpoint (lowest validation MAE in HU) in eval mode.
    """
    name = vae_name(denoiser, params)
    cfg = params.vae
    ckpt_dir = checkpoint_dir(out_dir, name, force)
    t0 = time.time()
    dev = devices.of(params)
    den = get_denoiser(name, params, dataset, denoiser_dir)
    fp = vae_fingerprint(name, params, dataset, denoiser_dir)
    conditional = den is not None
    spatial = is_spatial(name, params)
    vae = distributed.sync_batchnorm(build_vae(conditional, params, spatial=spatial).to(dev))
    mp = Precision(params.precision, dev)
    perceptual = None
    if spatial:
        n_pool = cfg.spatial.pool_size(name)
        pool = None
        if n_pool:
            pool = {k: None if v is None else v.to(dev) for k, v in
                    training_pool(name, params, dataset, den, n_pool, Path(out_dir).parent / "pools",
                                  progress, denoiser_dir).items()}
        step_fn, optimizers = _make_spatial_step(vae, den, params, pool, mp)
        modules: dict[str, nn.Module] = {"vae": vae}
        n_steps, batch_size = cfg.spatial.iterations, cfg.spatial.batch_size
    else:
        critic = distributed.sync_batchnorm(_build_critic(conditional, params).to(dev))
        vgg_path = resolve_weights(cfg.vgg16_weights, params.source_file)
        perceptual = build_perceptual_loss(vgg_path, params_key="vae.vgg16_weights").to(dev)
        n_pool = cfg.pool_crops if conditional else 0  # the unconditional VAE has no f to save
        pool = (training_pool(name, params, dataset, den, n_pool, Path(out_dir).parent / "pools",
                              progress, denoiser_dir) if n_pool else None)
        step_fn, optimizers = _make_step(vae, critic, den, params, perceptual, mp, pool)
        modules = {"vae": vae, "critic": critic}
        n_steps, batch_size = cfg.iterations, cfg.batch_size

    std_hu = Normalizer.of(dataset).std_hu
    x_val, _ = _crops_tensor(dataset, "val", cfg.crop_size, cfg.n_val_crops, params.seed)
    x_val = x_val.to(dev)
    y_val = _condition(den, x_val)

    def validate() -> float:
        was_training = vae.training
        vae.eval()
        errs = []
        for i in range(0, len(x_val), 32):
            xb = x_val[i:i + 32]
            rec, _, _ = vae(xb, None if y_val is None else y_val[i:i + 32], sample=False)
            errs.append((rec - xb).abs().flatten(1).mean(1))
        vae.train(was_training)
        return float(torch.cat(errs).mean()) * std_hu

    if n_pool:
        batches = pool_batches(params.seed, n_pool, batch_size)
    else:
        batches = BatchStream(dataset, cfg.crop_size, batch_size, seed=params.seed,
                              num_workers=params.loader.num_workers).iterate_from
    result = train(step_fn, batches, n_steps, ckpt_dir, modules, optimizers, fp,
                   seed=params.seed, checkpoint_every=cfg.checkpoint_every, validate_fn=validate,
                   validate_every=cfg.validate_every, higher_is_better=False,
                   desc=f"VAE {name}", progress=progress, device=dev)
    best_step = load_best(ckpt_dir, {"vae": vae}, fp)
    vae.eval()
    return TrainedVAE(name, vae, den, result.best_step or best_step, result.best_metric,
                      result.steps, time.time() - t0, result.history,
                      vgg_pretrained=perceptual is not None and bool(perceptual.pretrained),
                      encoder_pretrained=cfg.imagenet_weights is not None)


def load_vae(denoiser: str | None, params: Params, dataset: CTDataset, out_dir: str | Path,
             denoiser_dir: str | Path | None = None) -> ConditionalVAE:
    """The best checkpoint of a trained (c)VAE in eval mode, on the profile's device (see
    :func:`train_vae`).

    Raises :class:`FileNotFoundError` when it was not trained yet and
    :class:`~invariscope.stages.training.CheckpointMismatchError` when its checkpoint belongs to another
    configuration or another denoiser checkpoint.
    """
    name = vae_name(denoiser, params)
    vae = build_vae(not is_unconditional(name), params, load_pretrained=False,
                    spatial=is_spatial(name, params))
    load_best(Path(out_dir) / name, {"vae": vae}, vae_fingerprint(name, params, dataset, denoiser_dir))
    return vae.to(devices.of(params)).eval()


# --------------------------------------------------------------------------------------
# Reconstruction report
# --------------------------------------------------------------------------------------
def reconstruction_report(vae: ConditionalVAE, denoiser_model: nn.Module | None, dataset: CTDataset,
                          params: Params, name: str | None = None) -> dict[str, Any]:
    """How well a VAE reconstructs its low-dose inputs, on ``vae.n_test_crops`` fixed test crops.

    Reconstruction from the posterior mean (ŷ = denoiser(x) for a cVAE). Keys: ``vae`` (``name``,
    default ``"unconditional"`` / the denoiser's class name), ``mae_hu`` (mean |x_rec - x| in HU),
    ``ssim`` (mean lung-window SSIM of x_rec against x, :func:`invariscope.evaluation.metrics.ssim_lung`),
    ``kl_nats`` (mean KL(q(z|x[,ŷ]) || N(0, I)) per image), ``active_dims`` (latent dims whose
    posterior-mean variance over the crops exceeds 0.01) and ``latent_dims``.
    """
    if vae.config.conditional != (denoiser_model is not None):
        raise ValueError("a conditional VAE needs its denoiser, an unconditional one none")
    if name is None:
        name = UNCONDITIONAL if denoiser_model is None else type(denoiser_model).__name__.lower()
    cfg = params.vae
    norm = Normalizer.of(dataset)
    x, _ = _crops_tensor(dataset, "test", vae.config.crop_size, cfg.n_test_crops, params.seed)
    rec, mu, logvar = reconstruct(vae, denoiser_model, x)
    x_hu = norm.to_hu(x[:, 0]).numpy().astype(np.float64)
    rec_hu = norm.to_hu(rec[:, 0]).numpy().astype(np.float64)
    return {
        "vae": name,
        "mae_hu": float(np.abs(rec_hu - x_hu).mean()),
        "ssim": float(np.mean([ssim_lung(r, t) for r, t in zip(rec_hu, x_hu)])),
        "kl_nats": float(kl_divergence(mu, logvar).mean()),
        "active_dims": active_dimensions(mu.flatten(1)),
        "latent_dims": int(vae.config.latent_dim),
    }


def reconstruction_table(reports: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per VAE with :data:`REPORT_COLUMNS` (the ``vae_reconstruction.csv`` table)."""
    return pd.DataFrame([{k: r[k] for k in REPORT_COLUMNS} for r in reports],
                        columns=list(REPORT_COLUMNS))
