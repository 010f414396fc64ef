"""Mixed precision for training and sampling: the profile's ``precision`` setting.

``precision: fp32`` (the CPU profiles) runs everything in float32. ``bf16`` runs the networks'
convolutions and matrix products under :func:`torch.autocast` in bfloat16; ``fp16`` in float16
with a :class:`torch.amp.GradScaler` per optimizer (float16's range needs loss scaling,
bfloat16's does not). What must stay in float32 does, whatever the setting:

* the cINN's flow (couplings, permutations, ActNorm, log-determinant) and NLL: only its
  coupling subnets and condition network run in half precision (:func:`float32_except_subnets`,
  :class:`Float32Sequential`),
* the KL terms and the ELBO's reconstruction term (computed on float32 copies),
* the gradient penalties (critic forward and double backward with autocast off),
* every metric and control: Table 1 and the invariances' f(x), f(x̃) run without autocast.

:meth:`Precision.update` is every stage's optimizer step: zero the gradients, backward (scaled
for fp16), average the gradients over data-parallel processes
(:func:`invariscope.distributed.average_gradients`), clip, step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from invariscope import distributed

__all__ = ["PRECISIONS", "Precision", "Float32Sequential", "float32", "float32_except_subnets", "full"]

#: The accepted ``precision`` settings.
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast and the optimizer step of one stage at a ``precision`` on ``device``."""

    def __init__(self, precision: str = "fp32", device: torch.device | str = "cpu") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.name = precision
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision fp16 needs a CUDA device (CPU autocast has no float16 "
                             "loss scaling): use bf16 or fp32 on the CPU")
        self._scalers: dict[int, torch.amp.GradScaler] = {}
        self._names: dict[int, str] = {}

    @property
    def enabled(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward passes run in (nothing for fp32)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    def register(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        """Give every optimizer a GradScaler (fp16 only) and return what a checkpoint keeps:
        the optimizers plus ``scaler.<name>`` for each scaler (their loss scales resume too)."""
        out: dict[str, Any] = dict(optimizers)
        if self.name != "fp16":
            return out
        for name, opt in optimizers.items():
            scaler = torch.amp.GradScaler(self.device.type)
            self._scalers[id(opt)] = scaler
            out[f"scaler.{name}"] = scaler
        return out

    def update(self, loss: torch.Tensor, opt: torch.optim.Optimizer,
               clip: float | None = None, params: Iterable[torch.Tensor] | None = None) -> None:
        """One optimizer step on ``loss``: zero grad, backward, average over processes, clip the
        gradient norm of ``params`` (default: the optimizer's) to ``clip``, step."""
        opt.zero_grad(set_to_none=True)
        scaler = self._scalers.get(id(opt))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        owned = [p for g in opt.param_groups for p in g["params"]]
        distributed.average_gradients(owned)
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(owned if params is None else list(params), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is half precision (float16, bfloat16), else unchanged (float32 and
    float64 stay as they are)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@contextlib.contextmanager
def float32(device: torch.device | str) -> Iterator[None]:
    """Autocast off: what runs inside stays in float32 (cast its inputs with ``.float()``)."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield


#: The autocast a flow's subnets run under inside :func:`float32_except_subnets` (None: none).
_SUBNET_AUTOCAST: contextvars.ContextVar[tuple[str, torch.dtype] | None] = \
    contextvars.ContextVar("subnet_autocast", default=None)


@contextlib.contextmanager
def float32_except_subnets(device_type: str) -> Iterator[None]:
    """Autocast off for a normalizing flow's own arithmetic (couplings, permutations, ActNorm,
    log-determinant); its :class:`Float32Sequential` subnets keep the enclosing autocast."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    token = _SUBNET_AUTOCAST.set((device_type, torch.get_autocast_dtype(device_type)))
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        _SUBNET_AUTOCAST.reset(token)


class Float32Sequential(nn.Sequential):
    """An ``nn.Sequential`` with a float32 output: a flow's coupling subnet. Inside
    :func:`float32_except_subnets` its layers run under the enclosing autocast (half precision),
    the coupling that uses its output in float32. Same parameters and state-dict keys as
    ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp = _SUBNET_AUTOCAST.get()
        if amp is None:
            return full(super().forward(x))
        with torch.autocast(amp[0], dtype=amp[1]):
            return full(super().forward(x))
