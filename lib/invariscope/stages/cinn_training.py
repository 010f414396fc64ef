"""Training of the cINN t(z | ŷ) of one denoiser on latents of its frozen conditional VAE.

Paper Sec. 2.3.2 / Eq. 5–6 and the authors' trainer: per step

1. draw a batch of low-dose training crops x (patient-weighted,
   :class:`~invariscope.stages.training.BatchStream`, the cVAE's crop size);
2. ŷ = f(x) with the frozen, eval-mode denoiser, and z ~ q(z | x, ŷ) (reparameterised sample of
   the frozen, eval-mode conditional encoder); no gradient reaches f or the VAE;

   with a pool (``cinn.pool_crops = N > 0`` for the global latent, the cVAE's
   ``vae.spatial.pool_crops`` for the spatial one; CPU profiles) steps 1–2 instead draw the batch
   from N fixed training crops whose ŷ, μ and log σ² are computed once (cached in
   ``latent_pool.pt``; ŷ shared with the cVAE) and only resample z = μ + σ·ε: f(x) of RED-CNN
   on a batch costs far more than the cINN step;
3. one Adam step on the cINN's exact negative log-likelihood
   ``mean(½‖t(z | ŷ)‖²) − mean(log|det J|)`` (nats per sample,
   :meth:`invariscope.models.cinn.ConditionalINN.nll_loss`); the condition embedder of ŷ is trained
   jointly with the flow.

Every ActNorm layer (flow and embedder) of the global cINN is data-initialized on the latents of
the first batch (step 0) before its first update; a resumed run loads them from the checkpoint
instead. The convolutional cINN of the spatial latent (:class:`~invariscope.models.spatial.ConvolutionalINN`)
has no data-initialized layers.

Validation: the same NLL on ``cinn.n_val_crops`` fixed validation crops, each with one fixed draw
of z (lower is better) -> ``best.pt``. Checkpoints: ``<out_dir>/<denoiser>/{last,best}.pt`` via
:func:`invariscope.stages.training.train` (resume, NaN guard). The configuration fingerprint covers the
``cinn`` section (without ``iterations``), the seed, the data set, the denoiser and the identity
of the cVAE checkpoint the latents come from (its fingerprint and its weights' hash; the VAE's
fingerprint in turn covers the denoiser's checkpoint), so a cINN is never silently reused with
another VAE or denoiser.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from invariscope import atomic
from invariscope import device as devices
from invariscope import distributed
from invariscope.config.params import Params
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import CropDataset, fixed_crops
from invariscope.models.cinn import ConditionalINN
from invariscope.models.spatial import ConvolutionalINN
from invariscope.names import cinn_name
from invariscope.precision import Precision
from invariscope.provenance import cinn_fingerprint, stage_dir
from invariscope.stages.training import (BatchStream, checkpoint_dir, cosine_lr, load_best, pool_batches,
                                         train)
from invariscope.stages.vae_training import get_denoiser, load_vae, training_pool

__all__ = [
    "TrainedCINN",
    "build_cinn",
    "encode_latents",
    "train_cinn",
    "load_cinn",
    "load_models",
]


@dataclass
class TrainedCINN:
    """A cINN after :func:`train_cinn` (``model`` holds the best checkpoint, eval mode).

    ``seconds_per_step``: wall time per step of this call (None when nothing was trained).
    """

    name: str
    model: ConditionalINN
    vae: nn.Module
    denoiser: nn.Module
    best_step: int | None
    best_val_nll: float | None
    steps: int
    seconds: float
    seconds_per_step: float | None
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
def build_cinn(params: Params) -> ConditionalINN | ConvolutionalINN:
    """The profile's cINN (latent size and condition size from the ``vae`` section), seeded:
    the paper's :class:`ConditionalINN` for a global latent, a :class:`ConvolutionalINN` for
    ``vae.latent: spatial``."""
    c = params.cinn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        if params.vae.latent == "spatial":
            sp, cfg = c.spatial, params.vae.spatial_config(True)
            return ConvolutionalINN(cfg.latent_shape, cfg.downsample, n_blocks=c.n_blocks,
                                    subnet_width=sp.subnet_width, cond_width=sp.cond_width,
                                    cond_channels=sp.cond_channels, dilations=sp.dilations,
                                    clamp=c.clamp, seed=params.seed, coarse_blocks=sp.coarse_blocks)
        return ConditionalINN(latent_dim=params.vae.latent_dim, cond_size=params.vae.crop_size,
                              cond_channels=1, cond_dim=c.cond_dim, base_channels=c.base_channels,
                              n_down=c.n_down, n_blocks=c.n_blocks, hidden=c.hidden,
                              hidden_depth=c.hidden_depth, clamp=c.clamp,
                              leaky_slope=c.leaky_slope, coupling=c.coupling)


# --------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------
@torch.no_grad()
def encode_latents(vae: nn.Module, denoiser: nn.Module, x: torch.Tensor,
                   generator: torch.Generator | None = None,
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, ŷ)`` for normalized crops x ``(B, 1, c, c)``: ŷ = f(x), z ~ q(z | x, ŷ).

    The reparameterisation noise comes from ``generator`` (None: the global torch RNG, as
    :meth:`ConditionalVAE.reparameterize`), drawn on its device and moved. Both networks should
    be in eval mode; x is moved to the cVAE's device, and so are the results.
    """
    dev = devices.module_device(vae)
    zs, ys = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(dev)
        y_hat = denoiser(xb)
        mu, logvar = vae.encode(xb, y_hat)
        if generator is None:
            z = vae.reparameterize(mu, logvar)
        else:
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype,
                              device=generator.device).to(mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
        zs.append(z)
        ys.append(y_hat)
    return torch.cat(zs), torch.cat(ys)


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def load_models(denoiser: str, params: Params, dataset: CTDataset, vae_dir: str | Path | None = None,
                denoiser_dir: str | Path | None = None) -> tuple[nn.Module, nn.Module]:
    """The frozen, eval-mode ``(denoiser, cVAE)`` a denoiser's cINN is trained on / samples with,
    on the profile's device."""
    name = cinn_name(denoiser, params)
    den_dir = stage_dir(params, "denoisers", denoiser_dir)
    den = get_denoiser(name, params, dataset, den_dir)
    vae = load_vae(name, params, dataset, stage_dir(params, "vae", vae_dir), den_dir)
    return _frozen(den), _frozen(vae)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _validation_latents(vae: nn.Module, den: nn.Module, params: Params,
                        dataset: CTDataset) -> tuple[torch.Tensor, torch.Tensor]:
    size = params.vae.crop_size
    specs = fixed_crops(dataset, "val", size, params.cinn.n_val_crops, params.seed)
    crops = CropDataset(dataset, "val", size, specs)
    x = torch.stack([crops[i][0] for i in range(len(specs))])
    gen = torch.Generator().manual_seed(params.seed)
    return encode_latents(vae, den, x, generator=gen)


def pool_size(name: str, params: Params) -> int:
    """Training crops in a cINN's fixed pool (0: fresh crops every step): ``cinn.pool_crops`` for
    the global latent; the cVAE's pool (``vae.spatial``) for the spatial one."""
    if params.vae.latent == "spatial":
        return params.vae.spatial.pool_size(name)
    return params.cinn.pool_crops


def _latent_pool(vae: nn.Module, den: nn.Module, params: Params, dataset: CTDataset, ckpt_dir: Path,
                 fp: str, progress: bool, name: str,
                 denoiser_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """ŷ, μ and log σ² of the pool's fixed training crops (:func:`pool_size`; ŷ shared with the
    cVAE through :func:`invariscope.stages.vae_training.training_pool`), cached in ``latent_pool.pt``."""
    n = pool_size(name, params)
    dev = devices.module_device(vae)
    path = ckpt_dir / "latent_pool.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("fingerprint") == fp and len(cached["mu"]) == n:
                return {k: cached[k].to(dev) for k in ("y_hat", "mu", "logvar")}
        except Exception:  # noqa: BLE001 - unreadable: recompute
            pass
    xy = training_pool(name, params, dataset, den, n, ckpt_dir.parent.parent / "pools", progress,
                       denoiser_dir)
    parts: dict[str, list[torch.Tensor]] = {"y_hat": [], "mu": [], "logvar": []}
    with torch.no_grad():
        for i in tqdm(range(0, n, 64), desc="latent pool", disable=not progress, mininterval=2.0):
            x, y_hat = xy["x"][i:i + 64].to(dev), xy["y_hat"][i:i + 64].to(dev)
            mu, logvar = vae.encode(x, y_hat)
            for k, v in (("y_hat", y_hat), ("mu", mu), ("logvar", logvar)):
                parts[k].append(v.cpu())
    pool = {k: torch.cat(v) for k, v in parts.items()}
    atomic.torch_save(path, {"fingerprint": fp, **pool})
    return {k: v.to(dev) for k, v in pool.items()}


def train_cinn(denoiser: str, params: Params, dataset: CTDataset, out_dir: str | Path,
               force: bool = False, progress: bool = True, vae_dir: str | Path | None = None,
               denoiser_dir: str | Path | None = None) -> TrainedCINN:
    """Train (or resume, or reuse) the cINN of ``denoiser``; checkpoints in ``out_dir/<denoiser>/``.

    The cVAE is read from ``vae_dir/<denoiser>/`` (default ``runs/<profile>/vae``), the denoiser
    from ``denoiser_dir/<denoiser>/`` (default ``runs/<profile>/denoisers``; ``gaussri`` needs
    none). ``force=True`` deletes the cINN's ``last.pt``/``best.pt`` first. A checkpoint of
    another configuration (cinn params, seed, data set, cVAE or denoiser checkpoint) raises
    :class:`~invariscope.stages.training.CheckpointMismatchError`; a NaN loss raises
    :class:`~invariscope.stages.training.NonFiniteLossError` keeping the last good checkpoint. Returns
    the best checkpoint (lowest validation NLL) in eval mode.
    """
    name = cinn_name(denoiser, params)
    cfg = params.cinn
    ckpt_dir = checkpoint_dir(out_dir, name, force, ("latent_pool.pt",))
    t0 = time.time()
    fp = cinn_fingerprint(name, params, dataset, vae_dir, denoiser_dir)  # names a missing cVAE
    den, vae = load_models(name, params, dataset, vae_dir, denoiser_dir)
    dev = devices.module_device(vae)
    model = build_cinn(params).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    mp = Precision(params.precision, dev)
    optimizers = mp.register({"cinn": opt})

    n_pool = pool_size(name, params)
    pool = (_latent_pool(vae, den, params, dataset, ckpt_dir, fp, progress, name, denoiser_dir)
            if n_pool else None)

    def step_fn(step: int, batch: Any) -> dict[str, float]:
        if pool is None:
            with mp.autocast():
                z, y_hat = encode_latents(vae, den, batch[0])
            z, y_hat = z.float(), y_hat.float()
        else:  # batch: indices into the pool; fresh reparameterisation noise every step
            y_hat, mu = pool["y_hat"][batch], pool["mu"][batch]
            z = mu + torch.exp(0.5 * pool["logvar"][batch]) * distributed.randn_like(mu)
        if not model.is_initialized:  # a fresh run: fit every ActNorm to the first (global) batch
            model.initialize(distributed.gather(z), distributed.gather(y_hat))
        with mp.autocast():
            loss = model.nll_loss(z, y_hat)  # float32: coupling arithmetic, log-det and NLL
        if cfg.lr_final < 1.0:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, cfg.iterations, cfg.lr, cfg.lr_final)
        mp.update(loss, opt, clip=cfg.grad_clip)
        return {"nll": loss.item(), "nll_dim": loss.item() / model.latent_dim}

    z_val, y_val = _validation_latents(vae, den, params, dataset)

    def validate() -> float:
        total = 0.0
        for i in range(0, len(z_val), 256):
            n = len(z_val[i:i + 256])
            total += float(model.nll_loss(z_val[i:i + 256], y_val[i:i + 256])) * n
        return total / len(z_val)

    if pool is None:
        batches = BatchStream(dataset, params.vae.crop_size, cfg.batch_size, seed=params.seed,
                              num_workers=params.loader.num_workers).iterate_from
    else:
        batches = pool_batches(params.seed, n_pool, cfg.batch_size)
    result = train(step_fn, batches, cfg.iterations, ckpt_dir, {"cinn": model},
                   optimizers, fp, seed=params.seed, checkpoint_every=cfg.checkpoint_every,
                   validate_fn=validate, validate_every=cfg.validate_every,
                   higher_is_better=False, desc=f"cINN {name}", progress=progress, device=dev)
    best_step = load_best(ckpt_dir, {"cinn": model}, fp)
    model.eval()
    trained_steps = result.steps - result.resumed_from
    per_step = result.seconds / trained_steps if trained_steps > 0 and result.seconds > 0 else None
    return TrainedCINN(name, model, vae, den, result.best_step or best_step, result.best_metric,
                       result.steps, time.time() - t0, per_step, result.history)


def load_cinn(denoiser: str, params: Params, dataset: CTDataset, out_dir: str | Path,
              vae_dir: str | Path | None = None,
              denoiser_dir: str | Path | None = None) -> ConditionalINN:
    """The best checkpoint of a trained cINN in eval mode, on the profile's device (see
    :func:`train_cinn`).

    Raises :class:`FileNotFoundError` when it was not trained yet and
    :class:`~invariscope.stages.training.CheckpointMismatchError` when its checkpoint belongs to another
    configuration, another cVAE checkpoint or another denoiser checkpoint.
    """
    name = cinn_name(denoiser, params)
    model = build_cinn(params)
    load_best(Path(out_dir) / name, {"cinn": model},
              cinn_fingerprint(name, params, dataset, vae_dir, denoiser_dir))
    return model.to(devices.of(params)).eval()
