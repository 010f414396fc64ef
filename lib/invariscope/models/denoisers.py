"""Low-dose CT denoisers of Eulig et al. (2025) and their GAN discriminators.

All networks take and return tensors of shape ``(B, 1, H, W)`` in *normalized* CT units
(zero mean / unit variance with the data set's mean and std, see ``PAPER_FACTS.md``).
Module layouts and state-dict key names follow the authors' ``ldct-benchmark`` package
(``ldctbench.methods.<name>.network``), so their checkpoints
(``torch.load(path)["model_state_dict"]``) load with ``strict=True`` through
:func:`load_ldctbench_checkpoint`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from invariscope.models.statedict import describe_mismatch

__all__ = [
    "CNN10",
    "REDCNN",
    "DUGANGenerator",
    "WGANVGGGenerator",
    "WGANVGGCritic",
    "DUGANDiscriminator",
    "GaussRI",
    "sobel_gradients",
    "gaussian_kernel1d",
    "load_ldctbench_checkpoint",
    "DENOISERS",
    "build_denoiser",
]


# --------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------
class CNN10(nn.Module):
    """CNN-10: Conv9x9 1->64, ReLU, Conv3x3 64->32, ReLU, Conv5x5 32->1 ("same" padding).

    24,513 parameters; keys ``layers.{0,2,4}.{weight,bias}`` as in ldct-benchmark.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.Conv2d(1, 64, 9, padding=4),
                nn.ReLU(),
                nn.Conv2d(64, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 1, 5, padding=2),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class REDCNN(nn.Module):
    """RED-CNN: 5 unpadded Conv5x5 (96 ch) + 5 ConvTranspose5x5 with three residual adds.

    Residual adds after ``tconv1`` (+ ``conv4`` activation), ``tconv3`` (+ ``conv2``
    activation) and at the output (+ input); ReLU between layers, no final ReLU (so
    zero-mean normalized outputs are possible). 1,848,865 parameters. Any input size >= 21
    works (the transposed convolutions restore the size exactly).
    """

    def __init__(self, out_ch: int = 96) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, out_ch, 5)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 5)
        self.conv3 = nn.Conv2d(out_ch, out_ch, 5)
        self.conv4 = nn.Conv2d(out_ch, out_ch, 5)
        self.conv5 = nn.Conv2d(out_ch, out_ch, 5)
        self.tconv1 = nn.ConvTranspose2d(out_ch, out_ch, 5)
        self.tconv2 = nn.ConvTranspose2d(out_ch, out_ch, 5)
        self.tconv3 = nn.ConvTranspose2d(out_ch, out_ch, 5)
        self.tconv4 = nn.ConvTranspose2d(out_ch, out_ch, 5)
        self.tconv5 = nn.ConvTranspose2d(out_ch, 1, 5)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual_1 = x
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        residual_2 = out
        out = self.relu(self.conv3(out))
        out = self.relu(self.conv4(out))
        residual_3 = out
        out = self.relu(self.conv5(out))
        out = self.tconv1(out) + residual_3
        out = self.tconv2(self.relu(out))
        out = self.tconv3(self.relu(out)) + residual_2
        out = self.tconv4(self.relu(out))
        out = self.tconv5(self.relu(out)) + residual_1
        return out


class DUGANGenerator(REDCNN):
    """DU-GAN generator: identical to :class:`REDCNN` (same keys, 1,848,865 parameters)."""


class WGANVGGGenerator(nn.Module):
    """WGAN-VGG generator: 8 Conv3x3 (1->32, six 32->32, 32->1), ReLU between, none at the end.

    56,097 parameters; keys ``net.{0,2,...,14}.{weight,bias}`` as in ldct-benchmark.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU()]
        for _ in range(6):
            layers += [nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU()]
        layers.append(nn.Conv2d(32, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GaussRI(nn.Module):
    """The "Gauss + RI" case study: Gaussian filter (sigma = 1 px) whose output is constant
    inside a centred square (region of invariance).

    The blur equals ``scipy.ndimage.gaussian_filter(x, sigma, mode=mode, truncate=truncate)``
    per image (defaults: scipy's ``mode="reflect"``, i.e. half-sample symmetric padding,
    and ``truncate=4.0`` -> 9-tap kernel). Output pixels in the centred
    ``square_size x square_size`` square (rows/cols ``[(N - s) // 2, (N - s) // 2 + s)``,
    clipped to the image) are set to ``fill_value``.

    ``fill_value`` is given in *normalized* units, like the module's input and output:
    the default 0.0 is the normalization mean (about -542.5 HU for the authors' Mayo
    statistics), not 0 HU; pass ``(hu + 1024 - mean) / std`` to fill with a given HU value.
    The choice does not change the set of invariances (any fill constant is independent of
    the input). No trainable parameters and an empty state dict.
    """

    _MODES = ("reflect", "nearest", "mirror", "wrap", "constant")

    def __init__(
        self,
        square_size: int = 30,
        sigma: float = 1.0,
        fill_value: float = 0.0,
        truncate: float = 4.0,
        mode: str = "reflect",
    ) -> None:
        super().__init__()
        if square_size < 0:
            raise ValueError(f"square_size must be >= 0, got {square_size}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if mode not in self._MODES:
            raise ValueError(f"mode must be one of {self._MODES}, got {mode!r}")
        self.square_size = int(square_size)
        self.sigma = float(sigma)
        self.fill_value = float(fill_value)
        self.truncate = float(truncate)
        self.mode = mode
        self.register_buffer(
            "kernel", gaussian_kernel1d(self.sigma, self.truncate), persistent=False
        )

    @property
    def radius(self) -> int:
        return (self.kernel.numel() - 1) // 2

    def square_slices(self, height: int, width: int) -> tuple[slice, slice]:
        """Row and column slices of the centred square for an ``height x width`` image."""
        rows = _centred(height, self.square_size)
        cols = _centred(width, self.square_size)
        return rows, cols

    def mask(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Boolean ``(H, W)`` mask, True inside the square of constant output."""
        m = torch.zeros(height, width, dtype=torch.bool, device=device)
        rows, cols = self.square_slices(height, width)
        m[rows, cols] = True
        return m

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of ``(B, C, H, W)`` with scipy-compatible boundaries."""
        b, c, h, w = x.shape
        r = self.radius
        k = self.kernel.to(dtype=x.dtype, device=x.device)
        y = x.reshape(b * c, 1, h, w)
        y = _pad_axis(y, r, dim=2, mode=self.mode)
        y = F.conv2d(y, k.view(1, 1, -1, 1))
        y = _pad_axis(y, r, dim=3, mode=self.mode)
        y = F.conv2d(y, k.view(1, 1, 1, -1))
        return y.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blur(x)
        m = self.mask(x.shape[-2], x.shape[-1], device=x.device)
        return torch.where(m, torch.full_like(y, self.fill_value), y)

    def extra_repr(self) -> str:
        return (
            f"square_size={self.square_size}, sigma={self.sigma}, fill_value={self.fill_value}, "
            f"truncate={self.truncate}, mode={self.mode!r}"
        )


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalized float64 1D Gaussian kernel as scipy.ndimage builds it.

    Radius ``int(truncate * sigma + 0.5)``.
    """
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _centred(n: int, size: int) -> slice:
    size = min(size, n)
    start = (n - size) // 2
    return slice(start, start + size)


def _pad_index(n: int, r: int, mode: str) -> torch.Tensor:
    """Source indices for padding an axis of length ``n`` by ``r`` on both sides (scipy modes)."""
    idx = torch.arange(-r, n + r)
    if mode == "nearest":
        return idx.clamp(0, n - 1)
    if mode == "wrap":
        return idx % n
    if mode == "reflect":  # d c b a | a b c d | d c b a
        period = 2 * n
        j = idx % period
        return torch.where(j < n, j, period - 1 - j)
    if mode == "mirror":  # d c b | a b c d | c b a
        if n == 1:
            return torch.zeros_like(idx)
        period = 2 * n - 2
        j = idx % period
        return torch.where(j < n, j, period - j)
    raise ValueError(f"unsupported padding mode {mode!r}")


def _pad_axis(x: torch.Tensor, r: int, dim: int, mode: str) -> torch.Tensor:
    if r == 0:
        return x
    if mode == "constant":
        pad = (0, 0, r, r) if dim == 2 else (r, r, 0, 0)
        return F.pad(x, pad, mode="constant", value=0.0)
    idx = _pad_index(x.shape[dim], r, mode).to(x.device)
    return x.index_select(dim, idx)


# --------------------------------------------------------------------------------------
# Discriminators
# --------------------------------------------------------------------------------------
class WGANVGGCritic(nn.Module):
    """WGAN-VGG critic for square patches of side ``patch_size`` fixed at construction.

    Six unpadded Conv3x3 (64, 64, 128, 128, 256, 256; strides 1, 2, 1, 2, 1, 2), each followed
    by LeakyReLU(0.01), then FC(256*s*s -> 1024), LeakyReLU(0.01), FC(1024 -> 1); ``s`` = 7 for
    patch 77, 5 for patch 64. Keys ``net.{0,2,...,10}``, ``fc1``, ``fc2`` as in ldct-benchmark.
    Returns ``(B, 1)``.
    """

    _CFG = ((1, 64, 1), (64, 64, 2), (64, 128, 1), (128, 128, 2), (128, 256, 1), (256, 256, 2))

    def __init__(self, patch_size: int = 77) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.output_size = self.feature_size(self.patch_size)
        if self.output_size < 1:
            raise ValueError(f"patch_size {patch_size} is too small for WGANVGGCritic (need >= 29)")
        layers: list[nn.Module] = []
        for ch_in, ch_out, stride in self._CFG:
            layers += [nn.Conv2d(ch_in, ch_out, 3, stride, 0), nn.LeakyReLU(0.01)]
        self.net = nn.Sequential(*layers)
        self.fc1 = nn.Linear(256 * self.output_size**2, 1024)
        self.fc2 = nn.Linear(1024, 1)
        self.lrelu = nn.LeakyReLU(0.01)

    @classmethod
    def feature_size(cls, patch_size: int) -> int:
        """Spatial side of the last feature map for a square input of side ``patch_size``."""
        n = patch_size
        for _, _, stride in cls._CFG:
            n = (n - 3) // stride + 1
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.patch_size, self.patch_size):
            raise ValueError(
                f"WGANVGGCritic was built for {self.patch_size}x{self.patch_size} patches, "
                f"got input of shape {tuple(x.shape)}"
            )
        out = self.net(x).flatten(1)
        return self.fc2(self.lrelu(self.fc1(out)))


def _double_conv(ch_in: int, ch_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(ch_in, ch_out, 3, 1, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(ch_out, ch_out, 3, 1, 1),
        nn.LeakyReLU(0.2),
    )


def _pad_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    dy = ref.shape[2] - x.shape[2]
    dx = ref.shape[3] - x.shape[3]
    if dy == 0 and dx == 0:
        return x
    return F.pad(x, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))


class _DownBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, downsample: bool = True) -> None:
        super().__init__()
        self.conv_res = nn.Conv2d(ch_in, ch_out, 1, stride=2 if downsample else 1)
        self.net = _double_conv(ch_in, ch_out)
        self.down = nn.Conv2d(ch_out, ch_out, 4, stride=2, padding=1) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        res = self.conv_res(x)
        x = self.net(x)
        unet_res = x
        if self.down is not None:
            x = self.down(x)
        return _pad_to(x, res) + res, unet_res


class _UpBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(ch_in // 2, ch_out, 1)
        self.conv = _double_conv(ch_in, ch_out)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = _pad_to(self.up(x), skip)
        return self.conv(torch.cat((x, skip), dim=1)) + self.shortcut(x)


def _apply_spectral_norm(module: nn.Module) -> None:
    """Spectral norm on every Conv2d with ``in_channels > 4`` and ``out_channels != 1``
    (the authors' ``turn_on_spectral_norm`` rule; keys ``weight_orig``/``weight_u``/``weight_v``)."""
    for child in list(module.modules()):
        if isinstance(child, nn.Conv2d) and child.out_channels != 1 and child.in_channels > 4:
            nn.utils.spectral_norm(child)


class DUGANDiscriminator(nn.Module):
    """DU-GAN U-Net discriminator with a global (encoder) and a per-pixel (decoder) output.

    ``repeat_num`` stride-2 down blocks (channels ``min(conv_dim * 2**i, 512)``), a residual
    bottleneck, bilinear up blocks with skip connections, spectral norm as in the authors'
    code. DU-GAN uses two instances: one on images and one on :func:`sobel_gradients` of the
    images. Inputs need ``H, W >= 2**repeat_num`` (64 for the default); odd sizes are padded
    internally. Returns ``(global_logit (B, 1), pixel_logits (B, 1, H, W))`` (no sigmoid; the
    authors' code squeezes the global logit to ``(B,)``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        conv_dim: int = 64,
        repeat_num: int = 6,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        self.repeat_num = int(repeat_num)
        filters = [in_channels] + [min(conv_dim * 2**i, 512) for i in range(repeat_num + 1)]
        filters[-1] = filters[-2]
        pairs = list(zip(filters[:-1], filters[1:]))
        self.down_blocks = nn.ModuleList(
            _DownBlock(cin, cout, downsample=i != len(pairs) - 1)
            for i, (cin, cout) in enumerate(pairs)
        )
        last = filters[-1]
        self.to_logit = nn.Sequential(
            nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, 1)
        )
        self.up_blocks = nn.ModuleList(_UpBlock(cout * 2, cin) for cin, cout in pairs[:-1][::-1])
        self.conv = _double_conv(last, last)
        self.conv_out = nn.Conv2d(in_channels, 1, 1)
        if spectral_norm:
            _apply_spectral_norm(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        min_size = 2**self.repeat_num
        if min(x.shape[-2:]) < min_size:
            raise ValueError(
                f"DUGANDiscriminator(repeat_num={self.repeat_num}) needs H, W >= {min_size}, "
                f"got input of shape {tuple(x.shape)}"
            )
        residuals = []
        for block in self.down_blocks:
            x, unet_res = block(x)
            residuals.append(unet_res)
        bottom = self.conv(x) + x
        x = bottom
        for block, res in zip(self.up_blocks, residuals[:-1][::-1]):
            x = block(x, res)
        return self.to_logit(bottom), self.conv_out(x)


def sobel_gradients(x: torch.Tensor, epsilon: float = 1e-4) -> torch.Tensor:
    """Sobel gradient magnitude ``sqrt(gx**2 + gy**2 + epsilon)`` per channel (DU-GAN).

    Kernels ``[[1,0,-1],[2,0,-2],[1,0,-1]] / 4`` and its transpose applied by cross-correlation
    with zero padding 1, as in the authors' ``SobelOperator``; shape is preserved.
    """
    b, c, h, w = x.shape
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype, device=x.device)
    kx = kx / 4
    ky = kx.t().contiguous()
    y = x.reshape(b * c, 1, h, w)
    gx = F.conv2d(y, kx.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(y, ky.view(1, 1, 3, 3), padding=1)
    return torch.sqrt(gx**2 + gy**2 + epsilon).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------
# Checkpoints and registry
# --------------------------------------------------------------------------------------
def _read_checkpoint(path: str) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"could not read checkpoint {path!r}: {exc}") from exc


def load_ldctbench_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load an ldct-benchmark checkpoint (``{"model_state_dict": ..., "args": ...}``) into ``model``.

    A bare state dict is accepted too. Loads with ``strict=True`` on CPU and
    ``weights_only=True`` (``argparse.Namespace`` allowed). Raises ``FileNotFoundError`` if
    the file is missing and ``RuntimeError`` naming the file and the first mismatching keys
    (missing, unexpected or with a different shape). Returns ``model``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ldct-benchmark checkpoint not found: {path!r}")
    ckpt = _read_checkpoint(path)
    if isinstance(ckpt, Mapping) and "model_state_dict" in ckpt:
        state = ckpt["model_state_dict"]
    elif isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        keys = list(ckpt.keys())[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise RuntimeError(
            f"{path!r} is not an ldct-benchmark checkpoint: no 'model_state_dict' (found {keys})"
        )
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise RuntimeError(f"checkpoint {path!r} does not match {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=True)
    return model


DENOISERS: dict[str, Callable[..., nn.Module]] = {
    "cnn10": CNN10,
    "redcnn": REDCNN,
    "wganvgg": WGANVGGGenerator,
    "dugan": DUGANGenerator,
    "gaussri": GaussRI,
}


def build_denoiser(name: str, **kwargs: Any) -> nn.Module:
    """Build the denoising network registered under ``name`` (see :data:`DENOISERS`)."""
    key = name.lower()
    if key not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; allowed values: {sorted(DENOISERS)}")
    return DENOISERS[key](**kwargs)
