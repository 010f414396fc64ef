"""Profiles of hyperparameters: ``params/<profile>.yaml``, validated on load.

One YAML file per profile (``smoke``, ``default``, ``paper``) is the single source of truth for
every stage. Unknown keys, missing keys and out-of-range values raise :class:`ParamsError`
naming the file, the dotted key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from invariscope.config.paths import params_dir

PROFILES = ("smoke", "default", "paper")
#: The accepted ``device`` settings (see :mod:`invariscope.device`).
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(spec: str) -> str:
    """A ``device`` setting stripped and lowercased; ValueError naming the allowed values otherwise."""
    value = str(spec).strip().lower()
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {spec!r}")
    return value


class ParamsError(ValueError):
    """A parameter file is missing, malformed, or holds a wrong key or value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Options left out of dumps while they hold these values: options added after runs that
    #: predate them leave those runs' stamps and checkpoint fingerprints unchanged.
    off_values: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _drop_off_options(self, handler: Any) -> dict[str, Any]:
        off = self.off_values
        return {k: v for k, v in handler(self).items() if not (k in off and v == off[k])}


class _Scheduled(_Section):
    """Checkpoint and validation cadence of a trained stage."""

    checkpoint_every: int = Field(ge=1, description="steps between last.pt checkpoints")
    validate_every: int = Field(ge=1, description="steps between validations (their score picks "
                                "best.pt)")


class SplitParams(_Section):
    """Patients per split (patient-level split; the paper's is 35/10/5)."""

    train: int = Field(35, ge=1)
    val: int = Field(10, ge=1)
    test: int = Field(5, ge=1)


class SimulationParams(_Section):
    """Simulated chest low-dose CT cohort: phantom, geometry and dose physics."""

    image_size: int = Field(ge=32, le=1024, description="slice size in pixels")
    fov_mm: float = Field(gt=50, le=1000, description="reconstructed field of view (mm)")
    n_views: int = Field(ge=16, le=4096, description="projection angles over 180 degrees")
    n_detectors: int | None = Field(None, ge=16, description="detector bins; null = automatic")
    full_dose_photons: float = Field(gt=0, description="unattenuated photons per ray at full dose")
    dose_fraction: float = Field(gt=0, le=1, description="low dose as a fraction of full dose")
    electronic_noise_sd: float = Field(ge=0, description="Gaussian electronic noise SD (counts)")
    mu_water_per_mm: float = Field(gt=0, description="linear attenuation of water (1/mm)")
    fbp_filter: Literal["ram-lak", "shepp-logan", "hann"] = "ram-lak"
    slices_per_patient: tuple[int, int] = Field(description="[min, max] slices per patient")
    seed: int = 0

    @model_validator(mode="after")
    def _check_slices(self) -> "SimulationParams":
        lo, hi = self.slices_per_patient
        if not 1 <= lo <= hi:
            raise ValueError("slices_per_patient must be [min, max] with 1 <= min <= max")
        return self


class DataParams(_Section):
    """Which cohort to use and how to split it."""

    source: Literal["simulated", "mayo"] = "simulated"
    mayo_root: str | None = Field(None, description="path to LDCT-and-Projection-data (relative: "
                                  "to the repository root; --data: to the caller's folder)")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="bad DICOM input: stop with an error, or skip it and record it"
    )
    split: SplitParams = SplitParams()
    split_seed: int = 0
    simulation: SimulationParams


class LoaderParams(_Section):
    """Data loading of the training streams (crop sizes are set per stage: ``patch_size``,
    ``vae.crop_size``)."""

    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the main process)")


class _DenoiserTrainParams(_Section):
    """What every trained denoiser has: iterations, batch, patch and Adam settings."""

    iterations: int = Field(ge=1, description="generator (optimizer) steps")
    batch_size: int = Field(ge=1, description="training crops per step")
    patch_size: int = Field(ge=16, le=1024, description="side of the square training crops (px)")
    lr: float = Field(gt=0, description="Adam learning rate (all networks of the method)")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2")


class CNN10TrainParams(_DenoiserTrainParams):
    """CNN-10 trained with the MSE loss (paper: lr 1.58e-4, 86,188 it., batch 68, patch 92)."""


class REDCNNTrainParams(_DenoiserTrainParams):
    """RED-CNN trained with the MSE loss (paper: lr 9.58e-5, 92,994 it., batch 73, patch 128)."""

    patch_size: int = Field(ge=21, le=1024, description="side of the square training crops (px)")


class WGANVGGTrainParams(_DenoiserTrainParams):
    """WGAN-VGG: WGAN-GP critic + generator loss ``-critic(G(x)) + lambda_perceptual * VGG19``."""

    patch_size: int = Field(ge=29, le=1024, description="crop side (px); fixes the critic's FC size")
    lambda_perceptual: float = Field(ge=0, description="weight of the VGG19 conv5_4 L1 loss")
    lambda_pixel: float = Field(0.0, ge=0, description="weight of a pixel MSE term (not the "
                                "paper's: 0 there; the CPU profiles use a small one, which pins "
                                "the intensity that short adversarial training leaves free)")
    lambda_gp: float = Field(10.0, ge=0, description="WGAN-GP gradient-penalty weight")
    lr_final: float = Field(1.0, gt=0, le=1, description="cosine decay of both learning rates to "
                            "this fraction of lr by the last iteration (1: constant, the paper's)")
    critic_steps: int = Field(1, ge=1, description="critic updates per generator update")


class DUGANTrainParams(_DenoiserTrainParams):
    """DU-GAN: RED-CNN generator, image- and gradient-domain U-Net discriminators (LSGAN).

    Generator loss: ``lambda_adv * (adv_img + adv_grad) + lambda_px_im * MSE + lambda_px_grad *
    L1(Sobel)``. Discriminator loss: LSGAN on the global and per-pixel outputs (real 1, denoised 0,
    low dose 0) plus, with probability ``min(step / cutmix_warmup, 1) * cutmix_prob``, the CutMix
    terms (the consistency term weighted by ``lambda_cutmix``).
    """

    lambda_adv: float = Field(ge=0, description="weight of both adversarial generator losses")
    lambda_px_im: float = Field(1.0, ge=0, description="weight of the pixel MSE loss")
    lambda_px_grad: float = Field(ge=0, description="weight of the Sobel-gradient L1 loss")
    lambda_cutmix: float = Field(ge=0, description="weight of the CutMix consistency loss")
    cutmix_prob: float = Field(0.5, ge=0, le=1, description="CutMix probability after warm-up")
    cutmix_warmup: int = Field(ge=1, description="steps over which the CutMix probability ramps up")
    d_steps: int = Field(2, ge=1, description="image-discriminator updates per generator update "
                         "(the gradient discriminator is updated once, as in the authors' code)")
    disc_channels: int = Field(64, ge=4, description="U-Net discriminator base width (paper 64)")
    disc_depth: int = Field(6, ge=2, le=8, description="U-Net discriminator down blocks (paper 6); "
                            "crops need patch_size >= 2**disc_depth")

    @model_validator(mode="after")
    def _check_depth(self) -> "DUGANTrainParams":
        if self.patch_size < 2**self.disc_depth:
            raise ValueError(f"patch_size {self.patch_size} is smaller than 2**disc_depth = "
                             f"{2**self.disc_depth} (U-Net discriminator)")
        return self


BUILTIN_DENOISERS = ("cnn10", "redcnn", "wganvgg", "dugan", "gaussri")


class CustomDenoiserParams(_Section):
    """A user's own, already trained denoiser (README "Analyze your own denoiser")."""

    module: str = Field(
        pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$",
        description="where the torch module comes from: 'path/to/file.py:name' (relative to the "
        "params file, the repo root, or absolute) or 'package.module:name'; name is an nn.Module "
        "class or a function returning one, called with `kwargs`")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="arguments for `name`")
    weights: str | None = Field(
        None, description="state dict file (a plain state dict or a checkpoint with "
        "'model_state_dict', as ldct-benchmark writes; relative like `module`); null = use the "
        "module as built")
    input: Literal["normalized", "hu"] = Field(
        "normalized", description="what the module maps: 'normalized' = (HU - mean) / std of the "
        "data set to the same units (the companion's and ldct-benchmark's convention, Mayo mean "
        "-542.55 HU, std 502.19 HU), 'hu' = HU to HU")


class DenoisersParams(_Scheduled):
    """The denoisers a profile trains/uses, and their training settings."""

    methods: list[str] = Field(
        min_length=1, description="denoisers this profile runs: cnn10, redcnn, wganvgg, dugan, "
        "gaussri (needs no training) or a key of `custom`"
    )
    custom: dict[str, CustomDenoiserParams] = Field(
        default_factory=dict, description="your own trained denoisers by name (lowercase letters, "
        "digits, _), analyzed like the built-in ones without training")
    val_slices: int = Field(ge=1, description="full validation slices in the metric that picks best.pt")
    select_by: Literal["ssim", "psnr"] = Field(
        "ssim", description="validation metric that picks best.pt (lung window, as Table 1): ssim "
        "(the paper profile) or psnr, which also sees an intensity offset (the CPU profiles)")
    vgg_weights: str | None = Field(
        None, description="torchvision vgg19-dcbb9e9d.pth (relative to the repo root or absolute); "
        "null = a fixed random VGG19 (the run records vgg_pretrained: false)"
    )
    cnn10: CNN10TrainParams
    redcnn: REDCNNTrainParams
    wganvgg: WGANVGGTrainParams
    dugan: DUGANTrainParams

    @property
    def names(self) -> tuple[str, ...]:
        """Every denoiser a profile may name: the built-in ones, then the keys of ``custom``."""
        return BUILTIN_DENOISERS + tuple(self.custom)

    @model_validator(mode="after")
    def _check_methods(self) -> "DenoisersParams":
        for name in self.custom:
            if name in BUILTIN_DENOISERS or name in ("unconditional", "ld"):
                raise ValueError(f"custom denoiser {name!r}: the name is taken; choose another")
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"custom denoiser {name!r}: use lowercase letters, digits and _")
        unknown = [m for m in self.methods if m not in self.names]
        if unknown:
            raise ValueError(f"methods {unknown}: unknown denoiser; allowed values: "
                             f"{', '.join(self.names)} (own denoisers go under denoisers.custom)")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods}: a denoiser is listed twice")
        return self


class VAELossWeightParams(_Section):
    """Generator loss weights (paper: L1 0.0011852, KL 0.57504, perceptual 0.12102, adversarial 1).

    The L1 weight multiplies the per-sample pixel sum at 128x128 (the authors' reduction); other
    crop sizes keep the same balance (:class:`invariscope.models.vae.VAELossWeights`, ``scaled_mean``).
    """

    l1: float = Field(ge=0, description="weight of the L1 reconstruction term")
    kl: float = Field(ge=0, description="weight of the KL term (nats per image)")
    perceptual: float = Field(ge=0, description="weight of the VGG16 perceptual L1 term")
    adversarial: float = Field(ge=0, description="weight of the WGAN generator term -critic(x_rec)")


class SpatialVAEParams(_Section):
    """The spatial-latent cVAE (``vae.latent: spatial``; :mod:`invariscope.models.spatial`): architecture,
    ELBO and optimisation. Not the paper's design (a documented deviation, see the README)."""

    downsample: int = Field(4, ge=2, description="latent map at 1/downsample of the crop (a power of two)")
    latent_channels: int = Field(16, ge=1, description="channels of the latent map")
    encoder_width: int = Field(64, ge=1, description="width of the encoder's 3x3 convs")
    decoder_width: int = Field(64, ge=1, description="width of the decoder at the latent resolution")
    decoder_sd: float = Field(0.1, gt=0, description="fixed SD of the Gaussian decoder (normalized "
                              "units; 0.1 is about 47 HU on the default cohort)")
    batch_size: int = Field(ge=1, description="crops per step")
    iterations: int = Field(ge=1, description="optimizer steps")
    lr: float = Field(gt=0, description="Adam learning rate at the start of the cosine schedule")
    lr_final: float = Field(0.05, gt=0, le=1, description="the learning rate decays (cosine) to this "
                            "fraction of lr at the last step")
    grad_clip: float | None = Field(50.0, gt=0, description="clip the gradient norm (null = no clipping)")
    hflip: bool = Field(True, description="flip a random half of every batch horizontally (x and ŷ)")
    pool_crops: int = Field(
        0, ge=0, description="0 = fresh random training crops every step; N > 0 = draw every batch "
        "from N fixed patient-weighted training crops whose ŷ = f(x) is computed once (the "
        "denoiser's cINN trains on the same pool)")
    pool_crops_by_denoiser: dict[str, int] = Field(
        default_factory=dict, description="pool size for single denoisers (e.g. the costly RED-CNN "
        "family), overriding pool_crops")

    @model_validator(mode="after")
    def _check(self) -> "SpatialVAEParams":
        d = self.downsample
        if d & (d - 1):
            raise ValueError(f"downsample must be a power of two, got {d}")
        bad = {k: v for k, v in self.pool_crops_by_denoiser.items() if v < self.batch_size}
        if bad or (0 < self.pool_crops < self.batch_size):
            raise ValueError(f"pool_crops {self.pool_crops} / pool_crops_by_denoiser {bad}: a pool "
                             f"must be 0 or hold at least batch_size = {self.batch_size} crops")
        return self

    def pool_size(self, name: str) -> int:
        """The pool size of a denoiser's cVAE and cINN (0: fresh crops every step)."""
        return int(self.pool_crops_by_denoiser.get(name, self.pool_crops))


class VAEParams(_Scheduled):
    """(Conditional) VAE on [x, ŷ] and its WGAN-GP critic: architecture, losses, optimisation.

    The same section configures every cVAE (one per denoiser) and the unconditional VAE (the same
    model without ŷ). Architecture fields map onto :class:`invariscope.models.vae.VAEConfig`.
    """

    encoder: Literal["resnet50", "resnet-small"] = Field(
        description="ResNet-50 (paper, ImageNet-loadable) or a narrower ResNet of the same layout")
    encoder_width: int = Field(64, ge=1, description="stem width (resnet-small only; resnet50: 64)")
    encoder_layers: tuple[int, int, int, int] = Field(
        (1, 1, 1, 1), description="bottleneck blocks per stage (resnet-small only)")
    conv1_init: Literal["rgb_split", "random"] = Field(
        "random", description="first conv with ImageNet weights: 'random' (the authors: a new conv "
        "for [x, ŷ]) or 'rgb_split' (pretrained RGB filters summed and split over the inputs)")
    imagenet_weights: str | None = Field(
        None, description="torchvision resnet50-0676ba61.pth for the encoder (relative to the repo "
        "root or absolute); null = random initialisation (resnet-small is always random)")
    latent: Literal["global", "spatial"] = Field(
        "global", description="'global' (the paper): every cVAE has a global latent vector; "
        "'spatial': the cVAEs have a latent map (settings in vae.spatial) and the cINNs are "
        "convolutional (cinn.spatial). The unconditional VAE of s_VAE is global either way")
    spatial: SpatialVAEParams | None = Field(
        None, description="the spatial-latent cVAE (required with latent: spatial)")
    latent_dim: int = Field(ge=2, description="latent size (paper 256)")
    decoder_channels: int = Field(ge=1, description="BigGAN channel base (paper 96)")
    attention_resolution: int | None = Field(
        description="feature-map size of the decoder's self-attention (paper 64; null = none)")
    z_chunk: int = Field(20, ge=1, description="latent dims per decoder up-block (paper 20)")
    z_embed_classes: int = Field(1000, ge=0, description="shared z embedding classes (paper 1000; 0 = off)")
    z_embed_dim: int = Field(128, ge=1, description="shared z embedding size (paper 128)")
    critic_width: int = Field(ge=1, description="critic channels after the first conv (paper 64)")
    critic_max_width: int = Field(512, ge=1, description="critic channel cap (paper 512)")
    vgg16_weights: str | None = Field(
        None, description="torchvision vgg16-397923af.pth for the perceptual loss (relative to the "
        "repo root or absolute); null = a fixed random VGG16 (seeded; not the paper's loss)")
    crop_size: int = Field(ge=8, le=1024, description="square training crops, a power of two (paper 128)")
    batch_size: int = Field(ge=1, description="crops per step (paper 64)")
    iterations: int = Field(ge=1, description="generator steps (paper about 75,600)")
    lr: float = Field(gt=0, description="Adam learning rate of encoder and decoder (paper 1e-5)")
    critic_lr: float = Field(gt=0, description="Adam learning rate of the critic (paper 4e-5)")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 (paper 0.5)")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2 (paper 0.999)")
    weights: VAELossWeightParams
    critic_steps: int = Field(1, ge=1, description="critic updates per generator update (paper 1)")
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP weight (paper 10)")
    perceptual_every: int = Field(
        1, ge=1, description="compute the perceptual term on every k-th generator step only "
        "(1 = every step, as the paper; >1 saves VGG16 time on a CPU)")
    free_bits: float = Field(
        0.0, ge=0, description="KL floor per latent dim in nats (batch mean); 0 = plain KL as the "
        "paper. Not a paper setting: an anti-collapse option for short CPU runs")
    decoder_init: Literal["default", "identity"] = Field(
        "default", description="'default' (the paper) or 'identity': the cVAE decoder's output conv "
        "starts as x = ŷ (its ŷ weights a centred delta, its other weights scaled by 0.1). Not a "
        "paper setting: an option for short CPU runs")
    mode_seeking: float = Field(
        0.0, ge=0, description="weight of a mode-seeking term (Mao et al. 2019) on the cVAE decoder: "
        "a prior draw z' ~ N(0, I) is decoded with the same ŷ, the loss adds weight x mean(|μ - z'|₁ "
        "/ |D(z, ŷ) - D(z', ŷ)|₁) and the adversarial term of D(z', ŷ). 0 = off, as the paper")
    pool_crops: int = Field(
        0, ge=0, description="global cVAEs: train on this many fixed training crops whose ŷ = f(x) "
        "is computed once (cached in runs/<profile>/pools) instead of fresh crops with f(x) every "
        "step; 0 = fresh crops, as the paper. A deviation that saves f's work (benchmarks/README.md)")
    n_val_crops: int = Field(ge=1, description="fixed validation crops (reconstruction MAE in HU)")
    n_test_crops: int = Field(ge=2, description="fixed test crops of the reconstruction report")

    off_values: ClassVar[dict[str, Any]] = {"decoder_init": "default", "mode_seeking": 0.0,
                                            "latent": "global", "spatial": None, "pool_crops": 0}

    @model_validator(mode="after")
    def _check_architecture(self) -> "VAEParams":
        self.config(conditional=True)  # raises ValueError for a bad combination
        if (self.latent == "spatial") != (self.spatial is not None):
            raise ValueError("latent: spatial needs a vae.spatial section, latent: global none "
                             f"(latent is {self.latent!r})")
        if self.spatial is not None:
            self.spatial_config(conditional=True)
        if 0 < self.pool_crops < self.batch_size:
            raise ValueError(f"vae.pool_crops {self.pool_crops} must be 0 or >= vae.batch_size "
                             f"{self.batch_size}")
        if self.imagenet_weights is not None and self.encoder != "resnet50":
            raise ValueError("imagenet_weights needs encoder: resnet50 (resnet-small has no "
                             "ImageNet weights); set it to null")
        return self

    def config(self, conditional: bool) -> Any:
        """The :class:`invariscope.models.vae.VAEConfig` of this section."""
        # not a cycle: the models import torch, which loading a params file does not need
        from invariscope.models.vae import VAEConfig

        return VAEConfig(
            conditional=conditional, latent_dim=self.latent_dim, crop_size=self.crop_size,
            encoder=self.encoder, encoder_width=self.encoder_width,
            encoder_layers=self.encoder_layers, conv1_init=self.conv1_init,
            decoder_channels=self.decoder_channels, attention_resolution=self.attention_resolution,
            z_chunk=self.z_chunk, z_embed_classes=self.z_embed_classes, z_embed_dim=self.z_embed_dim,
            critic_width=self.critic_width, critic_max_width=self.critic_max_width,
            decoder_init=self.decoder_init,
        )

    def spatial_config(self, conditional: bool) -> Any:
        """The :class:`invariscope.models.spatial.SpatialVAEConfig` of ``vae.spatial`` (ValueError when
        there is none)."""
        from invariscope.models.spatial import SpatialVAEConfig  # imports torch (see config)

        sp = self.spatial
        if sp is None:
            raise ValueError("vae.spatial is not set (vae.latent is 'global')")
        return SpatialVAEConfig(conditional=conditional, crop_size=self.crop_size,
                                downsample=sp.downsample, latent_channels=sp.latent_channels,
                                encoder_width=sp.encoder_width, decoder_width=sp.decoder_width,
                                decoder_sd=sp.decoder_sd)


class SpatialCINNParams(_Section):
    """The convolutional cINN on the spatial latent (``vae.latent: spatial``; not the paper's)."""

    subnet_width: int = Field(64, ge=1, description="width of the coupling subnets (3x3, 1x1, 3x3 convs)")
    cond_width: int = Field(48, ge=1, description="width of the condition net over unshuffle(ŷ)")
    cond_channels: int = Field(32, ge=1, description="channels of the condition map")
    dilations: tuple[int, ...] = Field((1, 2, 4), min_length=1,
                                       description="dilations of the condition net's 3x3 convs")
    coarse_blocks: int = Field(0, ge=0, description="blocks at a second, coarser scale after the "
                               "n_blocks (Haar wavelets: 2 x 2 latent cells to 4x the channels); 0: one scale")

    off_values: ClassVar[dict[str, Any]] = {"coarse_blocks": 0}


class CINNParams(_Scheduled):
    """cINN t(z | ŷ) on the cVAE latents (paper Sec. 2.3.2, Supp. A.3; :mod:`invariscope.models.cinn`).

    Latent size and condition size come from the ``vae`` section (``latent_dim``, ``crop_size``).
    Paper: 12 blocks, subnet width 1024 with 2 hidden layers, embedder base 64 to a 256-d
    condition, clamp 1, LeakyReLU slope 0.9, Adam lr 1e-5, batch 128, about 47,000 steps.
    """

    n_blocks: int = Field(ge=1, description="flow blocks ActNorm-LeakyReLU-coupling-permute (paper 12)")
    hidden: int | None = Field(None, ge=1, description="width of the coupling subnets (paper 1024; "
                               "global latent only)")
    hidden_depth: int | None = Field(None, ge=0, description="hidden-to-hidden layers per subnet "
                                     "(paper 2; global latent only)")
    base_channels: int | None = Field(None, ge=1, description="condition embedder's first conv width "
                                      "(paper 64; global latent only)")
    cond_dim: int | None = Field(None, ge=1, description="size of the condition embedding of ŷ "
                                 "(paper 256; global latent only)")
    spatial: SpatialCINNParams | None = Field(
        None, description="the convolutional cINN (required with vae.latent: spatial)")
    n_down: int = Field(4, ge=1, le=7, description="stride-2 convs of the embedder (paper 4); "
                        "vae.crop_size must be divisible by 2**n_down")
    clamp: float = Field(1.0, gt=0, description="soft clamp of the coupling scale, clamp*tanh (paper 1)")
    leaky_slope: float = Field(0.9, gt=0, le=1, description="invertible LeakyReLU slope (paper 0.9)")
    coupling: Literal["rnvp", "glow"] = Field(
        "rnvp", description="'rnvp': double affine coupling with four subnets (the authors'); "
        "'glow': one subnet per half for scale and shift (about half the parameters)")
    lr: float = Field(gt=0, description="Adam learning rate of flow and embedder (paper 1e-5)")
    lr_final: float = Field(1.0, gt=0, le=1, description="cosine decay of the learning rate to this "
                            "fraction of lr at the last step (1 = constant, as the paper)")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2")
    grad_clip: float | None = Field(
        None, gt=0, description="clip the gradient norm to this value (null = no clipping, as "
        "the paper)")
    batch_size: int = Field(ge=2, description="latents per step (paper 128)")
    iterations: int = Field(ge=1, description="optimizer steps (paper about 47,000)")
    pool_crops: int = Field(
        0, ge=0, description="0 = fresh random training crops every step (the paper); N > 0 = draw "
        "each batch from N fixed training crops whose ŷ = f(x) and q(z | x, ŷ) are computed once "
        "(z resampled every step): a CPU saving, f(x) of RED-CNN/DU-GAN costs more than the step")
    n_val_crops: int = Field(ge=2, description="fixed validation crops of the NLL that picks best.pt")

    off_values: ClassVar[dict[str, Any]] = {"spatial": None, "lr_final": 1.0}


class InvariancesParams(_Section):
    """Sampling invariances x̃ = D(t⁻¹(v | ŷ), ŷ), v ~ N(0, I) (paper Sec. 2.3.3).

    Paper: 1000 random 128x128 test crops x 100 invariances per denoiser (crop size: ``vae``).
    """

    n_crops: int = Field(ge=1, description="random test crops per denoiser (paper 1000)")
    n_invariances: int = Field(ge=2, description="invariances per crop (paper 100)")
    batch_size: int = Field(ge=1, description="invariances decoded per forward pass")
    chunk_crops: int = Field(16, ge=1, description="crops per resumable chunk file")
    seed: int = Field(0, description="seed of the crops and of v")
    figure_crop: int = Field(0, ge=0, description="index of the crop shown in Figure 5")

    @model_validator(mode="after")
    def _check_crop(self) -> "InvariancesParams":
        if self.figure_crop >= self.n_crops:
            raise ValueError(f"figure_crop {self.figure_crop} must be < n_crops {self.n_crops}")
        return self


class EmbeddingParams(_Scheduled):
    """Learned embedding φ for s_DML (paper Sec. 2.4.2, Eq. 8): triplet loss, semi-hard mining.

    Anchors are low-dose training crops x, positives invariances x̃ of the same crop, negatives
    invariances of other crops (pooled over every denoiser of ``denoisers.methods``, sampled with
    each denoiser's cINN and cVAE). Paper: ImageNet ResNet-50, semi-hard mining; its margin and
    optimisation settings are in Supp. A.4, which is not available here.
    """

    backbone: Literal["resnet50", "resnet-small"] = Field(
        description="ResNet-50 (paper, ImageNet-loadable) or a narrower ResNet of the same layout")
    width: int = Field(64, ge=1, description="stem width (resnet-small only; resnet50: 64)")
    layers: tuple[int, int, int, int] = Field(
        (1, 1, 1, 1), description="bottleneck blocks per stage (resnet-small only)")
    imagenet_weights: str | None = Field(
        None, description="torchvision resnet50-0676ba61.pth (relative to the repo root or "
        "absolute; RGB filters of the first conv summed to one channel); null = random "
        "initialisation (resnet-small is always random)")
    embed_dim: int = Field(ge=2, description="size of the (L2-normalised) embedding")
    margin: float = Field(
        gt=0, description="triplet margin on L2 distances of unit vectors (the paper does not "
        "state it; our choice 0.2 follows FaceNet, Schroff et al. 2015)")
    n_train_crops: int = Field(ge=2, description="fixed training-split crops whose invariances "
                               "train φ")
    n_invariances: int = Field(ge=1, description="invariances per training crop and denoiser")
    crops_per_batch: int = Field(ge=2, description="P: crops (labels) per batch")
    invariances_per_crop: int = Field(ge=1, description="K: invariances per crop in a batch, "
                                      "drawn from the crop's invariances of all denoisers (at "
                                      "most n_invariances x the number of denoisers)")
    lr: float = Field(gt=0, description="Adam learning rate")
    iterations: int = Field(ge=1, description="optimizer steps")
    n_val_crops: int = Field(ge=2, description="fixed validation-split crops of the retrieval "
                             "score (chance level about 1 / n_val_crops)")
    seed: int = Field(0, description="seed of the crops and of v (training and validation sets)")

    @model_validator(mode="after")
    def _check(self) -> "EmbeddingParams":
        if self.imagenet_weights is not None and self.backbone != "resnet50":
            raise ValueError("imagenet_weights needs backbone: resnet50 (resnet-small has no "
                             "ImageNet weights); set it to null")
        if self.crops_per_batch > self.n_train_crops:
            raise ValueError(f"crops_per_batch {self.crops_per_batch} must be <= n_train_crops "
                             f"{self.n_train_crops}")
        return self


class AnalysisParams(_Section):
    """Invariance analysis: Table 2 and Figures 6/7 (paper Sec. 3.4)."""

    reference: str = Field(
        "redcnn", description="method tested against every other one in Table 2 (one-sided: "
        "it has more invariances; paper: RED-CNN): a built-in denoiser or a key of "
        "denoisers.custom")
    quantiles: tuple[float, ...] = Field(
        (0.125, 0.375, 0.625, 0.875), min_length=1, description="quantiles of s_VAE / s_DML "
        "whose crops Figures 6 / 7 show (midpoints of the four quarters)")
    batch_size: int = Field(64, ge=1, description="crops per encoder / embedding forward pass")

    @model_validator(mode="after")
    def _check(self) -> "AnalysisParams":
        if any(not 0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must lie in [0, 1], got {list(self.quantiles)}")
        return self


class OptimizedParams(_Section):
    """Invariances found by optimization in the input (talk 003; ``07_optimized_invariances.ipynb``):
    x_inv = argmin_x' d(f(x), f(x')) − α · min(d(x, x'), bound), x' from x + N(0, init_sd²), Adam.

    The crops are the first ``n_crops`` of the invariance stage's test crops, so the cINN's sets
    and these are compared on the same crops. Talk: 3,000 Adam iterations, distances MSE
    (bounded by +1), (1 − SSIM) / 2 and ImageNet VGG16 features.
    """

    denoisers: tuple[str, ...] = Field(
        min_length=1, description="denoisers whose invariances are optimized, those of "
        "denoisers.methods among them (the talk: cnn10, wganvgg, gaussri)")
    n_crops: int = Field(ge=1, description="the first n of the invariance stage's test crops "
                         "(<= invariances.n_crops)")
    restarts: int = Field(1, ge=1, description="independent starting points per crop (invariances "
                          "per crop)")
    batch_crops: int = Field(ge=1, description="crops optimized together (one checkpoint folder each)")
    distances: tuple[Literal["mse", "ssim", "vgg"], ...] = Field(
        min_length=1, description="the distances d: mse, ssim ((1 - SSIM) / 2), vgg (VGG16 features)")
    alpha: dict[Literal["mse", "ssim", "vgg"], float] = Field(
        description="α per distance: the weight of the input change (one entry per distance)")
    bound: float = Field(1.0, gt=0, description="d(x, x') counts up to this value (the talk: MSE "
                         "bounded by +1, normalized units)")
    init_sd: float = Field(0.01, ge=0, description="SD of the starting perturbation, normalized units "
                           "(the talk's N(0, 10^-2), read as SD 0.01 = 5 HU)")
    iterations: int = Field(ge=1, description="Adam steps (the talk: 3000)")
    lr: float = Field(gt=0, description="Adam learning rate (normalized units per step)")
    ssim_range_hu: float = Field(1500.0, gt=0, description="data range of SSIM in HU (the lung "
                                 "window's width)")
    vgg_layers: tuple[str, ...] = Field(("relu1_2", "relu2_2"), min_length=1,
                                        description="VGG16 layers of the vgg distance")
    vgg16_weights: str | None = Field(
        None, description="torchvision vgg16-397923af.pth (relative to the repo root or absolute); "
        "null = a fixed random VGG16 (not the talk's ImageNet network)")
    checkpoint_every: int = Field(100, ge=1, description="steps between last.pt checkpoints")
    seed: int = Field(0, description="seed of the starting perturbations")

    @model_validator(mode="after")
    def _check(self) -> "OptimizedParams":
        missing = [d for d in self.distances if d not in self.alpha]
        if missing:
            raise ValueError(f"alpha has no value for {', '.join(missing)}: give one per distance "
                             f"({', '.join(self.distances)})")
        if any(a <= 0 for a in self.alpha.values()):
            raise ValueError(f"alpha values must be > 0, got {dict(self.alpha)}")
        return self


class NaturalParams(_Scheduled):
    """Natural (on-manifold) invariances (talk 003): a conditional generator x_inv = G(x, z) trained
    per denoiser with a Wasserstein critic on low-dose patches, against
    MSE(f(x), f(x_inv)) − α · min(MSE(x, x_inv), bound) − λ_adv · critic(x_inv)."""

    iterations: int = Field(ge=1, description="generator steps")
    batch_size: int = Field(ge=1, description="low-dose training patches per step")
    patch_size: int = Field(ge=16, description="training patch side in px (the talk: 80)")
    lr: float = Field(gt=0, description="Adam learning rate of the generator")
    critic_lr: float = Field(gt=0, description="Adam learning rate of the critic")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 (both networks)")
    beta2: float = Field(0.9, gt=0, lt=1, description="Adam beta2 (both networks)")
    critic_steps: int = Field(1, ge=1, description="critic updates per generator step")
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP weight")
    alpha: float = Field(gt=0, description="weight of the input change MSE(x, x_inv)")
    bound: float = Field(1.0, gt=0, description="MSE(x, x_inv) counts up to this value")
    lambda_adv: float = Field(ge=0, description="weight of the critic's score in the generator loss")
    width: int = Field(ge=4, description="generator channels at full resolution")
    noise_channels: int = Field(ge=1, description="channels of the generator's noise z ~ N(0, 1)")
    critic_width: int = Field(ge=4, description="critic channels of its first layer")
    n_samples: int = Field(ge=1, description="invariances per test crop (draws of z)")
    n_val_crops: int = Field(ge=1, description="fixed validation crops of the objective that picks best.pt")
    seed: int = Field(0, description="seed of the generator's initial weights and of z")


class TargetDomainParams(_Section):
    """Target-domain invariances (talk 002): a second spatial cVAE learned on high-dose crops y
    (conditioned on ŷ = f(x) of their low-dose twins) and its cINNs conditioned on Φ_l(x): the
    high-dose images the denoiser's representation cannot tell apart."""

    denoisers: tuple[str, ...] = Field(min_length=1, description="denoisers with target-domain "
                                       "invariances (those of layerwise.denoisers among them)")
    layers: tuple[str, ...] = Field(("output",), min_length=1, description="layers the high-dose "
                                    "cINNs are conditioned on (module paths, or output)")
    vae_iterations: int = Field(ge=1, description="steps of the high-dose cVAE (its other settings: "
                                "vae.spatial)")


class LayerCINNParams(_Section):
    """Settings of the layer cINNs that differ from the ``cinn`` section (null: the cinn's)."""

    n_blocks: int | None = Field(None, ge=1, description="coupling blocks")
    subnet_width: int | None = Field(None, ge=4, description="channels of the coupling subnets")
    cond_width: int | None = Field(None, ge=4, description="channels of the condition network")
    batch_size: int | None = Field(None, ge=1, description="latents per step")
    lr: float | None = Field(None, gt=0, description="Adam learning rate")


class LayerwiseParams(_Section):
    """Layer-wise invariances (talk 002, after Rombach et al. 2020; ``08_layerwise.ipynb``): per
    denoiser f = Ψ ∘ Φ_l and listed layer l, a cINN t(z | Φ_l(x)) on the cVAE's latents, sampled
    like the output-level invariances on the first ``n_crops`` test crops."""

    denoisers: dict[str, tuple[str, ...]] = Field(
        description="per denoiser, its layers in forward order: module paths of the denoiser "
        "(e.g. cnn10: [layers.1, layers.3, output]) or output; those of denoisers.methods run")
    iterations: int | None = Field(
        None, ge=1, description="cINN steps per layer (its other settings: cinn); null: "
        "cinn.iterations, and the output layer reuses the trained cINN of 03_cinn.ipynb")
    cinn: LayerCINNParams = Field(default_factory=LayerCINNParams,
                                  description="layer cINNs' settings that differ from the cinn section "
                                  "(every layer, the output's too, then trains its own)")
    n_crops: int = Field(ge=1, description="the first n of the invariance stage's test crops "
                         "(<= invariances.n_crops)")
    n_invariances: int = Field(ge=2, description="invariances per crop and layer (the talk: 250)")
    figure_crop: int = Field(0, ge=0, description="the crop shown in the figures (< n_crops)")
    target: TargetDomainParams | None = Field(None, description="target-domain invariances; null: none")
    seed: int = Field(0, description="seed of the invariances' draws")

    @model_validator(mode="after")
    def _check(self) -> "LayerwiseParams":
        for den, layers in self.denoisers.items():
            if not layers:
                raise ValueError(f"layerwise.denoisers.{den}: list at least one layer")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layerwise.denoisers.{den}: a layer is listed twice ({', '.join(layers)})")
        if self.figure_crop >= self.n_crops:
            raise ValueError(f"layerwise.figure_crop {self.figure_crop} must be < n_crops {self.n_crops}")
        if self.target is not None:
            missing = [d for d in self.target.denoisers if d not in self.denoisers]
            if missing:
                raise ValueError(f"layerwise.target.denoisers {', '.join(missing)}: not in "
                                 f"layerwise.denoisers ({', '.join(self.denoisers)})")
        return self


class StageResources(_Section):
    """What one job asks a cluster for (``./run_all.sh --executor slurm``)."""

    mem_mb: int = Field(16000, ge=100, description="memory (MB)")
    runtime_min: int = Field(60, ge=1, description="wall-time limit (minutes)")
    gpus: int = Field(0, ge=0, le=16, description="GPUs")
    cpus: int = Field(4, ge=1, description="CPU cores (data-loader workers and the kernel)")


class ClusterParams(_Section):
    """Per-stage resources and retries for cluster executors (Snakemake's Slurm plugin); not part
    of any stamp. ``stages`` overrides ``default`` per stage name (data, denoiser, table1, vae,
    figure4, cinn, invariances, figure5, embedding, analysis)."""

    retries: int = Field(2, ge=0, le=10, description="resubmissions of a failed job")
    partition: str | None = Field(None, description="Slurm partition (null: the cluster's default)")
    account: str | None = Field(None, description="Slurm account (null: your default)")
    default: StageResources = Field(default_factory=StageResources)
    stages: dict[str, StageResources] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_stages(self) -> "ClusterParams":
        names = ("data", "denoiser", "table1", "vae", "figure4", "cinn", "invariances", "figure5",
                 "embedding", "analysis", "optimized", "methods", "layerwise", "layerwise_summary")
        unknown = [k for k in self.stages if k not in names]
        if unknown:
            raise ValueError(f"cluster.stages: unknown stage(s) {', '.join(unknown)}; stages are "
                             f"{', '.join(names)}")
        return self

    def resources(self, stage: str) -> dict[str, Any]:
        """Snakemake resources of a stage's jobs (the names the Slurm plugin reads)."""
        r = self.stages.get(stage, self.default)
        out: dict[str, Any] = {"mem_mb": r.mem_mb, "runtime": r.runtime_min, "cpus_per_task": r.cpus,
                               "gpu": r.gpus}
        if self.partition:
            out["slurm_partition"] = self.partition
        if self.account:
            out["slurm_account"] = self.account
        return out


class Params(_Section):
    """All parameters of one profile."""

    off_values: ClassVar[dict[str, Any]] = {"precision": "fp32", "optimized": None, "natural": None,
                                            "layerwise": None}

    seed: int = 1332
    device: str = Field("auto", description="where the networks run: 'auto' (a CUDA GPU when torch "
                        "sees one, else the CPU), 'cpu', 'cuda' or 'cuda:<index>'; the environment "
                        "variable INVARISCOPE_DEVICE overrides it; not part of any stamp")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="arithmetic of training and sampling on a GPU: fp32, bf16 (autocast) or "
        "fp16 (autocast with loss scaling); the losses' sensitive parts stay float32 "
        "(invariscope.precision)")
    data: DataParams
    loader: LoaderParams
    denoisers: DenoisersParams
    vae: VAEParams
    cinn: CINNParams
    invariances: InvariancesParams
    embedding: EmbeddingParams
    analysis: AnalysisParams
    optimized: OptimizedParams | None = Field(
        None, description="invariances by optimization in the input (07_optimized_invariances.ipynb); "
        "null: that stage and its summary are not run")
    natural: NaturalParams | None = Field(
        None, description="natural invariances of a trained generator (07_optimized_invariances.ipynb; "
        "needs optimized); null: not trained")
    layerwise: LayerwiseParams | None = Field(
        None, description="layer-wise and target-domain invariances (08_layerwise.ipynb); null: "
        "that stage and its summary are not run")
    cluster: ClusterParams = Field(default_factory=ClusterParams)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return check_device(value)

    @model_validator(mode="after")
    def _check_embedding_and_reference(self) -> "Params":
        pool = self.embedding.n_invariances * len(self.denoisers.methods)
        if self.embedding.invariances_per_crop > pool:
            raise ValueError(f"embedding.invariances_per_crop {self.embedding.invariances_per_crop} "
                             f"must be <= embedding.n_invariances x denoisers = {pool}")
        if self.analysis.reference not in self.denoisers.methods:
            raise ValueError(f"analysis.reference {self.analysis.reference!r} is not in denoisers.methods; "
                             f"set it to one of {', '.join(self.denoisers.methods)} (the method Table 2 "
                             "tests against the others)")
        return self

    @model_validator(mode="after")
    def _check_optimized(self) -> "Params":
        opt = self.optimized
        if opt is None:
            if self.natural is not None:
                raise ValueError("natural needs an optimized section (its denoisers and crops)")
            return self
        unknown = [d for d in opt.denoisers if d not in self.denoisers.names]
        if unknown:  # names outside denoisers.methods are skipped (a profile may run fewer)
            raise ValueError(f"optimized.denoisers {', '.join(unknown)}: unknown; allowed: "
                             f"{', '.join(self.denoisers.names)}")
        if opt.n_crops > self.invariances.n_crops:
            raise ValueError(f"optimized.n_crops {opt.n_crops} must be <= invariances.n_crops "
                             f"{self.invariances.n_crops} (the same test crops as the cINN's)")
        return self

    @model_validator(mode="after")
    def _check_layerwise(self) -> "Params":
        lw = self.layerwise
        if lw is None:
            return self
        unknown = [d for d in lw.denoisers if d not in self.denoisers.names]
        if unknown:
            raise ValueError(f"layerwise.denoisers {', '.join(unknown)}: unknown; allowed: "
                             f"{', '.join(self.denoisers.names)}")
        if lw.n_crops > self.invariances.n_crops:
            raise ValueError(f"layerwise.n_crops {lw.n_crops} must be <= invariances.n_crops "
                             f"{self.invariances.n_crops} (the same test crops as the cINN's)")
        if self.vae.latent != "spatial":
            raise ValueError("layerwise needs vae.latent: spatial (its cINNs are convolutional and "
                             "train on the spatial cVAE's pool; params/paper_spatial.yaml at paper "
                             "scale); remove the layerwise section")
        return self

    @model_validator(mode="after")
    def _check_cinn_vs_vae(self) -> "Params":
        c = self.cinn
        if self.vae.latent == "spatial":
            if c.spatial is None:
                raise ValueError("vae.latent: spatial needs a cinn.spatial section (the "
                                 "convolutional cINN)")
            if c.pool_crops:
                raise ValueError(f"cinn.pool_crops {c.pool_crops}: with vae.latent: spatial the cINN "
                                 "trains on the cVAE's pool (vae.spatial.pool_crops); remove it")
            return self
        if c.spatial is not None:
            raise ValueError("cinn.spatial applies to vae.latent: spatial only; remove it")
        missing = [k for k in ("hidden", "hidden_depth", "base_channels", "cond_dim")
                   if getattr(c, k) is None]
        if missing:
            raise ValueError(f"cinn.{', cinn.'.join(missing)}: required with vae.latent: global "
                             "(the paper's cINN)")
        if 0 < self.cinn.pool_crops < self.cinn.batch_size:
            raise ValueError(f"cinn.pool_crops {self.cinn.pool_crops} must be 0 or >= cinn.batch_size "
                             f"{self.cinn.batch_size}")
        size = self.vae.crop_size
        if size % 2**self.cinn.n_down:
            raise ValueError(f"cinn.n_down {self.cinn.n_down}: vae.crop_size {size} must be divisible "
                             f"by 2**n_down = {2**self.cinn.n_down}")
        return self

    # Filled in by load_params, not by the YAML file.
    profile: str = Field("", exclude=True)
    source_file: str = Field("", exclude=True)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the (sub)model that holds the key at ``loc`` (for 'extra key' errors)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        if get_origin(current) is not None:  # Optional[...] and friends
            subs = [a for a in get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
            current = subs[0] if subs else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [k for k, f in current.model_fields.items() if not f.exclude]
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, e["loc"])
            msg = "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            # a check of the section at `key` (none: the top level); its message names the keys
            # and values concerned, so the whole section is not dumped after it
            msg = msg.removeprefix("Value error, ")
            if not e["loc"]:
                lines.append(f"  - {msg}")
                continue
        else:
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  - {key}: {msg}")
    return "\n".join(lines)


def _deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if "." in key:
            head, rest = key.split(".", 1)
            out[head] = _deep_update(dict(out.get(head) or {}), {rest: value})
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def profile_path(profile: str | Path) -> Path:
    """The YAML file of a profile name (``params/<name>.yaml``) or an explicit path."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml"):
        return p.expanduser().resolve()
    return params_dir() / f"{profile}.yaml"


def load_params(profile: str | Path = "default", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate a profile.

    ``profile`` is a profile name (``smoke``, ``default``, ``paper`` or any ``params/<name>.yaml``)
    or a path to a YAML file. ``overrides`` maps dotted keys (``"data.source"``) or nested dicts
    to values applied on top of the file, validated the same way. A file may start from another
    profile (``base: default``) and name its run folder (``run_name``); see :func:`_read_raw`.
    """
    path = profile_path(profile)
    raw = _read_raw(path, [])
    run_name = raw.pop("run_name", None) or path.stem
    if not isinstance(run_name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", run_name):
        raise ParamsError(f"{path}: run_name {run_name!r} must be a plain folder name")
    data = _deep_update(raw, overrides or {})
    try:  # strict JSON-mode types: no bool or string coerced to a number, lists for tuples
        text = json.dumps(data)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"{path}: a value is not a number, string, list or mapping ({exc})") from None
    try:
        params = Params.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise ParamsError(_format_errors(exc, str(path))) from None
    return params.model_copy(update={"profile": run_name, "source_file": str(path)})


def _read_raw(path: Path, chain: list[Path]) -> dict[str, Any]:
    """A YAML file's mapping, merged over its ``base`` profile (recursively) if it names one.

    Loader keys: ``base`` (a profile name or a YAML path relative to this file: start from it and
    override only what this file sets) and ``run_name`` (the folder under ``runs/`` and
    ``figures/``; default: the file name without suffix).
    """
    if not path.is_file():
        names = sorted(p.stem for p in params_dir().glob("*.yaml"))
        raise ParamsError(f"no parameter file {path}; available profiles: {', '.join(names)}")
    if path in chain:
        raise ParamsError(f"{path}: 'base' profiles form a cycle ({' -> '.join(map(str, chain))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    for reserved in ("profile", "source_file"):
        if reserved in raw:
            raise ParamsError(f"{path}: key '{reserved}' is set by the loader; remove it")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ParamsError(f"{path}: base must be a profile name or a YAML path, got {base!r}")
    base_path = profile_path(base)
    if Path(base).suffix in (".yaml", ".yml") and not Path(base).expanduser().is_absolute():
        base_path = (path.parent / Path(base).expanduser()).resolve()
    inherited = _read_raw(base_path, [*chain, path])
    inherited.pop("run_name", None)
    return _deep_update(inherited, raw)


def digest(section: BaseModel | dict[str, Any], length: int = 12) -> str:
    """A short, stable hash of a parameter section (cache keys, checkpoint compatibility)."""
    payload = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]
