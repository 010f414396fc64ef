"""Spatial-latent (conditional) VAE and convolutional cINN: a latent with a place.

The paper's cVAE carries its latent as one global vector injected through conditional batch norm;
at CPU scale such a vector of a few dozen numbers cannot carry a 64² noise realization, and
batch-norm modulation varies the whole crop at once. Invariances of a CT denoiser are local
(noise, texture and structures at a place), so this design gives the latent a place:

* **latent** z: a map of ``latent_channels`` at 1/``downsample`` of the crop's resolution
  (16 × 16 × 16 for 64² crops: as many numbers as pixels);
* **encoder** q(z | x, ŷ): pixel-unshuffle (× ``downsample``) of [x, ŷ, x − ŷ], three 3×3 convs
  with LeakyReLU(0.2), a 3×3 conv to mean and log-variance (clamped to [−12, 6]), plus a linear
  1×1 path from unshuffle(x − ŷ) to the mean (unconditional: x alone);
* **decoder** D(z, ŷ): convs at the latent resolution on [z, unshuffle(ŷ)], pixel-shuffle ×2
  up-steps with ŷ (unshuffled to each scale) concatenated before each, a 3×3 output conv; the
  output is ŷ + that + a linear 1×1 + pixel-shuffle path from z (a residual around ŷ);
* **loss**: the ELBO with a Gaussian decoder of fixed SD (``decoder_sd``, normalized units) and
  the analytic KL (:func:`elbo_terms`); no adversarial or perceptual term;
* **cINN** t(z | ŷ): FrEIA ``SequenceINN`` of ``AllInOneBlock`` s on the latent map (conv
  subnets 3×3 → 1×1 → 3×3, the last zero-initialized, soft permutation), conditioned on a conv
  net over unshuffle(ŷ) with dilations, whose output has the latent's resolution
  (:class:`ConvolutionalINN`): cell by cell, it learns what ŷ pins down and what it leaves free.

Both classes expose the interface of their global counterparts
(:class:`invariscope.models.vae.ConditionalVAE`, :class:`invariscope.models.cinn.ConditionalINN`):
``encode``/``decode``/``forward``/``reparameterize``/``latent_shape`` and
``embed``/``forward_embedded``/``inverse_embedded``/``nll_loss``/``sample_embedded``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from invariscope import distributed
from invariscope.models.vae import check_condition
from invariscope.precision import Float32Sequential, float32_except_subnets, full

__all__ = ["SpatialVAEConfig", "SpatialVAE", "ConditionEncoder", "ConvolutionalINN", "elbo_terms",
           "SPATIAL_LOGVAR_MIN", "SPATIAL_LOGVAR_MAX"]

SPATIAL_LOGVAR_MIN, SPATIAL_LOGVAR_MAX = -12.0, 6.0


@dataclass(frozen=True)
class SpatialVAEConfig:
    """Architecture of a spatial-latent (c)VAE (see the module docstring)."""

    conditional: bool = True
    crop_size: int = 64
    downsample: int = 4
    latent_channels: int = 16
    encoder_width: int = 64
    decoder_width: int = 64
    decoder_sd: float = 0.1

    def __post_init__(self) -> None:
        d = self.downsample
        if d < 2 or d & (d - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {d}")
        if self.crop_size % d or self.crop_size < 2 * d:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of downsample {d} "
                             "and at least twice it")
        if min(self.latent_channels, self.encoder_width, self.decoder_width) < 1:
            raise ValueError("latent_channels, encoder_width and decoder_width must be >= 1")
        if not self.decoder_sd > 0:
            raise ValueError(f"decoder_sd must be > 0, got {self.decoder_sd}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of z."""
        s = self.crop_size // self.downsample
        return (self.latent_channels, s, s)

    @property
    def latent_dim(self) -> int:
        """Number of latent values per crop."""
        return int(np.prod(self.latent_shape))

    @property
    def n_up(self) -> int:
        """Pixel-shuffle ×2 up-steps from the latent resolution to the crop."""
        return int(math.log2(self.downsample))


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class SpatialVAE(nn.Module):
    """(Conditional) VAE with a latent feature map; images ``(B, 1, S, S)`` in normalized units."""

    def __init__(self, config: SpatialVAEConfig) -> None:
        super().__init__()
        self.config = config
        d, c, w = config.downsample, config.latent_channels, config.encoder_width
        k = d * d  # channels of one unshuffled image
        n_in = 3 if config.conditional else 1
        self.encoder = nn.Sequential(
            nn.Conv2d(n_in * k, w, 3, padding=1), _act(),
            nn.Conv2d(w, w, 3, padding=1), _act(),
            nn.Conv2d(w, w, 3, padding=1), _act(),
            nn.Conv2d(w, 2 * c, 3, padding=1))
        self.encoder_linear = nn.Conv2d(k, c, 1)  # unshuffle(x − ŷ) (or x) -> mean
        dw, yc = config.decoder_width, (1 if config.conditional else 0)
        self.decoder_in = nn.Sequential(
            nn.Conv2d(c + yc * k, dw, 3, padding=1), _act(),
            nn.Conv2d(dw, dw, 3, padding=1), _act())
        ups = []
        ch = dw
        for i in range(config.n_up):
            out = max(dw // 2 ** (i + 1), 16)
            scale = d // 2 ** (i + 1)  # unshuffle factor of ŷ at this step's output resolution
            ups.append(nn.ModuleDict({
                "up": nn.Conv2d(ch, 4 * out, 3, padding=1),
                "conv": nn.Conv2d(out + yc * scale * scale, out, 3, padding=1),
            }))
            ch = out
        self.decoder_up = nn.ModuleList(ups)
        self.decoder_out = nn.Conv2d(ch + yc, 1, 3, padding=1)
        self.decoder_linear = nn.Conv2d(c, k, 1)  # z -> pixel-shuffle(d) -> image

    # ------------------------------------------------------------------ helpers
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.latent_shape

    def _check(self, y_hat: Tensor | None, ref: tuple[int, ...], what: str) -> None:
        check_condition(self.config.conditional, y_hat, ref, what)

    # ------------------------------------------------------------------ model
    def encode(self, x: Tensor, y_hat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and clamped log-variance, each ``(B, *latent_shape)``."""
        s = self.config.crop_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"x must be (B, 1, {s}, {s}), got {tuple(x.shape)}")
        self._check(y_hat, tuple(x.shape), "encode")
        d = self.config.downsample
        if y_hat is None:
            inp, lin = x, x
        else:
            inp, lin = torch.cat((x, y_hat, x - y_hat), dim=1), x - y_hat
        h = self.encoder(F.pixel_unshuffle(inp, d))
        mu, logvar = h.chunk(2, dim=1)
        mu = mu + self.encoder_linear(F.pixel_unshuffle(lin, d))
        return mu, logvar.clamp(SPATIAL_LOGVAR_MIN, SPATIAL_LOGVAR_MAX)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """``mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` (global torch RNG; drawn for the
        global batch under data-parallel training, :func:`invariscope.distributed.randn_like`)."""
        return mu + torch.exp(0.5 * logvar) * distributed.randn_like(mu)

    def decode(self, z: Tensor, y_hat: Tensor | None = None) -> Tensor:
        """Image ``(B, 1, S, S)`` from z ``(B, *latent_shape)``: ŷ + convs(z, ŷ) + linear(z)."""
        shape = self.latent_shape
        if z.dim() != 4 or tuple(z.shape[1:]) != shape:
            raise ValueError(f"z must be (B, {', '.join(map(str, shape))}), got {tuple(z.shape)}")
        s, d = self.config.crop_size, self.config.downsample
        self._check(y_hat, (z.shape[0], 1, s, s), "decode")
        h = z if y_hat is None else torch.cat((z, F.pixel_unshuffle(y_hat, d)), dim=1)
        h = self.decoder_in(h)
        for i, block in enumerate(self.decoder_up):
            h = F.leaky_relu(F.pixel_shuffle(block["up"](h), 2), 0.2)
            scale = d // 2 ** (i + 1)
            if y_hat is not None:
                h = torch.cat((h, F.pixel_unshuffle(y_hat, scale) if scale > 1 else y_hat), dim=1)
            h = F.leaky_relu(block["conv"](h), 0.2)
        if y_hat is not None:
            h = torch.cat((h, y_hat), dim=1)
        out = self.decoder_out(h) + F.pixel_shuffle(self.decoder_linear(z), d)
        return out if y_hat is None else y_hat + out

    def forward(self, x: Tensor, y_hat: Tensor | None = None,
                sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_rec, mu, logvar)``; ``sample=False`` decodes the posterior mean."""
        mu, logvar = self.encode(x, y_hat)
        z = self.reparameterize(mu, logvar) if sample else mu
        return self.decode(z, y_hat), mu, logvar


def elbo_terms(x: Tensor, x_rec: Tensor, mu: Tensor, logvar: Tensor,
               decoder_sd: float) -> dict[str, Tensor]:
    """Negative ELBO of a Gaussian decoder with fixed SD, per pixel (nats / pixel, batch mean).

    ``rec`` = Σ (x − x_rec)² / (2σ²) (the constant log(σ√2π) left out), ``kl`` = analytic
    KL(q ‖ N(0, I)) summed over the latent; both divided by the number of pixels; ``total`` their
    sum.
    """
    n_pix = x[0].numel()
    x, x_rec, mu, logvar = full(x), full(x_rec), full(mu), full(logvar)  # autocast: float32
    rec = (x - x_rec).pow(2).flatten(1).sum(1).mean() / (2.0 * decoder_sd**2) / n_pix
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean() / n_pix
    return {"rec": rec, "kl": kl, "total": rec + kl}


# --------------------------------------------------------------------------------------
# Convolutional cINN
# --------------------------------------------------------------------------------------
class ConditionEncoder(nn.Module):
    """Conv net over unshuffle(ŷ) to a condition map at the latent's resolution.

    ``in_channels`` > 1: the condition is a feature map Φ_l(x) of the crop's size (layer-wise
    invariances, :class:`invariscope.models.layers.LayerFeatures`); more than ``squeeze``
    channels are first projected to ``squeeze`` by a learned 1×1 convolution.

    3×3 convs of ``width`` with the given ``dilations`` (LeakyReLU 0.2 after each), then a 1×1
    conv to ``out_channels``.
    """

    def __init__(self, downsample: int, width: int, out_channels: int,
                 dilations: Sequence[int] = (1, 2, 4), in_channels: int = 1,
                 squeeze: int = 8) -> None:
        super().__init__()
        self.downsample = downsample
        # a feature map wider than ``squeeze`` channels: a learned 1×1 projection at full
        # resolution first (a 3×3 conv over C·d² unshuffled channels would cost C times more)
        self.squeeze = (nn.Conv2d(in_channels, squeeze, 1) if in_channels > squeeze else None)
        layers: list[nn.Module] = []
        ch = min(in_channels, squeeze) * downsample * downsample
        for dil in dilations:
            layers += [nn.Conv2d(ch, width, 3, padding=dil, dilation=dil), _act()]
            ch = width
        layers.append(nn.Conv2d(ch, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, y_hat: Tensor) -> Tensor:
        if self.squeeze is not None:
            y_hat = self.squeeze(y_hat)
        return self.net(F.pixel_unshuffle(y_hat, self.downsample))


def _conv_subnet(width: int):
    """FrEIA subnet factory: 3×3 → 1×1 → 3×3 convs of ``width``, the last zero-initialized."""

    def make(c_in: int, c_out: int) -> nn.Module:
        last = nn.Conv2d(width, c_out, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return Float32Sequential(nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(),  # coupling
                                 nn.Conv2d(width, width, 1), nn.ReLU(), last)  # math in float32

    return make


class ConvolutionalINN(nn.Module):
    """cINN ``v = t(z | ŷ)`` on a latent map ``(C, h, w)``, conditioned on a map of ŷ's features.

    FrEIA ``AllInOneBlock`` s (affine coupling with soft clamping, a learned global affine
    transform and a soft (random orthogonal) channel permutation, all with exact
    log-determinants); the condition map is concatenated to the coupling subnets' input cell by
    cell. There is no data-initialized layer: the model samples as soon as it is built.
    """

    def __init__(self, latent_shape: Sequence[int], downsample: int, n_blocks: int = 8,
                 subnet_width: int = 64, cond_width: int = 48, cond_channels: int = 32,
                 dilations: Sequence[int] = (1, 2, 4), clamp: float = 2.0, seed: int = 0,
                 coarse_blocks: int = 0, cond_in_channels: int = 1) -> None:
        super().__init__()
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.latent_dim = int(np.prod(self.latent_shape))
        _, h, w = self.latent_shape
        if coarse_blocks < 0:
            raise ValueError(f"coarse_blocks must be >= 0, got {coarse_blocks}")
        if coarse_blocks and (h % 2 or w % 2):
            raise ValueError(f"coarse_blocks need an even latent map, got {h} x {w}")
        self.coarse_blocks = int(coarse_blocks)
        self.config = dict(latent_shape=self.latent_shape, downsample=downsample, n_blocks=n_blocks,
                           subnet_width=subnet_width, cond_width=cond_width,
                           cond_channels=cond_channels, dilations=tuple(dilations), clamp=clamp,
                           coarse_blocks=self.coarse_blocks, cond_in_channels=cond_in_channels)
        self.embedder = ConditionEncoder(downsample, cond_width, cond_channels, dilations,
                                         in_channels=cond_in_channels)
        np_state = np.random.get_state()  # soft permutations draw from NumPy's global RNG
        try:
            np.random.seed(seed)
            flow = Ff.SequenceINN(*self.latent_shape)

            def blocks(count: int, scale: int) -> None:  # condition ``scale`` at 1 / 2**scale
                for _ in range(count):
                    flow.append(Fm.AllInOneBlock, cond=scale,
                                cond_shape=(cond_channels, h >> scale, w >> scale),
                                subnet_constructor=_conv_subnet(subnet_width), affine_clamping=clamp,
                                permute_soft=True)

            blocks(n_blocks, 0)
            if self.coarse_blocks:
                # a second scale: Haar wavelets turn 2 x 2 cells into 4c channels at half the
                # resolution (orthonormal: log-det 0), so each coupling there sees twice the
                # distance; the inverse transform restores the latent's shape for v
                flow.append(Fm.HaarDownsampling, order_by_wavelet=True)
                blocks(self.coarse_blocks, 1)
                flow.append(Fm.HaarUpsampling, order_by_wavelet=True)
        finally:
            np.random.set_state(np_state)
        self.flow = flow

    is_initialized = True  # no data-initialized layers

    def initialize(self, z: Tensor, y_hat: Tensor) -> None:  # noqa: ARG002 - interface
        """Nothing to initialize (the interface of :class:`invariscope.models.cinn.ConditionalINN`)."""

    def _check_z(self, z: Tensor) -> None:
        if z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected z of shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")

    def embed(self, y_hat: Tensor) -> Tensor:
        """Condition map (B, cond_channels, h, w) of ŷ (B, 1, S, S)."""
        return self.embedder(y_hat)

    def _conditions(self, cond: Tensor) -> list[Tensor]:
        """The condition map per scale: itself, and its 2 x 2 means for the coarse blocks."""
        return [cond, F.avg_pool2d(cond, 2)] if self.coarse_blocks else [cond]

    def forward_embedded(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(v, log|det ∂v/∂z|)`` for latents z and a precomputed condition map."""
        self._check_z(z)
        with float32_except_subnets(z.device.type):  # the flow's arithmetic in float32
            return self.flow(full(z), c=self._conditions(full(cond)), jac=True)

    def forward(self, z: Tensor, y_hat: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_embedded(z, self.embed(y_hat))

    def inverse_embedded(self, v: Tensor, cond: Tensor) -> Tensor:
        """``z = t⁻¹(v | ŷ)`` for a precomputed condition map."""
        self._check_z(v)
        with float32_except_subnets(v.device.type):
            z, _ = self.flow(full(v), c=self._conditions(full(cond)), rev=True, jac=False)
        return z

    def inverse(self, v: Tensor, y_hat: Tensor) -> Tensor:
        return self.inverse_embedded(v, self.embed(y_hat))

    def nll_loss(self, z: Tensor, y_hat: Tensor, per_dim: bool = False) -> Tensor:
        """``mean(½‖v‖²) − mean(log|det J|)`` in nats per sample (``per_dim``: per latent value)."""
        v, log_jac_det = self.forward(z, y_hat)
        v, log_jac_det = full(v), full(log_jac_det)  # float32 under autocast too
        loss = 0.5 * v.pow(2).flatten(1).sum(dim=1).mean() - log_jac_det.mean()
        return loss / self.latent_dim if per_dim else loss

    def log_prob(self, z: Tensor, y_hat: Tensor) -> Tensor:
        """Exact per-sample ``log p(z | ŷ)`` in nats."""
        v, log_jac_det = self.forward(z, y_hat)
        return (-0.5 * v.pow(2).flatten(1).sum(dim=1) - 0.5 * self.latent_dim * math.log(2 * math.pi)
                + log_jac_det)

    def sample_embedded(self, cond: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` latents per condition: (B, n, C, h, w); v drawn on the generator's device."""
        b = cond.shape[0]
        where = generator.device if generator is not None else cond.device
        v = torch.randn(b * n, *self.latent_shape, generator=generator, device=where,
                        dtype=cond.dtype).to(cond.device)
        z = self.inverse_embedded(v, cond.repeat_interleave(n, dim=0))
        return z.view(b, n, *self.latent_shape)

    def sample(self, y_hat: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` invariance latents per crop; ŷ (B, 1, S, S) → (B, n, C, h, w)."""
        return self.sample_embedded(self.embed(y_hat), n, generator)
