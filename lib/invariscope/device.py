"""Where the networks run: the profile's ``device`` setting as a torch device.

``device`` in a params file (or the environment variable ``INVARISCOPE_DEVICE``, which wins) is
``auto`` (the first CUDA GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or
``cuda:<index>``. Training moves its networks and batches there; the loaders
(:func:`~invariscope.stages.denoiser_training.load_denoiser`, ``load_vae``, ``load_cinn``,
``load_embedding``) return networks on it; the inference helpers take CPU tensors or NumPy
arrays, move each batch to their network's device and return CPU results. Random draws that
must not depend on the device (the v of every invariance, validation noise) are made on the
CPU and moved. The device is not part of any stamp or checkpoint fingerprint: a run started on
the CPU resumes on a GPU and vice versa (results then differ in the last digits).

On CUDA, cuDNN picks the fastest convolution algorithms for each shape (``cudnn.benchmark``),
which makes GPU results vary in the last digits from run to run. ``INVARISCOPE_DETERMINISTIC=1``
asks for deterministic algorithms instead (``torch.use_deterministic_algorithms``; slower, see
``benchmarks/gpu/``); CPU runs are deterministic either way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from invariscope.config.params import check_device as check_spec

__all__ = ["ENV", "DETERMINISTIC_ENV", "check_spec", "configure_cuda", "resolve", "of",
           "module_device", "to_device"]

#: Environment variable that overrides the params files' ``device``.
ENV = "INVARISCOPE_DEVICE"
#: Environment variable that asks for deterministic CUDA algorithms (``1``).
DETERMINISTIC_ENV = "INVARISCOPE_DETERMINISTIC"


def configure_cuda() -> None:
    """cuDNN autotuning on, or deterministic algorithms with ``$INVARISCOPE_DETERMINISTIC=1``."""
    if os.environ.get(DETERMINISTIC_ENV, "").strip() == "1":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True


def resolve(spec: str = "auto", where: str = "device") -> torch.device:
    """The torch device of a setting (see the module docstring).

    ``where`` names the setting in errors. Asking for ``cuda`` where torch sees no GPU raises
    RuntimeError saying what to install or set instead.
    """
    value = check_spec(spec)
    if value == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        configure_cuda()
        return torch.device("cuda", 0)
    if value == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise RuntimeError(
            f"{where} = {spec!r}, but torch {torch.__version__} ({build}) sees no CUDA GPU. Install "
            "the CUDA build of torch for your driver (README, 'Paper scale on a GPU box'), or set "
            f"{where} to 'cpu' or 'auto'.")
    index = int(value.split(":")[1]) if ":" in value else 0
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"{where} = {spec!r}: torch sees {torch.cuda.device_count()} CUDA "
                           f"device(s), indices 0..{torch.cuda.device_count() - 1}")
    configure_cuda()
    return torch.device("cuda", index)


def of(params: Any) -> torch.device:
    """The device of a profile: ``$INVARISCOPE_DEVICE`` when set, else ``params.device``."""
    env = os.environ.get(ENV, "").strip()
    if env:
        return resolve(env, where=f"${ENV}")
    where = f"device in {params.source_file}" if getattr(params, "source_file", "") else "device"
    return resolve(getattr(params, "device", "auto"), where=where)


def module_device(module: Any) -> torch.device:
    """The device of a network's first parameter or buffer (the CPU for anything else)."""
    if isinstance(module, nn.Module):
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in tuples, lists and dicts, recursively) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
