"""Your own denoiser: built from a ``denoisers.custom`` entry of a params file.

A custom denoiser is an already trained ``torch.nn.Module``; the companion does not train it,
it only evaluates it (Table 1), trains its conditional VAE and cINN, samples its invariances
and analyzes them, exactly as for the built-in methods. See the README, "Analyze your own
denoiser", and ``examples/own_denoiser/``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from invariscope.config.params import CustomDenoiserParams, Params
from invariscope.config.paths import RELATIVE_RULE, setting_candidates

__all__ = ["is_custom", "spec", "resolve_file", "build_custom", "HUAdapter"]
# its identity (what its outputs depend on): invariscope.provenance.custom_identity


def is_custom(name: str, params: Params) -> bool:
    """Whether ``name`` is a key of ``denoisers.custom``."""
    return name in params.denoisers.custom


def spec(name: str, params: Params) -> CustomDenoiserParams:
    """The ``denoisers.custom`` entry of ``name`` (ValueError naming the allowed keys)."""
    try:
        return params.denoisers.custom[name]
    except KeyError:
        have = ", ".join(params.denoisers.custom) or "none"
        raise ValueError(f"{params.source_file}: no denoisers.custom entry {name!r} "
                         f"(custom denoisers there: {have})") from None


def resolve_file(setting: str, params: Params, what: str) -> Path:
    """A file setting (:data:`~invariscope.config.paths.RELATIVE_RULE`); FileNotFoundError naming
    where it was looked for."""
    tried = setting_candidates(setting, params.source_file)
    found = next((c for c in tried if c.is_file()), None)
    if found is not None:
        return found.resolve()
    raise FileNotFoundError(f"{params.source_file}: {what} {setting!r} not found (looked at "
                            f"{', '.join(map(str, tried))}: {RELATIVE_RULE})")


def _import(module: str, params: Params) -> object:
    """The object named by ``'file.py:name'`` or ``'package.module:name'``."""
    where, attr = module.rsplit(":", 1)
    if where.endswith(".py"):
        path = resolve_file(where, params, "denoisers.custom module file")
        mod_name = f"invariscope_custom_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        if spec_ is None or spec_.loader is None:
            raise ImportError(f"cannot import {path}")
        mod = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = mod
        spec_.loader.exec_module(mod)
    else:
        mod = importlib.import_module(where)
    if not hasattr(mod, attr):
        raise AttributeError(f"{params.source_file}: denoisers.custom module {module!r}: "
                             f"{where} has no attribute {attr!r}")
    return getattr(mod, attr)


class HUAdapter(nn.Module):
    """Wraps a HU-to-HU denoiser so it maps normalized images like the built-in ones."""

    def __init__(self, model: nn.Module, mean_hu: float, std_hu: float) -> None:
        super().__init__()
        self.model, self.mean_hu, self.std_hu = model, float(mean_hu), float(std_hu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x * self.std_hu + self.mean_hu) - self.mean_hu) / self.std_hu


class ContractCheck(nn.Module):
    """Wraps a custom denoiser: its output must have the input's shape ``(N, 1, H, W)``; any
    other shape stops with an error naming the method, both shapes and the contract."""

    def __init__(self, model: nn.Module, name: str, module: str) -> None:
        super().__init__()
        self.model, self.name, self.module = model, name, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"own denoiser {self.name!r} ({self.module}) returned {got} for an input of shape "
                f"{tuple(x.shape)}: a denoiser must map a batch (N, 1, H, W) to a tensor of the "
                "same shape (one denoised image per input image, same size; README, 'Your own "
                "denoiser')")
        return y


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report which file and why
        raise ValueError(f"{path}: not a readable torch state dict ({exc})") from None
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (or a checkpoint with 'model_state_dict')")
    return obj


def build_custom(name: str, params: Params, normalization: tuple[float, float]) -> nn.Module:
    """The eval-mode, frozen custom denoiser ``name`` mapping normalized images.

    ``normalization``: the data set's (mean HU, SD HU), used when the entry's ``input`` is
    ``"hu"``. Weights are loaded strictly: a missing or unexpected key is an error naming them.
    """
    entry = spec(name, params)
    factory = _import(entry.module, params)
    if not callable(factory):
        raise TypeError(f"denoisers.custom.{name}.module {entry.module!r} is not callable")
    model = factory(**entry.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"denoisers.custom.{name}.module {entry.module!r} returned "
                        f"{type(model).__name__}, not a torch.nn.Module")
    if entry.weights is not None:
        path = resolve_file(entry.weights, params, f"denoisers.custom.{name}.weights")
        try:
            missing, unexpected = model.load_state_dict(_state_dict(path), strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{path} does not fit denoisers.custom.{name}.module "
                             f"{entry.module!r}: {exc}") from None
        if missing or unexpected:
            raise ValueError(f"{path} does not fit denoisers.custom.{name}.module: missing keys "
                             f"{list(missing)[:5]}, unexpected keys {list(unexpected)[:5]}")
    if entry.input == "hu":
        model = HUAdapter(model, *normalization)
    model = ContractCheck(model, name, entry.module)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
