"""Named layers of a denoiser f = Ψ ∘ Φ_l: the representation Φ_l(x) after a layer (talk 002).

A layer is named by its module path in the denoiser (``model.named_modules()``), e.g. CNN-10's
``layers.1`` (the ReLU after its first convolution) or WGAN-VGG's ``net.3``; ``output`` is f(x)
itself. Custom denoisers are named in their own module's coordinates: the wrappers the companion
puts around them (:class:`~invariscope.models.custom.ContractCheck`,
:class:`~invariscope.models.custom.HUAdapter`) are looked through.

:class:`LayerFeatures` is a module ``x -> Φ_l(x)``: a forward hook on the named module records its
output and stops the forward pass there, so the layers after it are not computed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invariscope.models.custom import ContractCheck, HUAdapter

__all__ = ["OUTPUT", "LayerNotFoundError", "layer_paths", "resolve_layer", "LayerFeatures",
           "feature_shape"]

#: The name of the denoiser's output f(x) as a layer.
OUTPUT = "output"
_WRAPPER_PREFIXES = ("", "model.", "model.model.", "model.model.model.")


class LayerNotFoundError(KeyError):
    """A layer name that is not a module path of the denoiser (the message lists the valid ones)."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class _Stop(Exception):
    """Raised by the hook: the requested layer has been computed."""


def layer_paths(model: nn.Module) -> list[str]:
    """The module paths a layer can be named by (leaf modules, wrapper prefixes removed), and ``output``."""
    prefix = _prefix(model)
    paths = [name[len(prefix):] for name, m in model.named_modules()
             if name.startswith(prefix) and name != prefix.rstrip(".") and not list(m.children())]
    return paths + [OUTPUT]


def _prefix(model: nn.Module) -> str:
    """The path of the user's module inside the companion's wrappers ('' for built-ins)."""
    prefix, m = "", model
    while isinstance(m, (ContractCheck, HUAdapter)):
        prefix, m = prefix + "model.", m.model
    return prefix


def resolve_layer(model: nn.Module, layer: str) -> nn.Module | None:
    """The module named ``layer`` (None for ``output``); :class:`LayerNotFoundError` lists the valid names."""
    if layer == OUTPUT:
        return None
    prefix = _prefix(model)
    for p in (prefix,) + _WRAPPER_PREFIXES:
        try:
            return model.get_submodule(p + layer)
        except AttributeError:
            continue
    valid = ", ".join(layer_paths(model))
    raise LayerNotFoundError(f"layer {layer!r} is not a module of {type(model).__name__}; "
                             f"name one of: {valid}")


class LayerFeatures(nn.Module):
    """``x -> Φ_l(x)``: the output of ``model``'s module ``layer`` (``output``: f(x)).

    The forward pass stops at the layer (a hook raises after recording it); the result is a
    tensor (a module returning a tuple contributes its first element). ``size``: a feature map of
    another height and width (a layer of a network that changes resolution) is resampled
    bilinearly to ``size`` × ``size``, the crop's grid, so each cINN condition cell sees its own region.
    """

    def __init__(self, model: nn.Module, layer: str, size: int | None = None) -> None:
        super().__init__()
        self.model, self.layer, self.size = model, layer, size
        self._target = resolve_layer(model, layer)

    def forward(self, x: Tensor) -> Tensor:
        out = self._features(x)
        if self.size is not None and out.ndim == 4 and tuple(out.shape[-2:]) != (self.size, self.size):
            out = F.interpolate(out, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return out

    def _features(self, x: Tensor) -> Tensor:
        if self._target is None:
            return self.model(x)
        box: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: Sequence[Tensor], output: Tensor | tuple) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            box.append(out.clone())  # a later in-place op must not change it
            raise _Stop

        handle = self._target.register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not box:
            raise RuntimeError(f"layer {self.layer!r} of {type(self.model).__name__} was not run by "
                               "its forward pass (a module that is defined but not used)")
        return box[0]


@torch.no_grad()
def feature_shape(model: nn.Module, layer: str, crop_size: int) -> tuple[int, int, int]:
    """``(channels, height, width)`` of Φ_l(x) for a ``crop_size``² input."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = LayerFeatures(model, layer)(torch.zeros(1, 1, crop_size, crop_size, device=dev))
    if out.ndim != 4:
        raise ValueError(f"layer {layer!r} gives a tensor of shape {tuple(out.shape)}; a layer-wise "
                         "cINN needs a feature map (N, C, H, W)")
    return tuple(int(v) for v in out.shape[1:])  # type: ignore[return-value]
