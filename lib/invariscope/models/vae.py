"""Conditional VAE (ResNet encoder, BigGAN decoder), its WGAN-GP critic and its losses.

Paper Sec. 2.3.1 / Supp. A.2 and the authors' code (``ldctinv/vae``):

* Encoder q(z | x, ŷ): ImageNet ResNet-50 whose first conv takes [x, ŷ] (2 channels; 1 for the
  unconditional VAE), global average pooling, a linear head to mean and log-variance of a 256-d
  latent; the log-variance is clamped to [-30, 10].
* Decoder p(x | z, ŷ): BigGAN-128 generator (channel base 96) with hierarchical z (one chunk for
  the initial linear layer, one per up-block), conditional batch norm whose gain and bias come from
  [chunk, shared embedding of the whole z], self-attention at 64x64, and ŷ resized and
  concatenated as an extra channel before every up-block and before the output conv.
  One output channel in normalized units, no final activation.
* Critic: [image, ŷ] -> conv 4x4 stride 2 stack with instance norm and LeakyReLU(0.2) -> scalar;
  WGAN-GP with lambda = 10.
* Generator loss: ``w_l1 * L1 + w_kl * KL + w_perc * perceptual + w_adv * (-critic(fake))``.

Loss reduction (see :class:`VAELossWeights`): the authors sum the L1 over pixels and average over
the batch (``torch.sum(|x - x_rec|) / B``), sum the KL over latent dimensions and average over the
batch, take the perceptual loss as a sum over VGG layers of per-element means, and the adversarial
term as ``-mean(critic(fake))``. The L1 weight 0.0011852 therefore multiplies a per-sample *sum*
over 128x128 pixels, i.e. it is 19.42 per unit of mean absolute error. Here the L1 term is the
per-pixel mean times ``reference_pixels`` (default 128*128): identical to the authors' value at
128x128, and at other crop sizes every term (L1, perceptual, adversarial, KL) keeps the same
relative weight for the same per-pixel errors. ``l1_reduction="sum"`` reproduces the literal
pixel sum at any crop size instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from invariscope import distributed
from invariscope.models import backbones
from invariscope.precision import float32, full

__all__ = [
    "LOGVAR_MIN",
    "LOGVAR_MAX",
    "VAEConfig",
    "VAELossWeights",
    "ResNetEncoder",
    "BigGANDecoder",
    "ConditionalVAE",
    "Critic",
    "adapt_rgb_conv",
    "kl_divergence",
    "vae_loss_terms",
    "critic_loss_terms",
    "gradient_penalty",
    "build_perceptual_loss",
    "active_dimensions",
    "count_parameters",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 10.0


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the (conditional) VAE and its critic. Defaults: the paper's cVAE.

    ``encoder``: ``"resnet50"`` (torchvision layout, ImageNet-loadable) or ``"resnet-small"``
    (same stem, four bottleneck stages with strides 1, 2, 2, 2, stem width ``encoder_width`` and
    ``encoder_layers`` blocks per stage). ``conv1_init``: how :meth:`ResNetEncoder.load_imagenet_weights`
    fills the new first conv: ``"rgb_split"`` (pretrained RGB filters summed over RGB, divided
    equally among the input channels) or ``"random"`` (kept at its random init, as the authors do).
    Decoder: ``log2(crop_size / 4)`` up-blocks from 4x4; ``z_chunk`` latent dims per up-block
    (the rest feed the initial linear layer; shrunk automatically for small latents);
    ``z_embed_classes`` > 0 adds the authors' shared embedding of the whole z (MLP to
    ``z_embed_classes`` softmax outputs, then a linear map to ``z_embed_dim``) to every block's
    condition; ``attention_resolution``: feature-map size where self-attention is applied
    (None: none); ``cond_resize``: how ŷ is resized to each block's resolution;
    ``decoder_init="identity"`` (conditional only; not the paper's): the output conv starts as
    x = ŷ (centred delta on the ŷ channel, the feature weights scaled by 0.1).
    Critic: ``critic_width`` channels after the first conv, doubling per stride-2 conv up to
    ``critic_max_width``; ``critic_depth`` stride-2 convs (None: down to 4x4).
    """

    conditional: bool = True
    latent_dim: int = 256
    crop_size: int = 128
    encoder: Literal["resnet50", "resnet-small"] = "resnet50"
    encoder_width: int = 64
    encoder_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    conv1_init: Literal["rgb_split", "random"] = "rgb_split"
    decoder_channels: int = 96
    attention_resolution: int | None = 64
    z_chunk: int = 20
    z_embed_classes: int = 1000
    z_embed_dim: int = 128
    cond_resize: Literal["area", "bilinear", "nearest"] = "area"
    critic_width: int = 64
    critic_max_width: int = 512
    critic_depth: int | None = None
    decoder_init: Literal["default", "identity"] = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_layers", tuple(int(v) for v in self.encoder_layers))
        n = self.crop_size
        if n < 8 or n & (n - 1):
            raise ValueError(f"crop_size must be a power of two >= 8, got {n}")
        if self.encoder not in ("resnet50", "resnet-small"):
            raise ValueError(f"encoder must be 'resnet50' or 'resnet-small', got {self.encoder!r}")
        if self.encoder == "resnet50" and self.encoder_width != 64:
            raise ValueError("encoder_width applies to 'resnet-small' only; resnet50 has width 64")
        if self.encoder_width < 1 or len(self.encoder_layers) != 4 or min(self.encoder_layers) < 1:
            raise ValueError("encoder_width must be >= 1 and encoder_layers four positive ints")
        if self.conv1_init not in ("rgb_split", "random"):
            raise ValueError(f"conv1_init must be 'rgb_split' or 'random', got {self.conv1_init!r}")
        if self.latent_dim < self.n_blocks + 1:
            raise ValueError(f"latent_dim must be >= {self.n_blocks + 1} (one chunk per up-block "
                             f"plus the initial linear layer), got {self.latent_dim}")
        if self.decoder_channels < 1 or self.z_chunk < 1:
            raise ValueError("decoder_channels and z_chunk must be >= 1")
        if self.z_embed_classes < 0 or (self.z_embed_classes > 0 and self.z_embed_dim < 1):
            raise ValueError("z_embed_classes must be >= 0 and z_embed_dim >= 1 when it is used")
        allowed = [4 * 2**i for i in range(self.n_blocks + 1)]
        if self.attention_resolution is not None and self.attention_resolution not in allowed:
            raise ValueError(f"attention_resolution must be None or one of {allowed}, "
                             f"got {self.attention_resolution}")
        if self.cond_resize not in ("area", "bilinear", "nearest"):
            raise ValueError(f"cond_resize must be 'area', 'bilinear' or 'nearest', got {self.cond_resize!r}")
        if self.critic_width < 1 or self.critic_max_width < self.critic_width:
            raise ValueError("critic_width must be >= 1 and critic_max_width >= critic_width")
        if self.decoder_init not in ("default", "identity"):
            raise ValueError(f"decoder_init must be 'default' or 'identity', got {self.decoder_init!r}")
        if self.critic_depth is not None and not 1 <= self.critic_depth <= int(math.log2(n)) - 1:
            raise ValueError(f"critic_depth must leave at least 2x2 pixels: 1..{int(math.log2(n)) - 1}")

    @property
    def n_blocks(self) -> int:
        """Number of decoder up-blocks (4x4 -> crop_size)."""
        return int(math.log2(self.crop_size)) - 2

    @property
    def cond_channels(self) -> int:
        """Extra input channels from ŷ (1 conditional, 0 unconditional)."""
        return 1 if self.conditional else 0

    @classmethod
    def paper(cls, conditional: bool = True) -> "VAEConfig":
        """The paper's (c)VAE: 256-d latent, 128x128 crops, ResNet-50, BigGAN-128 base 96."""
        return cls(conditional=conditional)

    @classmethod
    def small(cls, conditional: bool = True, crop_size: int = 64, latent_dim: int = 64) -> "VAEConfig":
        """A CPU-sized VAE with the same structure (small ResNet, decoder base 16)."""
        return cls(conditional=conditional, latent_dim=latent_dim, crop_size=crop_size,
                   encoder="resnet-small", encoder_width=16, decoder_channels=16,
                   attention_resolution=min(32, crop_size), z_chunk=8, z_embed_classes=64,
                   z_embed_dim=16, critic_width=16, critic_max_width=128)


# --------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------
def adapt_rgb_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn a pretrained RGB conv weight ``(C, 3, k, k)`` into ``(C, in_channels, k, k)``.

    The filters are summed over RGB (the response to a grey image repeated to RGB) and split
    equally among the new channels: when all ``in_channels`` inputs equal the same grey image g,
    the new conv gives exactly the pretrained conv's response to (g, g, g).
    """
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB conv weight (C, 3, k, k), got {tuple(weight.shape)}")
    grey = weight.sum(dim=1, keepdim=True)
    return grey.repeat(1, in_channels, 1, 1) / in_channels


class _SmallResNet(nn.Module):
    """ResNet with torchvision's stem and bottleneck stages at a configurable width."""

    def __init__(self, in_channels: int, width: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(2 * width, layers[1], 2)
        self.layer3 = self._make_layer(4 * width, layers[2], 2)
        self.layer4 = self._make_layer(8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_features = 8 * width * backbones.Bottleneck.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        exp = backbones.Bottleneck.expansion
        down = None
        if stride != 1 or self.inplanes != planes * exp:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * exp, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * exp))
        layers = [backbones.Bottleneck(self.inplanes, planes, stride, down)]
        self.inplanes = planes * exp
        layers += [backbones.Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class ResNetEncoder(nn.Module):
    """ResNet backbone on [x, ŷ] (or x) -> ``(mu, logvar)`` of the latent, logvar clamped."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        in_ch = 1 + config.cond_channels
        self.backbone: nn.Module
        if config.encoder == "resnet50":
            self.backbone = backbones.resnet50(in_channels=in_ch)
            self.backbone.fc = nn.Identity()  # replaced by ``head``
            feat = 512 * backbones.Bottleneck.expansion
        else:
            self.backbone = _SmallResNet(in_ch, config.encoder_width, tuple(config.encoder_layers))
            feat = self.backbone.out_features
        self.head = nn.Linear(feat, 2 * config.latent_dim)

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.head(self.backbone.features(inp))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def load_imagenet_weights(self, path: str | os.PathLike[str] | None, *,
                              params_key: str | None = None) -> bool:
        """Load a torchvision ``resnet50`` ImageNet file into the backbone (resnet50 only).

        Every key is checked (via :func:`backbones.load_imagenet_weights`, strict); ``fc`` is
        dropped (the head stays random) and ``conv1`` is adapted to the input channels as set by
        ``config.conv1_init``. ``path=None`` -> False (nothing loaded).
        """
        if self.config.encoder != "resnet50":
            raise ValueError(f"ImageNet weights exist for encoder 'resnet50' only, not {self.config.encoder!r}")
        ref = backbones.resnet50()
        if not backbones.load_imagenet_weights(ref, path, strict=True, params_key=params_key):
            return False
        state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
        rgb = state.pop("conv1.weight")
        own = self.backbone.conv1.weight
        state["conv1.weight"] = (adapt_rgb_conv(rgb, own.shape[1]) if self.config.conv1_init == "rgb_split"
                                 else own.detach().clone())
        self.backbone.load_state_dict(state, strict=True)
        return True


# --------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------
class ActNorm(nn.Module):
    """Per-channel affine map, initialised from the first training batch to zero mean, unit std.

    The initialisation happens only in training mode (a fresh module used in eval mode is the
    identity); the ``initialized`` flag is saved in the state dict.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.copy_(-flat.mean(1).view_as(self.loc))
                self.scale.copy_(1.0 / (flat.std(1).view_as(self.scale) + 1e-6))
                self.initialized.fill_(1)
        return self.scale * (x + self.loc)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine; gain ``1 + W_g c`` and bias ``W_b c`` from a condition vector."""

    def __init__(self, num_features: int, cond_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False, eps=1e-4)
        self.gain = spectral_norm(nn.Linear(cond_dim, num_features, bias=False))
        self.bias = spectral_norm(nn.Linear(cond_dim, num_features, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g = 1.0 + self.gain(c)[:, :, None, None]
        return g * self.bn(x) + self.bias(c)[:, :, None, None]


class GBlock(nn.Module):
    """BigGAN up-block: CBN-ReLU-up-conv3-CBN-ReLU-conv3 plus an upsampled 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm0 = ConditionalBatchNorm2d(in_channels, cond_dim)
        self.conv0 = spectral_norm(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.norm1 = ConditionalBatchNorm2d(out_channels, cond_dim)
        self.conv1 = spectral_norm(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.shortcut = spectral_norm(nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm0(x, c)), scale_factor=2.0, mode="nearest")
        h = self.conv1(F.relu(self.norm1(self.conv0(h), c)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SelfAttention(nn.Module):
    """SAGAN/BigGAN self-attention (keys and values max-pooled 2x), output gated by gamma (init 0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        ck, cv = max(1, channels // 8), max(1, channels // 2)
        self.theta = spectral_norm(nn.Conv2d(channels, ck, 1, bias=False))
        self.phi = spectral_norm(nn.Conv2d(channels, ck, 1, bias=False))
        self.g = spectral_norm(nn.Conv2d(channels, cv, 1, bias=False))
        self.o = spectral_norm(nn.Conv2d(cv, channels, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (B, ck, N)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # (B, ck, N/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # (B, cv, N/4)
        attn = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (B, N, N/4)
        out = (g @ attn.transpose(1, 2)).view(b, -1, h, w)
        return x + self.gamma * self.o(out)


def _resize(y: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if y.shape[-1] == size and y.shape[-2] == size:
        return y
    if mode == "bilinear":
        return F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(y, size=(size, size), mode=mode)


class BigGANDecoder(nn.Module):
    """BigGAN generator with hierarchical z, conditional BN and ŷ concatenated at every scale.

    Channels (multiples of ``decoder_channels``) halve from ``min(16, 2**(n-1))`` at 4x4 to 1 at
    the output (exactly BigGAN-128 for n = 5 blocks). After the blocks: ActNorm (as the authors;
    no ReLU), [ŷ], 3x3 conv to one channel.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        n, chn, cc = config.n_blocks, config.decoder_channels, config.cond_channels
        out_mult = [min(16, 2 ** (n - 1 - i)) for i in range(n)]
        in_mult = [out_mult[0]] + out_mult[:-1]
        chunk = min(config.z_chunk, config.latent_dim // (n + 1))
        self.split_sizes = [config.latent_dim - n * chunk] + [chunk] * n
        self.first_channels = in_mult[0] * chn
        if config.z_embed_classes > 0:
            k = config.z_embed_classes
            self.z_embed: nn.Module | None = nn.Sequential(
                nn.Linear(config.latent_dim, 2 * k), nn.LeakyReLU(),
                nn.Linear(2 * k, 2 * k), nn.LeakyReLU(),
                nn.Linear(2 * k, 2 * k), nn.LeakyReLU(),
                nn.Linear(2 * k, k), nn.Softmax(dim=1),
                nn.Linear(k, config.z_embed_dim, bias=False),
            )
            cond_dim = chunk + config.z_embed_dim
        else:
            self.z_embed = None
            cond_dim = chunk
        self.linear = spectral_norm(nn.Linear(self.split_sizes[0], 16 * self.first_channels))
        self.blocks = nn.ModuleList(
            GBlock(in_mult[i] * chn + cc, out_mult[i] * chn, cond_dim) for i in range(n)
        )
        res = config.attention_resolution
        self.attention_index = None if res is None else int(math.log2(res // 4))
        if self.attention_index is not None:
            ch = (in_mult + [out_mult[-1]])[self.attention_index] * chn
            self.attention: nn.Module | None = SelfAttention(ch)
        else:
            self.attention = None
        self.out_norm = ActNorm(out_mult[-1] * chn)
        self.out_conv = nn.Conv2d(out_mult[-1] * chn + cc, 1, 3, padding=1)
        if config.decoder_init == "identity" and cc:
            with torch.no_grad():  # start from x = ŷ: the ŷ channel's 3x3 weights a centred delta
                self.out_conv.weight[:, :-1] *= 0.1
                self.out_conv.weight[:, -1:] = 0.0
                self.out_conv.weight[0, -1, 1, 1] = 1.0
                self.out_conv.bias.zero_()

    def forward(self, z: torch.Tensor, y_hat: torch.Tensor | None = None) -> torch.Tensor:
        chunks = torch.split(z, self.split_sizes, dim=1)
        emb = self.z_embed(z) if self.z_embed is not None else None
        h = self.linear(chunks[0]).view(z.shape[0], self.first_channels, 4, 4)
        for i, block in enumerate(self.blocks):
            if i == self.attention_index:
                h = self.attention(h)
            c = chunks[i + 1] if emb is None else torch.cat((chunks[i + 1], emb), dim=1)
            if y_hat is not None:
                h = torch.cat((h, _resize(y_hat, h.shape[-1], self.config.cond_resize)), dim=1)
            h = block(h, c)
        if self.attention_index == len(self.blocks):
            h = self.attention(h)
        h = self.out_norm(h)
        if y_hat is not None:
            h = torch.cat((h, y_hat), dim=1)
        return self.out_conv(h)


# --------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------
def check_condition(conditional: bool, y_hat: torch.Tensor | None, ref_shape: tuple[int, ...],
                    what: str) -> None:
    """ValueError unless a conditional VAE gets ``y_hat`` of ``ref_shape`` and an unconditional
    one gets none (``what``: the method, for the message)."""
    if conditional and y_hat is None:
        raise ValueError(f"conditional VAE: {what} needs y_hat (the denoised image)")
    if not conditional and y_hat is not None:
        raise ValueError(f"unconditional VAE: {what} takes no y_hat (build it with conditional=True)")
    if y_hat is not None and tuple(y_hat.shape) != ref_shape:
        raise ValueError(f"y_hat must have shape {ref_shape}, got {tuple(y_hat.shape)}")


class ConditionalVAE(nn.Module):
    """(Conditional) VAE: ``encoder`` q(z | x[, ŷ]) and ``decoder`` p(x | z[, ŷ]).

    Images are ``(B, 1, H, W)`` in normalized units with H = W = ``config.crop_size``. A conditional
    model needs ``y_hat`` of the same shape everywhere; an unconditional one refuses it.
    ``imagenet_weights``: optional torchvision ``resnet50`` file for the encoder.
    """

    def __init__(self, config: VAEConfig, imagenet_weights: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config)
        self.decoder = BigGANDecoder(config)
        if imagenet_weights is not None:
            self.encoder.load_imagenet_weights(imagenet_weights)

    @property
    def latent_shape(self) -> tuple[int]:
        """Shape of one latent: ``(latent_dim,)`` (a global vector)."""
        return (self.config.latent_dim,)

    def _check(self, y_hat: torch.Tensor | None, ref_shape: tuple[int, ...], what: str) -> None:
        check_condition(self.config.conditional, y_hat, ref_shape, what)

    def encode(self, x: torch.Tensor, y_hat: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and clamped log-variance, each ``(B, latent_dim)``."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"x must be (B, 1, H, W), got {tuple(x.shape)}")
        self._check(y_hat, tuple(x.shape), "encode")
        return self.encoder(x if y_hat is None else torch.cat((x, y_hat), dim=1))

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` (global torch RNG; drawn for the
        global batch under data-parallel training, :func:`invariscope.distributed.randn_like`)."""
        return mu + torch.exp(0.5 * logvar) * distributed.randn_like(mu)

    def decode(self, z: torch.Tensor, y_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Image ``(B, 1, crop, crop)`` from ``z`` ``(B, latent_dim)``."""
        s = self.config.crop_size
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must be (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        self._check(y_hat, (z.shape[0], 1, s, s), "decode")
        return self.decoder(z, y_hat)

    def forward(self, x: torch.Tensor, y_hat: torch.Tensor | None = None,
                sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_rec, mu, logvar)``; ``sample=False`` decodes the posterior mean."""
        mu, logvar = self.encode(x, y_hat)
        z = self.reparameterize(mu, logvar) if sample else mu
        return self.decode(z, y_hat), mu, logvar


# --------------------------------------------------------------------------------------
# Critic
# --------------------------------------------------------------------------------------
class Critic(nn.Module):
    """WGAN critic on [image, ŷ] (authors' layout).

    ``depth`` x (conv 4x4 stride 2 -> InstanceNorm -> LeakyReLU 0.2), channels ``width * 2**i``
    capped at ``max_width``; then conv 3x3 -> InstanceNorm -> LeakyReLU, a 1x1 conv to one channel
    and a linear layer over the remaining pixels to a scalar per sample. ``depth=None``: down to
    4x4 (the authors' 5 at 128x128).
    """

    def __init__(self, conditional: bool = True, crop_size: int = 128, width: int = 64,
                 max_width: int = 512, depth: int | None = None) -> None:
        super().__init__()
        if crop_size < 8 or crop_size & (crop_size - 1):
            raise ValueError(f"crop_size must be a power of two >= 8, got {crop_size}")
        depth = int(math.log2(crop_size)) - 2 if depth is None else depth
        if not 1 <= depth <= int(math.log2(crop_size)) - 1:
            raise ValueError(f"depth must leave at least 2x2 pixels: 1..{int(math.log2(crop_size)) - 1}")
        self.conditional = conditional
        self.crop_size = crop_size
        chans = [1 + int(conditional)] + [min(max_width, width * 2**i) for i in range(depth)]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(chans[-1], chans[-1], 3, 1, 1), nn.InstanceNorm2d(chans[-1]),
                   nn.LeakyReLU(0.2), nn.Conv2d(chans[-1], 1, 1)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear((crop_size // 2**depth) ** 2, 1)

    @classmethod
    def from_config(cls, config: VAEConfig) -> "Critic":
        """The critic matching a VAE configuration."""
        return cls(config.conditional, config.crop_size, config.critic_width, config.critic_max_width,
                   config.critic_depth)

    def forward(self, image: torch.Tensor, y_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Critic value per sample, shape ``(B,)``."""
        if self.conditional and y_hat is None:
            raise ValueError("conditional critic needs y_hat")
        if not self.conditional and y_hat is not None:
            raise ValueError("unconditional critic takes no y_hat")
        if image.shape[-1] != self.crop_size or image.shape[-2] != self.crop_size:
            raise ValueError(f"critic expects {self.crop_size}x{self.crop_size} images, got {tuple(image.shape)}")
        x = image if y_hat is None else torch.cat((image, y_hat), dim=1)
        return self.head(self.features(x).flatten(1)).squeeze(1)


def gradient_penalty(critic: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     cond: torch.Tensor | None = None, lam: float = 10.0,
                     include_cond: bool = True) -> torch.Tensor:
    """WGAN-GP: ``lam * mean((||grad D(x_i, ŷ)||_2 - 1)^2)`` at random interpolates of real and fake.

    ``real``/``fake`` are detached; the interpolation weight is drawn per sample from U(0, 1)
    (global torch RNG). With ``include_cond`` the gradient norm covers the ŷ channel too, as in the
    authors' code (they differentiate w.r.t. the concatenated critic input); otherwise only the
    image. The result keeps its graph so it trains the critic. It is computed in float32 (autocast
    off: the double backward stays in full precision).
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake shapes differ: {tuple(real.shape)} vs {tuple(fake.shape)}")
    real, fake = full(real.detach()), full(fake.detach())
    a = distributed.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    interp = (a * real + (1 - a) * fake).requires_grad_(True)
    inputs = [interp]
    if cond is not None:
        cond = full(cond.detach()).requires_grad_(include_cond)
        if include_cond:
            inputs.append(cond)
    with float32(real.device):
        out = critic(interp) if cond is None else critic(interp, cond)
        grads = torch.autograd.grad(out.sum(), inputs, create_graph=True, allow_unused=True)
    flat = [g.flatten(1) if g is not None else torch.zeros_like(x).flatten(1) for g, x in zip(grads, inputs)]
    norm = torch.cat(flat, dim=1).norm(2, dim=1)
    return lam * ((norm - 1.0) ** 2).mean()


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAELossWeights:
    """Weights of the generator loss (defaults: the authors' tuned values) and the L1 reduction.

    ``l1_reduction="scaled_mean"``: L1 = mean |x - x_rec| over pixels x ``reference_pixels``
    (128*128), averaged over the batch; equals the authors' per-sample pixel sum at 128x128 and
    keeps the balance between terms at other crop sizes. ``"sum"``: literal per-sample pixel sum.
    """

    l1: float = 0.0011852172680049085
    kl: float = 0.5750362872947617
    perceptual: float = 0.12101882347522842
    adversarial: float = 1.0
    l1_reduction: Literal["scaled_mean", "sum"] = "scaled_mean"
    reference_pixels: int = 128 * 128

    def __post_init__(self) -> None:
        if self.l1_reduction not in ("scaled_mean", "sum"):
            raise ValueError(f"l1_reduction must be 'scaled_mean' or 'sum', got {self.l1_reduction!r}")
        if self.reference_pixels < 1:
            raise ValueError("reference_pixels must be >= 1")

    @classmethod
    def coerce(cls, w: "VAELossWeights | Mapping[str, Any] | None") -> "VAELossWeights":
        """Accept an instance, a dict with a subset of the fields, or None (paper defaults)."""
        if w is None:
            return cls()
        if isinstance(w, cls):
            return w
        if isinstance(w, Mapping):
            names = {f.name for f in fields(cls)}
            bad = sorted(set(w) - names)
            if bad:
                raise ValueError(f"unknown VAE loss weight(s) {bad}; allowed: {sorted(names)}")
            return cls(**dict(w))
        if hasattr(w, "__dataclass_fields__"):
            return cls.coerce(asdict(w))
        raise TypeError(f"weights must be VAELossWeights, a mapping or None, got {type(w).__name__}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample in nats, summed over latent dims: ``(B,)``
    (float32 under autocast too)."""
    mu, logvar = full(mu), full(logvar)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def mode_seeking_term(x1: torch.Tensor, x2: torch.Tensor, z1: torch.Tensor,
                      z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mode-seeking regularizer (Mao et al., CVPR 2019): batch mean of
    ``mean|z1 - z2| / (mean|x1 - x2| + eps)`` per sample. Minimizing it makes the decoder's
    output depend on z (conditional GANs otherwise tend to ignore it)."""
    num = (x1 - x2).abs().flatten(1).mean(1)
    den = (z1 - z2).abs().flatten(1).mean(1)
    return (den / (num + eps)).mean()


def build_perceptual_loss(weights_path: str | os.PathLike[str] | None = None,
                          params_key: str | None = None) -> backbones.VGGPerceptualLoss:
    """The cVAE perceptual loss: VGG16 relu1_2/relu2_2/relu3_3/relu4_3, L1, image repeated to RGB."""
    return backbones.VGGPerceptualLoss(layers=("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
                                       weights_path=weights_path, kind="vgg16", norm="l1",
                                       input_mapping="repeat", params_key=params_key)


def vae_loss_terms(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    y_hat: torch.Tensor | None = None,
    critic: nn.Module | None = None,
    perceptual: nn.Module | None = None,
    weights: VAELossWeights | Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Generator-side loss terms: ``l1``, ``kl``, ``perceptual``, ``adversarial`` and ``total``.

    ``l1``: see :class:`VAELossWeights`; ``kl``: batch mean of :func:`kl_divergence`;
    ``perceptual``: ``perceptual(x_rec, x)`` (0 when None); ``adversarial``: ``-mean(critic(x_rec,
    ŷ))`` (0 when None; the critic's parameters receive gradients too, so the training step should
    zero or freeze them). ``total`` = weighted sum. All are scalar tensors.
    """
    w = VAELossWeights.coerce(weights)
    if x.shape != x_rec.shape:
        raise ValueError(f"x and x_rec shapes differ: {tuple(x.shape)} vs {tuple(x_rec.shape)}")
    per_pixel = (x_rec - x).abs().flatten(1)
    if w.l1_reduction == "sum":
        l1 = per_pixel.sum(dim=1).mean()
    else:
        l1 = per_pixel.mean(dim=1).mean() * w.reference_pixels
    kl = kl_divergence(mu, logvar).mean()
    zero = x_rec.new_zeros(())
    perc = perceptual(x_rec, x) if perceptual is not None else zero
    if critic is not None:
        adv = -(critic(x_rec) if y_hat is None else critic(x_rec, y_hat)).mean()
    else:
        adv = zero
    total = w.l1 * l1 + w.kl * kl + w.perceptual * perc + w.adversarial * adv
    return {"l1": l1, "kl": kl, "perceptual": perc, "adversarial": adv, "total": total}


def critic_loss_terms(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                      y_hat: torch.Tensor | None = None, gp_weight: float = 10.0) -> dict[str, torch.Tensor]:
    """Critic-side WGAN-GP terms: ``wasserstein`` = mean D(fake) - mean D(real), ``gp``, ``total``.

    ``fake`` is detached (the generator gets no gradient from this loss).
    """
    fake = fake.detach()
    d_real = critic(real) if y_hat is None else critic(real, y_hat)
    d_fake = critic(fake) if y_hat is None else critic(fake, y_hat)
    wasserstein = d_fake.mean() - d_real.mean()
    gp = gradient_penalty(critic, real, fake, y_hat, lam=gp_weight)
    return {"wasserstein": wasserstein, "gp": gp, "total": wasserstein + gp}


# --------------------------------------------------------------------------------------
# Analysis helpers
# --------------------------------------------------------------------------------------
def active_dimensions(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dims whose posterior-mean variance over the N samples (unbiased) exceeds ``threshold``.

    ``mu``: ``(N, D)`` posterior means of N inputs (Burda et al.'s activity statistic).
    """
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu must be (N, D) with N >= 2, got {tuple(mu.shape)}")
    return int((mu.detach().double().var(dim=0, unbiased=True) > threshold).sum().item())


def count_parameters(module: nn.Module, trainable_only: bool = True) -> dict[str, int]:
    """Parameter counts per direct child (e.g. ``encoder``, ``decoder``) and ``total``.

    Spectral-norm vectors are buffers, not parameters, so they are not counted.
    """
    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)

    counts = {name: n(child) for name, child in module.named_children()}
    counts["total"] = n(module)
    return counts
