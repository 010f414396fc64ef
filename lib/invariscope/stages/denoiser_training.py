"""Training of the four learned denoisers (CNN-10, RED-CNN, WGAN-VGG, DU-GAN) on one loop.

Every method is a ``step_fn`` for :func:`invariscope.stages.training.train` (resume, NaN guard,
configuration fingerprint, best checkpoint by validation SSIM). The losses and update orders
follow the authors' ``ldct-benchmark`` trainers:

* **CNN-10, RED-CNN**: MSE between the output and the full-dose crop; Adam.
* **WGAN-VGG**: ``critic_steps`` WGAN-GP critic updates per generator update
  (``critic(G(x)) - critic(y) + lambda_gp * GP``, interpolation weight drawn per sample), then the
  generator loss ``-critic(G(x)) + lambda_perceptual * L1(VGG19 conv5_4(G(x)), VGG19 conv5_4(y))``.
  Both networks use Adam with the same ``lr``/``beta1``/``beta2`` (paper: beta1 0.326). With
  ``lambda_pixel > 0`` (the CPU profiles; 0 in the paper) the generator loss gains
  ``lambda_pixel * MSE(G(x), y)``: a few hundred adversarial steps with a random-weight VGG leave
  the image's intensity free, and three seeds ended 60–210 HU off the full dose.
* **DU-GAN**: RED-CNN generator; an image-domain and a gradient-domain (Sobel magnitude) U-Net
  discriminator, the latter a copy of the former at initialization. Discriminator loss (LSGAN on
  both the global and the per-pixel output): full dose -> 1, denoised -> 0, low dose -> 0; with
  probability ``min((step + 1) / cutmix_warmup, 1) * cutmix_prob`` (one draw per step) the CutMix
  terms are added: a mix ``y * M + G(x) * (1 - M)`` with a random box mask ``M``, its global
  output -> 0, its per-pixel output -> ``M``, plus ``lambda_cutmix * MSE(D_pix(mix),
  M * D_pix(y) + (1 - M) * D_pix(G(x)))``. The image discriminator is updated ``d_steps`` times
  per step, the gradient discriminator once (as in the authors' code), both on the same
  denoised batch. Generator loss: ``lambda_adv * (LSGAN_img + LSGAN_grad) + lambda_px_im * MSE +
  lambda_px_grad * L1(Sobel(G(x)), Sobel(y))``. Adam with default betas for all three networks
  (the authors' DU-GAN trainer does not pass its configured ``adam_b1``).

VGG19 weights (``denoisers.vgg_weights``): torchvision's ImageNet file, resolved against the
repository root; null = a VGG19 with fixed random weights (seeded, recorded as
``vgg_pretrained: False``): its conv5_4 features still rank "denoised" above "noisy", but the
loss is not the paper's.

Validation: mean SSIM in the lung window (:mod:`invariscope.evaluation.metrics`) on ``val_slices`` full
validation slices, evenly spread over the validation split; ``best.pt`` keeps the best one.
Checkpoints: ``<out_dir>/<name>/last.pt`` and ``best.pt``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from invariscope import device as devices
from invariscope import distributed
from invariscope.config.params import Params
from invariscope.config.paths import RELATIVE_RULE, resolve_setting
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import Normalizer
from invariscope.evaluation.metrics import psnr_lung, ssim_lung
from invariscope.models.backbones import TORCHVISION_FILES, VGGPerceptualLoss
from invariscope.models.custom import build_custom
from invariscope.models.denoisers import (DUGANDiscriminator, GaussRI, WGANVGGCritic, build_denoiser,
                                          sobel_gradients)
from invariscope.names import TRAINED_METHODS, check_name
from invariscope.precision import Precision, float32, full
from invariscope.provenance import denoiser_fingerprint
from invariscope.stages.training import BatchStream, checkpoint_dir, cosine_lr, load_best, train

__all__ = [
    "TrainedDenoiser",
    "train_denoiser",
    "load_denoiser",
    "denoise_hu",
    "validation_slices",
    "mean_ssim",
    "resolve_vgg_weights",
    "cutmix_mask",
    "gradient_penalty",
]

_VGG_URL = "https://download.pytorch.org/models/" + TORCHVISION_FILES["vgg19"]


@dataclass
class TrainedDenoiser:
    """A denoiser after :func:`train_denoiser` (``model`` holds the best checkpoint, eval mode)."""

    name: str
    model: nn.Module
    best_step: int | None
    best_val: float | None  # the validation metric of ``denoisers.select_by`` at best_step
    steps: int
    seconds: float
    vgg_pretrained: bool | None = None  # WGAN-VGG only: ImageNet VGG19 (True) or the fallback


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
def resolve_vgg_weights(params: Params) -> Path | None:
    """The VGG19 weights file of ``denoisers.vgg_weights`` (:data:`~invariscope.config.paths.RELATIVE_RULE`).

    None when the setting is null (the fixed random VGG19 fallback). A path that does not exist
    raises :class:`FileNotFoundError` saying how to obtain torchvision's file.
    """
    setting = params.denoisers.vgg_weights
    if setting is None:
        return None
    path = resolve_setting(setting, params.source_file)
    if not path.is_file():
        where = params.source_file or f"params/{params.profile or '<profile>'}.yaml"
        raise FileNotFoundError(
            f"denoisers.vgg_weights = {setting!r}: no file {path} ({RELATIVE_RULE}). WGAN-VGG's perceptual loss "
            f"needs torchvision's ImageNet VGG19 weights ({TORCHVISION_FILES['vgg19']}). Download "
            f"{_VGG_URL} on a machine with internet access and copy it to {path}, or set "
            f"denoisers.vgg_weights in {where} to where the file is, or set it to null to use a "
            "fixed random VGG19 instead (not the paper's loss; the run records vgg_pretrained: false)."
        )
    return path


# --------------------------------------------------------------------------------------
# Inference and validation
# --------------------------------------------------------------------------------------
def denoise_hu(model: nn.Module, hu_slices: np.ndarray, normalizer: Normalizer,
               batch_size: int = 4) -> np.ndarray:
    """Denoise full slices: ``(B, H, W)`` (or ``(H, W)``) HU in, float32 HU of the same shape out."""
    arr = np.asarray(hu_slices, dtype=np.float32)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected (B, H, W) or (H, W) HU slices, got shape {np.shape(hu_slices)}")
    device = devices.module_device(model)
    was_training = model.training
    model.eval()
    out = np.empty_like(arr)
    try:
        with torch.no_grad():
            for i in range(0, len(arr), max(1, int(batch_size))):
                x = torch.from_numpy(np.asarray(normalizer(arr[i:i + batch_size]), dtype=np.float32))
                y = model(x[:, None].to(device))[:, 0].float().cpu()
                out[i:i + batch_size] = normalizer.to_hu(y).numpy()
    finally:
        model.train(was_training)
    return out[0] if single else out


def validation_slices(dataset: CTDataset, n: int, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """``n`` full slices evenly spread over a split (fixed order): (low, full) float32 HU stacks."""
    index = dataset.slice_index(split)
    if not index:
        raise ValueError(f"split {split!r} of {dataset.root} has no slices")
    picks = np.unique(np.linspace(0, len(index) - 1, min(n, len(index))).round().astype(int))
    entries = [index[i] for i in picks]
    low = np.stack([dataset.volume(p, "low")[s] for p, s in entries])
    full = np.stack([dataset.volume(p, "full")[s] for p, s in entries])
    return low.astype(np.float32), full.astype(np.float32)


def mean_ssim(pred_hu: np.ndarray, target_hu: np.ndarray) -> float:
    """Mean lung-window SSIM over a stack of slices (the validation metric)."""
    return float(np.mean([ssim_lung(p, t) for p, t in zip(pred_hu, target_hu)]))


def mean_psnr(pred_hu: np.ndarray, target_hu: np.ndarray) -> float:
    """Mean lung-window PSNR (dB) over a stack of slices."""
    return float(np.mean([psnr_lung(p, t) for p, t in zip(pred_hu, target_hu)]))


def _make_validate(model: nn.Module, dataset: CTDataset, n_slices: int,
                   normalizer: Normalizer, select_by: str = "ssim") -> Callable[[], float]:
    low, full = validation_slices(dataset, n_slices)
    metric = mean_psnr if select_by == "psnr" else mean_ssim

    def validate() -> float:
        return metric(denoise_hu(model, low, normalizer), full)

    return validate


# --------------------------------------------------------------------------------------
# Losses and helpers
# --------------------------------------------------------------------------------------
def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _adam(module: nn.Module, cfg: Any) -> torch.optim.Adam:
    return torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _ls(pred: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
    """LSGAN loss: mean squared distance to the target label (scalar or per-pixel map)."""
    return torch.mean((pred - target) ** 2)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP term ``mean((||grad critic(a y + (1 - a) G(x))||_2 - 1)^2)`` (unweighted), in
    float32 (autocast off: the double backward stays in full precision)."""
    real, fake = full(real), full(fake)
    a = distributed.rand(real.shape[0], 1, 1, 1, dtype=real.dtype, device=real.device)
    interp = (a * real + (1 - a) * fake).requires_grad_(True)
    with float32(real.device):
        out = critic(interp)
        (grad,) = torch.autograd.grad(out, interp, grad_outputs=torch.ones_like(out), create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def cutmix_mask(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """DU-GAN CutMix mask of ``shape`` (B, 1, H, W): ones with one zero box shared by the batch.

    Box area fraction ``1 - lam`` with ``lam ~ Beta(1, 1)``, centre uniform in the image, clipped
    to the image (the authors' ``cutmix``); drawn from torch's global RNG.
    """
    _, _, h, w = shape
    lam, cx, cy = torch.rand(3, dtype=torch.float64).tolist()
    cx, cy = cx * w, cy * h
    bw, bh = w * np.sqrt(1 - lam), h * np.sqrt(1 - lam)
    x0, x1 = int(round(max(cx - bw / 2, 0))), int(round(min(cx + bw / 2, w)))
    y0, y1 = int(round(max(cy - bh / 2, 0))), int(round(min(cy + bh / 2, h)))
    mask = torch.ones(shape)
    mask[:, :, y0:y1, x0:x1] = 0
    return mask


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------
@dataclass
class _Setup:
    model: nn.Module
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    step_fn: Callable[[int, Any], Mapping[str, float]]
    vgg_pretrained: bool | None = None


def _setup_mse(model: nn.Module, cfg: Any, mp: Precision) -> _Setup:
    opt = _adam(model, cfg)

    def step_fn(step: int, batch: Any) -> dict[str, float]:
        x, y = batch
        with mp.autocast():
            loss = F.mse_loss(model(x).float(), y)
        mp.update(loss, opt)
        return {"mse": loss.item()}

    return _Setup(model, {"model": model}, {"model": opt}, step_fn)


def _setup_wganvgg(model: nn.Module, cfg: Any, params: Params, dataset: CTDataset,
                   device: torch.device, mp: Precision) -> _Setup:
    weights = resolve_vgg_weights(params)
    critic = WGANVGGCritic(patch_size=cfg.patch_size).to(device)
    mean_hu, std_hu = dataset.normalization
    perceptual = VGGPerceptualLoss(kind="vgg19", weights_path=weights, norm="l1",
                                   input_mapping="repeat", data_mean=mean_hu + 1024.0,
                                   data_std=std_hu, seed=params.seed,
                                   params_key="denoisers.vgg_weights").to(device)
    opt_g, opt_d = _adam(model, cfg), _adam(critic, cfg)

    def step_fn(step: int, batch: Any) -> dict[str, float]:
        x, y = batch
        if cfg.lr_final < 1:
            lr = cosine_lr(step, cfg.iterations, cfg.lr, cfg.lr_final)
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"] = lr
        with torch.no_grad(), mp.autocast():
            fake = model(x).float()
        _requires_grad(critic, True)
        for _ in range(cfg.critic_steps):
            with mp.autocast():
                wdist = critic(y).float().mean() - critic(fake).float().mean()
            gp = gradient_penalty(critic, y, fake)
            loss_d = -wdist + cfg.lambda_gp * gp
            mp.update(loss_d, opt_d)
        _requires_grad(critic, False)
        with mp.autocast():
            fake = model(x).float()
            adv = -critic(fake).float().mean()
            with torch.no_grad():  # no backward through the target's features (same loss, half the work)
                target_feats = perceptual.extract(y)
            perc = sum(F.l1_loss(f.float(), t.float())
                       for f, t in zip(perceptual.extract(fake), target_feats))
            loss_g = adv + cfg.lambda_perceptual * perc
            if cfg.lambda_pixel > 0:  # CPU profiles only (0 in the paper's loss)
                loss_g = loss_g + cfg.lambda_pixel * F.mse_loss(fake, y)
        mp.update(loss_g, opt_g)
        _requires_grad(critic, True)
        return {"d": loss_d.item(), "gp": gp.item(), "g_adv": adv.item(), "g_perc": perc.item()}

    return _Setup(model, {"model": model, "critic": critic}, {"model": opt_g, "critic": opt_d},
                  step_fn, vgg_pretrained=perceptual.pretrained)


def _setup_dugan(model: nn.Module, cfg: Any, device: torch.device, mp: Precision) -> _Setup:
    d_img = DUGANDiscriminator(in_channels=1, conv_dim=cfg.disc_channels,
                               repeat_num=cfg.disc_depth).to(device)
    d_grad = copy.deepcopy(d_img)  # the authors deep-copy the image discriminator
    opt_g, opt_di, opt_dg = _adam(model, cfg), _adam(d_img, cfg), _adam(d_grad, cfg)

    def update_d(disc: nn.Module, opt: torch.optim.Optimizer, src: torch.Tensor, real: torch.Tensor,
                 fake: torch.Tensor, use_cutmix: bool) -> torch.Tensor:
        with mp.autocast():
            real_g, real_p = _float(disc(real))
            fake_g, fake_p = _float(disc(fake))
            src_g, src_p = _float(disc(src))
            loss = (_ls(real_g, 1.0) + _ls(real_p, 1.0) + _ls(fake_g, 0.0) + _ls(fake_p, 0.0)
                    + _ls(src_g, 0.0) + _ls(src_p, 0.0))
            if use_cutmix:
                mask = cutmix_mask(real_p.shape).to(real_p)
                mix_g, mix_p = _float(disc(real * mask + fake * (1 - mask)))
                consistency = F.mse_loss(mix_p, real_p * mask + fake_p * (1 - mask))
                loss = loss + _ls(mix_g, 0.0) + _ls(mix_p, mask) + cfg.lambda_cutmix * consistency
        mp.update(loss, opt)
        return loss.detach()

    def step_fn(step: int, batch: Any) -> dict[str, float]:
        x, y = batch
        with mp.autocast():
            fake = model(x).float()
        g_fake, g_x, g_y = sobel_gradients(fake), sobel_gradients(x), sobel_gradients(y)
        p_cutmix = min((step + 1) * cfg.cutmix_prob / cfg.cutmix_warmup, cfg.cutmix_prob)
        use_cutmix = bool(torch.rand(()).item() < p_cutmix)
        _requires_grad(d_img, True)
        _requires_grad(d_grad, True)
        for _ in range(cfg.d_steps):
            loss_di = update_d(d_img, opt_di, x, y, fake.detach(), use_cutmix)
        loss_dg = update_d(d_grad, opt_dg, g_x, g_y, g_fake.detach(), use_cutmix)
        _requires_grad(d_img, False)
        _requires_grad(d_grad, False)
        with mp.autocast():
            out_g, out_p = _float(d_img(fake))
            adv_img = _ls(out_g, 1.0) + _ls(out_p, 1.0)
            out_g, out_p = _float(d_grad(g_fake))
            adv_grad = _ls(out_g, 1.0) + _ls(out_p, 1.0)
        pix = F.mse_loss(fake, y)
        grad = F.l1_loss(g_fake, g_y)
        loss_g = (cfg.lambda_adv * (adv_img + adv_grad) + cfg.lambda_px_im * pix
                  + cfg.lambda_px_grad * grad)
        mp.update(loss_g, opt_g)
        _requires_grad(d_img, True)
        _requires_grad(d_grad, True)
        return {"g": loss_g.item(), "pix": pix.item(), "grad": grad.item(),
                "d_img": loss_di.item(), "d_grad": loss_dg.item()}

    return _Setup(model, {"model": model, "d_img": d_img, "d_grad": d_grad},
                  {"model": opt_g, "d_img": opt_di, "d_grad": opt_dg}, step_fn)


def _float(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(o.float() for o in outputs)


def _setup(name: str, params: Params, dataset: CTDataset, device: torch.device) -> _Setup:
    cfg = getattr(params.denoisers, name)
    mp = Precision(params.precision, device)
    with torch.random.fork_rng(devices=[]):  # the same initial weights every run, on any device
        torch.manual_seed(params.seed)
        model = build_denoiser(name).to(device)
        if name in ("cnn10", "redcnn"):
            setup = _setup_mse(model, cfg, mp)
        elif name == "wganvgg":
            setup = _setup_wganvgg(model, cfg, params, dataset, device, mp)
        else:
            setup = _setup_dugan(model, cfg, device, mp)
    setup.optimizers = mp.register(setup.optimizers)
    return setup


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------
def train_denoiser(name: str, params: Params, dataset: CTDataset, out_dir: str | Path,
                   force: bool = False, progress: bool = True) -> TrainedDenoiser:
    """Train (or resume, or reuse) denoiser ``name``; checkpoints in ``out_dir/<name>/``.

    ``gaussri`` and custom denoisers (``denoisers.custom``) have nothing to train and return at
    once. ``force=True`` deletes the method's
    ``last.pt``/``best.pt`` first. A checkpoint written by another configuration (method
    params, seed, data set) raises :class:`~invariscope.stages.training.CheckpointMismatchError`; a NaN
    loss raises :class:`~invariscope.stages.training.NonFiniteLossError` keeping the last good
    checkpoint. Returns the best checkpoint's model in eval mode.
    """
    name = check_name(name, params)
    if name not in TRAINED_METHODS:  # Gauss+RI or the user's own, already trained denoiser
        return TrainedDenoiser(name, load_denoiser(name, params, dataset, out_dir), None, None,
                               0, 0.0, None)
    den = params.denoisers
    cfg = getattr(den, name)
    ckpt_dir = checkpoint_dir(out_dir, name, force)
    t0 = time.time()
    dev = devices.of(params)
    setup = _setup(name, params, dataset, dev)
    fp = denoiser_fingerprint(name, params, dataset)
    stream = BatchStream(dataset, cfg.patch_size, cfg.batch_size, seed=params.seed,
                         num_workers=params.loader.num_workers)
    validate = _make_validate(setup.model, dataset, den.val_slices, Normalizer.of(dataset),
                              den.select_by)
    result = train(setup.step_fn, stream.iterate_from, cfg.iterations, ckpt_dir, setup.modules,
                   setup.optimizers, fp, seed=params.seed, checkpoint_every=den.checkpoint_every,
                   validate_fn=validate, validate_every=den.validate_every, desc=name,
                   progress=progress, device=dev)
    best_step = load_best(ckpt_dir, {"model": setup.model}, fp)
    setup.model.eval()
    return TrainedDenoiser(name, setup.model, result.best_step or best_step, result.best_metric,
                           result.steps, time.time() - t0, setup.vgg_pretrained)


def load_denoiser(name: str, params: Params, dataset: CTDataset, out_dir: str | Path) -> nn.Module:
    """The best checkpoint of a trained denoiser (eval mode, on the profile's device, see
    :mod:`invariscope.device`); ``gaussri`` is built directly.

    Raises :class:`FileNotFoundError` when the method was not trained yet and
    :class:`~invariscope.stages.training.CheckpointMismatchError` when its checkpoint belongs to another
    configuration.
    """
    name = check_name(name, params)
    dev = devices.of(params)
    if name == "gaussri":
        return GaussRI().to(dev).eval()
    if name in params.denoisers.custom:
        return build_custom(name, params, dataset.normalization).to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        model = build_denoiser(name)
    load_best(Path(out_dir) / name, {"model": model}, denoiser_fingerprint(name, params, dataset))
    return model.to(dev).eval()
