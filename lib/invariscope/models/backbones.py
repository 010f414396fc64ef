"""ImageNet backbones in pure torch with torchvision's module layout, and a VGG perceptual loss.

``vgg16_features`` / ``vgg19_features`` / ``resnet50`` use torchvision's key names
(``features.0.weight``; ``conv1.weight``, ``layer1.0.conv1.weight``, ``fc.weight``), so the
official torchvision ImageNet files load from a local path with :func:`load_imagenet_weights`.
Nothing is downloaded at run time; torchvision is not imported.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from invariscope.models.statedict import describe_mismatch

__all__ = [
    "TORCHVISION_FILES",
    "VGGFeatures",
    "vgg16_features",
    "vgg19_features",
    "Bottleneck",
    "ResNet",
    "resnet50",
    "load_imagenet_weights",
    "vgg_layer_names",
    "VGGPerceptualLoss",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

_URL = "https://download.pytorch.org/models/"
#: torchvision ImageNet (IMAGENET1K_V1) weight files expected by each architecture.
TORCHVISION_FILES: dict[str, str] = {
    "vgg16": "vgg16-397923af.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "resnet50": "resnet50-0676ba61.pth",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_VGG_CFG: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


# --------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------
class VGGFeatures(nn.Module):
    """Convolutional part of a torchvision VGG (no batch norm): ``self.features`` only.

    The classifier is not built; :func:`load_imagenet_weights` ignores the ``classifier.*``
    entries of a full torchvision file. ReLUs are not in-place so intermediate feature maps
    can be kept.
    """

    ignored_prefixes: tuple[str, ...] = ("classifier.",)

    def __init__(self, kind: str = "vgg19") -> None:
        super().__init__()
        if kind not in _VGG_CFG:
            raise ValueError(f"unknown VGG kind {kind!r}; allowed values: {sorted(_VGG_CFG)}")
        self.arch = kind
        layers: list[nn.Module] = []
        ch = 3
        for v in _VGG_CFG[kind]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(ch, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                ch = int(v)
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def vgg16_features() -> VGGFeatures:
    """torchvision ``vgg16().features`` layout (14,714,688 parameters), randomly initialised."""
    return VGGFeatures("vgg16")


def vgg19_features() -> VGGFeatures:
    """torchvision ``vgg19().features`` layout (20,024,384 parameters), randomly initialised."""
    return VGGFeatures("vgg19")


def vgg_layer_names(kind: str) -> dict[str, int]:
    """Map ``conv{b}_{i}`` / ``relu{b}_{i}`` / ``pool{b}`` to indices in ``features``."""
    names: dict[str, int] = {}
    block, conv, idx = 1, 0, 0
    for v in _VGG_CFG[kind]:
        if v == "M":
            names[f"pool{block}"] = idx
            idx += 1
            block, conv = block + 1, 0
        else:
            conv += 1
            names[f"conv{block}_{conv}"] = idx
            names[f"relu{block}_{conv}"] = idx + 1
            idx += 2
    return names


# --------------------------------------------------------------------------------------
# ResNet-50
# --------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """torchvision ResNet V1.5 bottleneck (stride on the 3x3 conv), expansion 4."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision ResNet with :class:`Bottleneck` blocks (key layout of ``torchvision.models.resnet``)."""

    def __init__(
        self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything up to and including global average pooling, flattened: ``(B, 2048)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """torchvision ``resnet50()`` layout (25,557,032 parameters for 1000 classes, 3 channels)."""
    net = ResNet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)
    net.arch = "resnet50"
    return net


# --------------------------------------------------------------------------------------
# Loading ImageNet weights from a local file
# --------------------------------------------------------------------------------------
def _arch_of(module: nn.Module) -> str | None:
    return getattr(module, "arch", None)


def _download_hint(module: nn.Module, params_key: str | None) -> str:
    arch = _arch_of(module)
    fname = TORCHVISION_FILES.get(arch or "", None)
    where = f"set the parameter '{params_key}' to its path" if params_key else (
        "pass its path (the corresponding weights entry of your params profile)"
    )
    if fname is None:
        return f"Provide a torchvision ImageNet state-dict file for {type(module).__name__} and {where}."
    return (
        f"Download the torchvision ImageNet weights of {arch} ({fname}) from {_URL}{fname} "
        f"on a machine with internet access, copy it to this machine (the paper profile expects "
        f"data/weights/{fname} in the repository, a git-ignored folder; relative paths are taken "
        f"from the repository root) and {where}, or set that parameter to null to use randomly "
        "initialized weights instead (not the paper's; the run records that no pretrained "
        "weights were loaded)."
    )


def load_imagenet_weights(
    module: nn.Module,
    path: str | os.PathLike[str] | None,
    *,
    strict: bool = True,
    params_key: str | None = None,
) -> bool:
    """Load a torchvision ImageNet state-dict file into ``module``.

    ``path=None`` -> returns False and leaves ``module`` untouched (the caller logs the
    fallback). A missing file -> ``FileNotFoundError`` saying which torchvision file to get and
    where to configure it (``params_key`` names the parameter in the message). Entries under
    ``module.ignored_prefixes`` (e.g. the VGG classifier) are skipped. ``strict=True``: every
    other key must match in name and shape (``RuntimeError`` naming the file and first
    mismatches). ``strict=False``: only entries whose name and shape match are loaded (e.g. a
    ResNet with a new first conv or head). Returns True once loaded.
    """
    if path is None:
        return False
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet weights file not found: {path!r}. " + _download_hint(module, params_key)
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"could not read ImageNet weights file {path!r}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RuntimeError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    ignored = tuple(getattr(module, "ignored_prefixes", ()))
    state = {k: v for k, v in state.items() if not (ignored and k.startswith(ignored))}
    own = module.state_dict()
    if strict:
        problem = describe_mismatch(own, state)
        if problem:
            raise RuntimeError(
                f"ImageNet weights {path!r} do not match {type(module).__name__}: {problem}"
            )
        module.load_state_dict(state, strict=True)
    else:
        keep = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        module.load_state_dict(keep, strict=False)
    return True


# --------------------------------------------------------------------------------------
# Perceptual loss
# --------------------------------------------------------------------------------------
_DEFAULT_LAYERS = {
    "vgg16": ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),  # cVAE: indices 3, 8, 15, 22
    "vgg19": ("conv5_4",),  # WGAN-VGG: index 34 (conv5_4 output, before its ReLU)
}


class VGGPerceptualLoss(nn.Module):
    """Sum over layers of the L1 (or MSE) distance between VGG feature maps.

    ``layers``: names (``"relu1_2"``, ``"conv5_4"``, ...) or integer indices into torchvision's
    ``features``; default: VGG16 relu1_2/relu2_2/relu3_3/relu4_3 (the authors' cVAE) or VGG19
    conv5_4 (index 34, *before* the ReLU, as in ldct-benchmark's WGAN-VGG). Each layer adds
    ``mean |phi(a) - phi(b)|`` (or the mean square), unweighted, like the authors' code.

    Input mapping of ``(B, 1, H, W)`` normalized CT tensors to 3 channels:

    * ``"repeat"`` (default, the authors' choice in ldct-benchmark and ldct-invariances): the
      normalized image is repeated to 3 channels, no windowing and no ImageNet normalization
      (normalized CT units already have roughly zero mean and unit variance).
    * ``"imagenet"``: de-normalize to HU (``hu = x * std + mean - 1024``), window to [0, 1]
      with ``window=(center, width)`` in HU (clipped; default lung window -600/1500), repeat to
      3 channels and apply the ImageNet mean/std. Gradients vanish outside the window.

    Without ``weights_path`` a VGG initialised from a fixed ``seed`` is used (deterministic,
    global RNG untouched) and ``pretrained`` is False. Parameters are frozen and the network
    stays in eval mode; gradients still flow to the inputs.
    """

    def __init__(
        self,
        layers: Iterable[str | int] | None = None,
        weights_path: str | os.PathLike[str] | None = None,
        kind: str = "vgg19",
        norm: str = "l1",
        input_mapping: str = "repeat",
        window: tuple[float, float] = (-600.0, 1500.0),
        data_mean: float = 481.454198,
        data_std: float = 502.185074,
        seed: int = 0,
        params_key: str | None = None,
    ) -> None:
        super().__init__()
        if kind not in _VGG_CFG:
            raise ValueError(f"kind must be 'vgg16' or 'vgg19', got {kind!r}")
        if norm not in ("l1", "mse"):
            raise ValueError(f"norm must be 'l1' or 'mse', got {norm!r}")
        if input_mapping not in ("repeat", "imagenet"):
            raise ValueError(f"input_mapping must be 'repeat' or 'imagenet', got {input_mapping!r}")
        names = vgg_layer_names(kind)
        n_modules = 2 * sum(1 for v in _VGG_CFG[kind] if v != "M") + _VGG_CFG[kind].count("M")
        idx: list[int] = []
        for layer in _DEFAULT_LAYERS[kind] if layers is None else layers:
            if isinstance(layer, str) and layer.isdigit():
                layer = int(layer)
            if isinstance(layer, int):
                if not 0 <= layer < n_modules:
                    raise ValueError(
                        f"layer index {layer} out of range for {kind} features (0..{n_modules - 1})"
                    )
                idx.append(layer)
            elif layer in names:
                idx.append(names[layer])
            else:
                raise ValueError(
                    f"unknown {kind} layer {layer!r}; use indices or names like {list(names)[:4]}..."
                )
        if not idx:
            raise ValueError("layers must not be empty")
        self.kind = kind
        self.layer_indices = tuple(sorted(set(idx)))
        self.norm = norm
        self.input_mapping = input_mapping
        self.window = (float(window[0]), float(window[1]))
        self.data_mean = float(data_mean)
        self.data_std = float(data_std)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vgg = VGGFeatures(kind)
        self.pretrained = load_imagenet_weights(vgg, weights_path, params_key=params_key)
        self.features = vgg.features[: max(self.layer_indices) + 1]
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("imagenet_mean", mean, persistent=False)
        self.register_buffer("imagenet_std", std, persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        """Always stays in eval mode (frozen feature extractor)."""
        return super().train(False)

    def to_vgg_input(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 1, H, W)`` normalized CT images to the 3-channel VGG input."""
        if x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) input, got {tuple(x.shape)}")
        if self.input_mapping == "repeat":
            return x.repeat(1, 3, 1, 1)
        center, width = self.window
        hu = x * self.data_std + self.data_mean - 1024.0
        v = ((hu - (center - width / 2.0)) / width).clamp(0.0, 1.0)
        return (v.repeat(1, 3, 1, 1) - self.imagenet_mean) / self.imagenet_std

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at ``layer_indices`` for ``(B, 1, H, W)`` input."""
        h = self.to_vgg_input(x)
        out = []
        for i, m in enumerate(self.features):
            h = m(h)
            if i in self.layer_indices:
                out.append(h)
        return out

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(
                f"input and target shapes differ: {tuple(input.shape)} vs {tuple(target.shape)}"
            )
        n = input.shape[0]
        feats = self.extract(torch.cat((input, target), dim=0))
        dist = F.l1_loss if self.norm == "l1" else F.mse_loss
        loss = input.new_zeros(())
        for f in feats:
            loss = loss + dist(f[:n], f[n:])
        return loss

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, layers={self.layer_indices}, norm={self.norm!r}, "
            f"input_mapping={self.input_mapping!r}, pretrained={self.pretrained}"
        )
