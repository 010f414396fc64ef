"""Layer-wise and target-domain invariances (talk 002, after Rombach et al., ECCV 2020).

Decompose the denoiser at a layer, f = Ψ ∘ Φ_l, and ask what Φ_l(x) has already discarded:
a cINN t(z | Φ_l(x)) is trained on the same latents z ~ q(z | x, ŷ) of the denoiser's cVAE as the
output-level cINN, with the feature map Φ_l(x) (:class:`~invariscope.models.layers.LayerFeatures`)
in place of ŷ, and sampled like the output-level invariances: x̃ = D(t⁻¹(v | Φ_l(x)), ŷ),
v ~ N(0, I). Decoding with ŷ is exact here: ŷ = Ψ(Φ_l(x)) is a function of the condition.
Since Φ_{l+1} is a function of Φ_l, every invariance of Φ_l is one of Φ_{l+1}: the sets should
never shrink with depth (:func:`monotonicity`).

Target domain: a second spatial cVAE learns high-dose crops y given ŷ = f(x) of their low-dose
twins (:func:`train_target_vae`); cINNs t(z_y | Φ_l(x)) on its latents sample high-dose images
ỹ = D_y(t⁻¹(v | Φ_l(x)), ŷ) that the denoiser's representation of x cannot tell apart.

Checkpoints: ``runs/<profile>/layerwise/<denoiser>/<layer>/`` (low dose),
``.../<denoiser>/target_vae/`` and ``.../<denoiser>/target/<layer>/``; sampled sets beside them
(``<layer>.npz``, ``target_<layer>.npz``), all resumable and keyed by the networks' identities.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from invariscope import atomic
from invariscope import device as devices
from invariscope import distributed
from invariscope.config.params import LayerwiseParams, Params, digest
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import CropDataset, Normalizer, fixed_crops
from invariscope.models.layers import OUTPUT, LayerFeatures, feature_shape
from invariscope.models.spatial import ConvolutionalINN
from invariscope.names import cinn_name
from invariscope.precision import Precision
from invariscope.provenance import (best_checkpoint, checkpoint_sha, cinn_fingerprint, cinn_identity,
                                    dataset_key, stage_dir, vae_identity)
from invariscope.stages import invariances as inv
from invariscope.stages.cinn_training import (_frozen, _latent_pool, build_cinn, encode_latents,
                                              load_cinn, load_models)
from invariscope.stages.training import (BatchStream, checkpoint_dir, cosine_lr, load_best, pool_batches,
                                         train)
from invariscope.stages.vae_training import _make_spatial_step, build_vae, training_pool

__all__ = [
    "Domain",
    "COLUMNS",
    "TARGET_COLUMNS",
    "layer_dir",
    "build_layer_cinn",
    "train_layer_cinn",
    "train_target_vae",
    "load_target_vae",
    "sample_layer",
    "layer_measures",
    "monotonicity",
    "run_denoiser",
    "summary_path",
    "load_summaries",
]

Domain = Literal["low", "high"]
#: Columns of ``figures/<profile>/layerwise.csv``.
COLUMNS = ("denoiser", "depth", "layer", "channels", "invariance_sd_hu", "input_change_hu",
           "output_change_hu", "feature_change_rel", "sd_change_vs_previous_hu",
           "sd_change_se_hu", "shrinks")
#: Columns of ``figures/<profile>/layerwise_target.csv``.
TARGET_COLUMNS = ("denoiser", "depth", "layer", "invariance_sd_hu", "change_vs_y_hu",
                  "change_vs_f_x_hu", "y_vs_f_x_hu")


def _cfg(params: Params) -> LayerwiseParams:
    if params.layerwise is None:
        raise ValueError(f"{params.source_file}: no layerwise section (layer-wise invariances are off "
                         "in this profile; see params/default.yaml)")
    return params.layerwise


def layer_dir(params: Params, denoiser: str, layer: str, domain: Domain = "low",
              out_dir: str | Path | None = None) -> Path:
    """Checkpoint folder of a layer's cINN."""
    base = stage_dir(params, "layerwise", out_dir) / cinn_name(denoiser, params)
    return base / layer if domain == "low" else base / "target" / layer


def _reuses_output_cinn(params: Params, layer: str, domain: Domain) -> bool:
    """The output layer of the low-dose domain is the cINN of 03_cinn.ipynb when nothing differs."""
    cfg = _cfg(params)
    return (domain == "low" and layer == OUTPUT and cfg.iterations is None
            and not cfg.cinn.model_dump(exclude_none=True))


def layer_params(params: Params) -> Params:
    """``params`` with the ``cinn`` section the layer cINNs use (``layerwise.cinn`` applied)."""
    o = _cfg(params).cinn
    c = params.cinn
    top = {k: getattr(o, k) for k in ("n_blocks", "batch_size", "lr") if getattr(o, k) is not None}
    sp = {k: getattr(o, k) for k in ("subnet_width", "cond_width") if getattr(o, k) is not None}
    if sp:
        top["spatial"] = c.spatial.model_copy(update=sp)
    return params.model_copy(update={"cinn": c.model_copy(update=top)}) if top else params


def _iterations(params: Params) -> int:
    return _cfg(params).iterations or params.cinn.iterations


# --------------------------------------------------------------------------------------
# Target-domain cVAE
# --------------------------------------------------------------------------------------
def _with_vae_iterations(params: Params, n: int) -> Params:
    sp = params.vae.spatial.model_copy(update={"iterations": n})
    return params.model_copy(update={"vae": params.vae.model_copy(update={"spatial": sp})})


def target_vae_fingerprint(denoiser: str, params: Params, dataset: CTDataset,
                           denoiser_dir: str | Path | None = None) -> str:
    """Configuration key of the high-dose cVAE: the low-dose cVAE's (its settings, the denoiser's
    checkpoint) with the domain and the target's steps."""
    name = cinn_name(denoiser, params)
    t = _cfg(params).target
    low = vae_identity(name, params, dataset, None, denoiser_dir)  # its start: the low-dose cVAE
    return f"target-vae-{name}-{digest({'vae': low, 'iterations': t.vae_iterations if t else None})}"


def _pool_xy(name: str, params: Params, dataset: CTDataset, den: nn.Module, progress: bool,
             denoiser_dir: str | Path | None, with_y: bool) -> dict[str, torch.Tensor]:
    """x, ŷ (the cVAE's cached pool) and, with ``with_y``, the high-dose twins y of its crops."""
    n = params.vae.spatial.pool_size(name)
    pool = training_pool(name, params, dataset, den, n, stage_dir(params, "pools"), progress,
                         stage_dir(params, "denoisers", denoiser_dir))
    out = {"x": pool["x"], "y_hat": pool["y_hat"]}
    if with_y:  # the same crops as training_pool's
        specs = fixed_crops(dataset, "train", params.vae.crop_size, n, params.seed + 1)
        crops = CropDataset(dataset, "train", params.vae.crop_size, specs)
        out["y"] = torch.stack([crops[i][1] for i in range(len(specs))])
    return out


def _val_crops(params: Params, dataset: CTDataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    specs = fixed_crops(dataset, "val", params.vae.crop_size, n, params.seed)
    crops = CropDataset(dataset, "val", params.vae.crop_size, specs)
    pairs = [crops[i] for i in range(len(specs))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def train_target_vae(denoiser: str, params: Params, dataset: CTDataset, force: bool = False,
                     progress: bool = True, out_dir: str | Path | None = None,
                     denoiser_dir: str | Path | None = None) -> nn.Module:
    """Train (or resume, or reuse) the high-dose cVAE p(y | z, ŷ) of ``denoiser`` on the high-dose
    twins of its cVAE's pool; the settings of ``vae.spatial`` with ``layerwise.target.vae_iterations``
    steps, starting from the trained low-dose cVAE's weights (same architecture: a few hundred
    steps then suffice); best.pt by the validation MAE (HU) of y. Returns it in eval mode."""
    name = cinn_name(denoiser, params)
    t = _cfg(params).target
    if t is None:
        raise ValueError(f"{params.source_file}: layerwise.target is not set")
    p = _with_vae_iterations(params, t.vae_iterations)
    ckpt = checkpoint_dir(stage_dir(params, "layerwise", out_dir) / name, "target_vae", force,
                          ("latent_pool.pt",))
    fp = target_vae_fingerprint(name, params, dataset, denoiser_dir)
    den, low = load_models(name, params, dataset, denoiser_dir=denoiser_dir)
    dev = devices.of(params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        vae = build_vae(True, p, spatial=True).to(dev)
    vae.load_state_dict(low.state_dict())  # a resumed run overwrites this with last.pt
    for q in vae.parameters():
        q.requires_grad_(True)
    n_pool = params.vae.spatial.pool_size(name)
    holder: dict[str, torch.Tensor | None] = {"x": None, "y_hat": None}
    if n_pool:
        xy = _pool_xy(name, params, dataset, den, progress, denoiser_dir, with_y=True)
        holder = {"x": xy["y"].to(dev), "y_hat": xy["y_hat"].to(dev)}  # the cVAE's step, on y
    mp = Precision(params.precision, dev)
    step, optimizers = _make_spatial_step(vae, den, p, holder, mp)  # reads holder at each call

    def step_fn(i: int, batch: Any) -> dict[str, float]:
        if n_pool:
            return step(i, batch)
        # fresh crops (vae.spatial.pool_crops 0): the image is y, the condition f(x) of its twin
        with torch.no_grad():
            holder["y_hat"] = den(batch[0].to(dev))
        holder["x"] = batch[1].to(dev)
        return step(i, torch.arange(len(holder["x"]), device=dev))
    x_val, y_val = _val_crops(params, dataset, params.vae.n_val_crops)
    x_val, y_val = x_val.to(dev), y_val.to(dev)
    with torch.no_grad():
        yh_val = den(x_val)
    std_hu = Normalizer.of(dataset).std_hu

    def validate() -> float:
        return reconstruction_mae_hu(vae, y_val, yh_val, std_hu)

    sp = p.vae.spatial
    batches = (pool_batches(params.seed, n_pool, sp.batch_size) if n_pool else
               BatchStream(dataset, params.vae.crop_size, sp.batch_size, seed=params.seed,
                           num_workers=params.loader.num_workers).iterate_from)
    train(step_fn, batches, sp.iterations, ckpt,
          {"vae": vae}, optimizers, fp, seed=params.seed, checkpoint_every=params.vae.checkpoint_every,
          validate_fn=validate, validate_every=params.vae.validate_every, higher_is_better=False,
          desc=f"high-dose VAE {name}", progress=progress, device=dev)
    load_best(ckpt, {"vae": vae}, fp)
    return _frozen(vae)


def load_target_vae(denoiser: str, params: Params, dataset: CTDataset,
                    out_dir: str | Path | None = None, denoiser_dir: str | Path | None = None) -> nn.Module:
    """The trained high-dose cVAE (eval mode, frozen); FileNotFoundError before training."""
    name = cinn_name(denoiser, params)
    vae = build_vae(True, params, load_pretrained=False, spatial=True)
    load_best(stage_dir(params, "layerwise", out_dir) / name / "target_vae", {"vae": vae},
              target_vae_fingerprint(name, params, dataset, denoiser_dir))
    return _frozen(vae.to(devices.of(params)))


def target_vae_identity(denoiser: str, params: Params, dataset: CTDataset,
                        out_dir: str | Path | None = None, denoiser_dir: str | Path | None = None) -> str:
    """``<fingerprint>:<checkpoint_sha>`` of the trained high-dose cVAE (what its latents depend on)."""
    name = cinn_name(denoiser, params)
    folder = stage_dir(params, "layerwise", out_dir) / name / "target_vae"
    return (f"{target_vae_fingerprint(name, params, dataset, denoiser_dir)}:"
            f"{checkpoint_sha(best_checkpoint(folder))}")


@torch.no_grad()
def reconstruction_mae_hu(vae: nn.Module, images: torch.Tensor, y_hat: torch.Tensor,
                          std_hu: float, batch_size: int = 32) -> float:
    """Mean |D(μ(img, ŷ), ŷ) − img| in HU of a spatial cVAE (posterior mean, no sampling)."""
    was = vae.training
    vae.eval()
    errs = []
    for i in range(0, len(images), batch_size):
        rec, _, _ = vae(images[i:i + batch_size], y_hat[i:i + batch_size], sample=False)
        errs.append((rec - images[i:i + batch_size]).abs().flatten(1).mean(1))
    vae.train(was)
    return float(torch.cat(errs).mean()) * std_hu


# --------------------------------------------------------------------------------------
# Layer cINNs
# --------------------------------------------------------------------------------------
def build_layer_cinn(params: Params, channels: int) -> nn.Module:
    """The profile's convolutional cINN (:func:`~invariscope.stages.cinn_training.build_cinn`) with
    a condition of ``channels`` channels at the crop's size (Φ_l(x)), seeded the same way."""
    params = layer_params(params)
    if channels == 1:
        return build_cinn(params)
    c = params.cinn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        sp, cfg = c.spatial, params.vae.spatial_config(True)
        return ConvolutionalINN(cfg.latent_shape, cfg.downsample, n_blocks=c.n_blocks,
                                subnet_width=sp.subnet_width, cond_width=sp.cond_width,
                                cond_channels=sp.cond_channels, dilations=sp.dilations,
                                clamp=c.clamp, seed=params.seed, coarse_blocks=sp.coarse_blocks,
                                cond_in_channels=channels)


def layer_fingerprint(denoiser: str, layer: str, domain: Domain, params: Params, dataset: CTDataset,
                      denoiser_dir: str | Path | None = None, vae_dir: str | Path | None = None,
                      out_dir: str | Path | None = None) -> str:
    """Configuration key of a layer's cINN: the ``cinn`` section, the layer, the domain, the seed,
    the data set and the identity of the (c)VAE whose latents it models."""
    name = cinn_name(denoiser, params)
    if domain == "low":
        vae_id = vae_identity(name, params, dataset, vae_dir, denoiser_dir)
    else:
        vae_id = target_vae_identity(name, params, dataset, out_dir, denoiser_dir)
    lp = layer_params(params)
    kept = set() if lp.cinn.lr_final < 1.0 else {"iterations"}
    payload = {"cinn": lp.cinn.model_dump(mode="json", exclude=kept), "layer": layer,
               "domain": domain, "seed": params.seed, "dataset": dataset_key(dataset),
               "vae_identity": vae_id}
    if "iterations" not in kept:
        payload["iterations"] = _iterations(params)
    return f"layer-{name}-{digest(payload)}"


@dataclass
class LayerCINN:
    """A trained layer cINN: the model (eval), what it conditions on, its identity and timings."""

    layer: str
    domain: Domain
    model: nn.Module
    condition: nn.Module | None      # None: ŷ (the output layer)
    identity: str
    channels: int
    seconds: float
    best_val_nll: float | None


def _latents(vae: nn.Module, images: torch.Tensor, y_hat: torch.Tensor,
             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    mus, lvs = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            mu, lv = vae.encode(images[i:i + batch_size], y_hat[i:i + batch_size])
            mus.append(mu)
            lvs.append(lv)
    return torch.cat(mus), torch.cat(lvs)


def _target_latent_pool(vae: nn.Module, xy: Mapping[str, torch.Tensor], path: Path, key: str,
                        dev: torch.device) -> dict[str, torch.Tensor]:
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return {k: cached[k].to(dev) for k in ("mu", "logvar")}
        except Exception:  # noqa: BLE001 - unreadable: recompute
            pass
    mu, lv = _latents(vae, xy["y"].to(dev), xy["y_hat"].to(dev))
    atomic.torch_save(path, {"key": key, "mu": mu.cpu(), "logvar": lv.cpu()})
    return {"mu": mu, "logvar": lv}


@torch.no_grad()
def _features(cond: nn.Module, x: torch.Tensor, dev: torch.device, progress: bool,
              desc: str = "features", batch_size: int = 64) -> torch.Tensor:
    """Φ_l(x) of a stack of crops, float16, on ``dev``."""
    parts = [cond(x[i:i + batch_size].to(dev)).half()
             for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress,
                           mininterval=2.0)]
    return torch.cat(parts)


def train_layer_cinn(denoiser: str, layer: str, params: Params, dataset: CTDataset,
                     domain: Domain = "low", force: bool = False, progress: bool = True,
                     out_dir: str | Path | None = None, denoiser_dir: str | Path | None = None,
                     vae_dir: str | Path | None = None, cinn_dir: str | Path | None = None) -> LayerCINN:
    """Train (or resume, or reuse) the cINN t(z | Φ_l(x)) of one layer.

    ``domain="low"``: z from the denoiser's cVAE (the latent pool of its output-level cINN);
    ``"high"``: z_y from the high-dose cVAE (:func:`train_target_vae` first). The ``cinn``
    section's settings, ``layerwise.iterations`` steps (null: the output layer of the low-dose
    domain is the trained cINN of 03_cinn.ipynb itself). Φ_l(x) is computed per batch from the
    pool's x (the denoiser frozen); validation NLL on ``cinn.n_val_crops`` crops picks best.pt.
    """
    name = cinn_name(denoiser, params)
    t0 = time.time()
    den, vae = load_models(name, params, dataset, vae_dir, denoiser_dir)
    size = params.vae.crop_size
    cond = None if layer == OUTPUT else LayerFeatures(den, layer, size)
    channels = feature_shape(den, layer, size)[0]
    if _reuses_output_cinn(params, layer, domain):
        cdir = stage_dir(params, "cinn", cinn_dir)
        model = load_cinn(name, params, dataset, cdir, vae_dir, denoiser_dir)
        return LayerCINN(layer, domain, model, None,
                         cinn_identity(name, params, dataset, cdir, vae_dir, denoiser_dir), 1, 0.0, None)
    dev = devices.module_device(vae)
    if domain == "high":
        vae = load_target_vae(name, params, dataset, out_dir, denoiser_dir)
    ckpt = checkpoint_dir(layer_dir(params, name, layer, domain, out_dir).parent,
                          layer_dir(params, name, layer, domain, out_dir).name, force)
    fp = layer_fingerprint(name, layer, domain, params, dataset, denoiser_dir, vae_dir, out_dir)
    n_pool = params.vae.spatial.pool_size(name)
    if n_pool:
        xy = _pool_xy(name, params, dataset, den, progress, denoiser_dir, with_y=domain == "high")
        if domain == "low":  # the output-level cINN's latent pool (cached there)
            cdir = stage_dir(params, "cinn", cinn_dir) / name
            lat = _latent_pool(vae, den, params, dataset, cdir,
                               cinn_fingerprint(name, params, dataset, vae_dir, denoiser_dir), progress,
                               name, denoiser_dir)
        else:
            lat = _target_latent_pool(vae, xy, ckpt.parent.parent / "target_vae" / "latent_pool.pt",
                                      target_vae_identity(name, params, dataset, out_dir, denoiser_dir),
                                      dev)
        yh_pool = xy["y_hat"].to(dev)
        # Φ_l of the pool's crops, once (float16; f is frozen, so they never change)
        feats = None if cond is None else _features(cond, xy["x"], dev, progress,
                                                    f"Φ({layer}) of the pool")
    model = build_layer_cinn(params, channels).to(dev)
    c = layer_params(params).cinn
    n_steps = _iterations(params)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
    mp = Precision(params.precision, dev)
    optimizers = mp.register({"cinn": opt})

    def fresh(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """z and the condition of a batch of fresh crops (no pool: ``vae.spatial.pool_crops`` 0)."""
        x, y = batch[0].to(dev), batch[1].to(dev)
        with torch.no_grad(), mp.autocast():
            y_hat = den(x)
            mu, lv = vae.encode(x if domain == "low" else y, y_hat)
            c_in = y_hat if cond is None else cond(x)
        mu, lv = mu.float(), lv.float()
        return mu + torch.exp(0.5 * lv) * distributed.randn_like(mu), c_in.float()

    def step_fn(step: int, batch: Any) -> dict[str, float]:
        if not n_pool:
            z, c_in = fresh(batch)
        else:
            mu = lat["mu"][batch]
            z = mu + torch.exp(0.5 * lat["logvar"][batch]) * distributed.randn_like(mu)
            c_in = yh_pool[batch] if feats is None else feats[batch].float()
        if not model.is_initialized:
            model.initialize(distributed.gather(z), distributed.gather(c_in))
        with mp.autocast():
            loss = model.nll_loss(z, c_in)
        if c.lr_final < 1.0:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, n_steps, c.lr, c.lr_final)
        mp.update(loss, opt, clip=c.grad_clip)
        return {"nll": loss.item()}

    x_val, y_val = _val_crops(params, dataset, c.n_val_crops)
    x_val, y_val = x_val.to(dev), y_val.to(dev)
    gen = torch.Generator().manual_seed(params.seed)
    if domain == "low":
        z_val, yh_val = encode_latents(vae, den, x_val, generator=gen)
    else:
        with torch.no_grad():
            yh_val = den(x_val)
            mu, lv = _latents(vae, y_val, yh_val)
        eps = torch.randn(mu.shape, generator=gen).to(dev)
        z_val = mu + torch.exp(0.5 * lv) * eps
    c_val = yh_val if cond is None else _features(cond, x_val, dev, False).float()

    def validate() -> float:
        with torch.no_grad():
            return float(model.nll_loss(z_val, c_val))

    batches = (pool_batches(params.seed, n_pool, c.batch_size) if n_pool else
               BatchStream(dataset, size, c.batch_size, seed=params.seed,
                           num_workers=params.loader.num_workers).iterate_from)
    result = train(step_fn, batches, n_steps, ckpt,
                   {"cinn": model}, optimizers, fp, seed=params.seed,
                   checkpoint_every=c.checkpoint_every, validate_fn=validate,
                   validate_every=c.validate_every, higher_is_better=False,
                   desc=f"cINN {name} | {layer} ({domain} dose)", progress=progress, device=dev)
    load_best(ckpt, {"cinn": model}, fp)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    identity = f"{fp}:{checkpoint_sha(best_checkpoint(ckpt))}"
    return LayerCINN(layer, domain, model, cond, identity, channels, time.time() - t0,
                     result.best_metric)


# --------------------------------------------------------------------------------------
# Sampling and measures
# --------------------------------------------------------------------------------------
def _set_path(params: Params, denoiser: str, layer: str, domain: Domain,
              out_dir: str | Path | None = None) -> Path:
    base = stage_dir(params, "layerwise", out_dir) / cinn_name(denoiser, params)
    return base / (f"{layer}.npz" if domain == "low" else f"target_{layer}.npz")


def sample_layer(denoiser: str, trained: LayerCINN, params: Params, dataset: CTDataset,
                 force: bool = False, progress: bool = True, out_dir: str | Path | None = None,
                 denoiser_dir: str | Path | None = None,
                 vae_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """``layerwise.n_invariances`` invariances of a layer on the first ``layerwise.n_crops`` test
    crops (:func:`invariscope.stages.invariances.sample_invariances_cached`; cached, resumable).
    High dose: the decoded images are ỹ (no f(x̃))."""
    name = cinn_name(denoiser, params)
    cfg = _cfg(params)
    den, vae = load_models(name, params, dataset, vae_dir, denoiser_dir)
    if trained.domain == "high":
        vae = load_target_vae(name, params, dataset, out_dir, denoiser_dir)
    crops = fixed_crops(dataset, "test", params.vae.crop_size, params.invariances.n_crops,
                        params.invariances.seed)[:cfg.n_crops]
    return inv.sample_invariances_cached(
        _set_path(params, name, trained.layer, trained.domain, out_dir), den, vae, trained.model,
        dataset, crops, cfg.n_invariances, params.invariances.batch_size, cfg.seed,
        models=trained.identity, chunk_crops=params.invariances.chunk_crops, force=force,
        progress=progress, outputs=trained.domain == "low", precision=params.precision,
        condition=trained.condition)


@torch.no_grad()
def layer_measures(result: Mapping[str, np.ndarray], features: nn.Module | None,
                   dataset: CTDataset) -> dict[str, Any]:
    """Per layer (low dose): the mean per-pixel SD over invariances, mean |x̃ − x|, mean
    |f(x̃) − f(x)| (HU), the relative change of the layer's own features ‖Φ(x̃) − Φ(x)‖ / ‖Φ(x)‖
    (how well the cINN keeps what the layer keeps; None for the output, see output change) and
    the per-crop SD (for :func:`monotonicity`)."""
    xt = result["x_tilde"].astype(np.float64)
    per_crop_sd = inv.invariance_sd(result["x_tilde"]).mean(axis=(1, 2))
    out = {"invariance_sd_hu": float(per_crop_sd.mean()), "per_crop_sd_hu": per_crop_sd.tolist(),
           "input_change_hu": float(np.abs(xt - result["x"][:, None]).mean()),
           "output_change_hu": float(np.abs(result["f_x_tilde"].astype(np.float64)
                                            - result["y_hat"][:, None]).mean())
           if result["f_x_tilde"].shape[1] else math.nan}
    rel = math.nan
    if features is not None:
        norm = Normalizer.of(dataset)
        dev = next((p.device for p in features.parameters()), torch.device("cpu"))
        num = den = 0.0
        for i in range(len(xt)):
            x = torch.as_tensor(norm(result["x"][i][None, None]), dtype=torch.float32, device=dev)
            xs = torch.as_tensor(norm(xt[i][:, None]), dtype=torch.float32, device=dev)
            fx, fxs = features(x), features(xs)
            num += float((fxs - fx).pow(2).sum())
            den += float(fx.pow(2).sum()) * len(xs)
        rel = math.sqrt(num / den) if den > 0 else math.nan
    out["feature_change_rel"] = rel
    return out


def target_measures(result: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per high-dose layer: mean per-pixel SD of ỹ, mean |ỹ − y|, mean |ỹ − f(x)|, mean |y − f(x)| (HU)."""
    yt = result["x_tilde"].astype(np.float64)
    return {"invariance_sd_hu": float(inv.invariance_sd(result["x_tilde"]).mean()),
            "change_vs_y_hu": float(np.abs(yt - result["y"][:, None]).mean()),
            "change_vs_f_x_hu": float(np.abs(yt - result["y_hat"][:, None]).mean()),
            "y_vs_f_x_hu": float(np.abs(result["y"] - result["y_hat"]).mean())}


def monotonicity(rows: Sequence[Mapping[str, Any]], z: float = 2.0) -> list[dict[str, Any]]:
    """Does the invariance SD shrink from one layer to the next? Per layer after the first: the
    paired (same crops) mean change of the per-crop SD, its standard error, and ``shrinks``:
    a decrease larger than ``z`` standard errors (False for the first layer)."""
    out, prev = [], None
    for r in rows:
        r = dict(r)
        cur = np.asarray(r["per_crop_sd_hu"], dtype=np.float64)
        if prev is None:
            r.update(sd_change_vs_previous_hu=math.nan, sd_change_se_hu=math.nan, shrinks=False)
        else:
            d = cur - prev
            se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
            r.update(sd_change_vs_previous_hu=float(d.mean()), sd_change_se_hu=se,
                     shrinks=bool(d.mean() < -z * (se if np.isfinite(se) else 0.0)))
        out.append(r)
        prev = cur
    return out


# --------------------------------------------------------------------------------------
# One denoiser, summaries
# --------------------------------------------------------------------------------------
def summary_path(params: Params, denoiser: str, out_dir: str | Path | None = None) -> Path:
    return stage_dir(params, "layerwise", out_dir) / f"{cinn_name(denoiser, params)}_summary.json"


def run_denoiser(denoiser: str, params: Params, dataset: CTDataset, force: bool = False,
                 progress: bool = True, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Every layer of ``denoiser`` (``layerwise.denoisers``): train, sample, measure; and its
    target domain when listed. Writes ``<denoiser>_summary.json`` (atomic) and returns it."""
    name = cinn_name(denoiser, params)
    cfg = _cfg(params)
    den, _ = load_models(name, params, dataset)
    rows, timings = [], {}
    for depth, layer in enumerate(cfg.denoisers[name]):
        trained = train_layer_cinn(name, layer, params, dataset, "low", force, progress, out_dir)
        res = sample_layer(name, trained, params, dataset, force, progress, out_dir)
        m = layer_measures(res, trained.condition or LayerFeatures(den, OUTPUT), dataset)
        rows.append({"denoiser": name, "depth": depth, "layer": layer, "channels": trained.channels,
                     **m})
        timings[layer] = round(trained.seconds, 1)
    summary: dict[str, Any] = {"denoiser": name, "layers": monotonicity(rows), "seconds": timings}
    t = cfg.target
    if t is not None and name in t.denoisers:
        vae_t = train_target_vae(name, params, dataset, force, progress, out_dir)
        _, vae_low = load_models(name, params, dataset)
        x_val, y_val = _val_crops(params, dataset, params.vae.n_val_crops)
        dev = devices.module_device(vae_t)
        x_val, y_val = x_val.to(dev), y_val.to(dev)
        with torch.no_grad():
            yh = den(x_val)
        std = Normalizer.of(dataset).std_hu
        summary["reconstruction_mae_hu"] = {
            "high-dose cVAE on y": reconstruction_mae_hu(vae_t, y_val, yh, std),
            "low-dose cVAE on y": reconstruction_mae_hu(vae_low, y_val, yh, std),
            "low-dose cVAE on x": reconstruction_mae_hu(vae_low, x_val, yh, std)}
        trows = []
        for depth, layer in enumerate(t.layers):
            trained = train_layer_cinn(name, layer, params, dataset, "high", force, progress, out_dir)
            res = sample_layer(name, trained, params, dataset, force, progress, out_dir)
            trows.append({"denoiser": name, "depth": depth, "layer": layer, **target_measures(res)})
            timings[f"target:{layer}"] = round(trained.seconds, 1)
        summary["target"] = trows
    atomic.write_text(summary_path(params, name, out_dir), json.dumps(summary, indent=1))
    return summary


def load_summaries(params: Params, out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The summaries of every denoiser of ``layerwise.denoisers`` that ``denoisers.methods`` runs."""
    out = []
    for name in methods_for(params):
        path = summary_path(params, name, out_dir)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run 08_layerwise.ipynb for {name} first "
                                    "(./run_all.sh --only layerwise)")
        out.append(json.loads(path.read_text()))
    return out


def methods_for(params: Params) -> list[str]:
    """The denoisers with layer-wise invariances in this run (listed and in denoisers.methods)."""
    return [d for d in _cfg(params).denoisers if d in params.denoisers.methods]


def layer_table(summaries: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``layerwise.csv``: one row per denoiser and layer (:data:`COLUMNS`)."""
    rows = [{k: r.get(k) for k in COLUMNS} for s in summaries for r in s["layers"]]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def target_table(summaries: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``layerwise_target.csv``: one row per denoiser and high-dose layer (:data:`TARGET_COLUMNS`)."""
    rows = [{k: r.get(k) for k in TARGET_COLUMNS} for s in summaries for r in s.get("target", [])]
    return pd.DataFrame(rows, columns=list(TARGET_COLUMNS))


def load_set(params: Params, denoiser: str, layer: str, domain: Domain = "low",
             out_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """A sampled layer set (for the figures)."""
    return inv.load_invariances(_set_path(params, denoiser, layer, domain, out_dir))


def write_tables(params: Params, summaries: Sequence[Mapping[str, Any]], fig_dir: Path) -> pd.DataFrame:
    """Write ``layerwise.csv`` (and ``layerwise_target.csv`` when there is a target domain)."""
    table = layer_table(summaries)
    atomic.write_text(fig_dir / "layerwise.csv", table.to_csv(index=False, float_format="%.4g"))
    tt = target_table(summaries)
    if len(tt):
        atomic.write_text(fig_dir / "layerwise_target.csv", tt.to_csv(index=False, float_format="%.4g"))
    return table


def progress_note(summaries: Sequence[Mapping[str, Any]]) -> str:
    """One line per denoiser: does the invariance SD ever shrink with depth?"""
    lines = []
    for s in summaries:
        bad = [r["layer"] for r in s["layers"] if r["shrinks"]]
        sds = " → ".join(f"{r['invariance_sd_hu']:.1f}" for r in s["layers"])
        lines.append(f"{s['denoiser']}: invariance SD {sds} HU; "
                     + ("never shrinks significantly" if not bad else f"shrinks at {', '.join(bad)}"))
    return "\n".join(lines)

