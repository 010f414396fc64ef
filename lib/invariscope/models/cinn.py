"""Conditional invertible neural network t(z | ŷ) mapping cVAE latents to N(0, I) (paper Sec. 2.3.2).

Built with FrEIA (``Ff.SequenceINN``). Each of ``n_blocks`` (paper 12) blocks is::

    Fm.ActNorm -> InvertibleLeakyReLU(0.9) -> Fm.RNVPCouplingBlock(cond) -> Fm.PermuteRandom(seed=i)

The coupling subnets are MLPs ``Linear(in, hidden), [Linear(hidden, hidden)] * hidden_depth,
Linear(hidden, out)`` with LeakyReLU(0.01) between, exactly as the authors'
``BasicFullyConnectedNet(depth=2)``; the multiplicative part is soft-clamped by
``clamp * tanh(·)`` with clamp 1 (the authors put a tanh on the scale net's output). The
condition is an embedding of ŷ by :class:`ConditionEmbedder`, trained jointly with the flow.

With the paper's sizes (latent 256, hidden 1024, hidden_depth 2, 12 blocks, base 64,
cond 256, 128×128 condition) the model has 125,988,864 flow + 11,144,320 embedder =
137,133,184 trainable parameters, matching the authors' model (see :func:`expected_parameter_count`).

Differences to the authors' code (documented, deliberate):

* :class:`InvertibleLeakyReLU` returns its true log-determinant ``n_neg * log(alpha)``;
  the authors' returns 0, so their NLL is too low by about 184 nats per sample at
  the paper's sizes (gradients are identical, the term is piecewise constant).
* FrEIA's ``ActNorm`` stores a log-scale (``x * exp(s) + b``) where the authors store a
  scale (``scale * (x + loc)``); same family, same parameter count.
* The NLL here is exact: ActNorm, LeakyReLU and both coupling halves are all counted.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from invariscope.precision import Float32Sequential, float32_except_subnets, full

__all__ = [
    "InvertibleLeakyReLU",
    "DataActNorm2d",
    "ConditionEmbedder",
    "ConditionalINN",
    "NotInitializedError",
    "count_parameters",
    "expected_parameter_count",
    "PAPER_CINN_CONFIG",
]

#: Authors' cINN configuration (``configs/cinn.yaml`` of eeulig/ldct-invariances).
PAPER_CINN_CONFIG: dict[str, int | float] = {
    "latent_dim": 256,
    "cond_size": 128,
    "cond_channels": 1,
    "cond_dim": 256,
    "base_channels": 64,
    "n_down": 4,
    "n_blocks": 12,
    "hidden": 1024,
    "hidden_depth": 2,
    "clamp": 1.0,
    "leaky_slope": 0.9,
}


class NotInitializedError(RuntimeError):
    """Raised when inverting/sampling a cINN whose ActNorm layers were never data-initialized."""


class InvertibleLeakyReLU(Fm.InvertibleModule):
    """Elementwise ``y = x if x >= 0 else alpha * x`` with its log|det J| counted.

    ``log|det J| = (number of negative inputs) * log(alpha)`` per sample; the inverse
    returns the negative (sign is preserved for ``alpha > 0``, so negatives of ``y``
    are exactly the negatives of ``x``).
    """

    def __init__(self, dims_in: Sequence[tuple[int, ...]], dims_c: Sequence[tuple[int, ...]] | None = None,
                 alpha: float = 0.9) -> None:
        super().__init__(dims_in, dims_c)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.log_alpha = math.log(self.alpha)

    def forward(self, x: Sequence[Tensor], c: Iterable[Tensor] | None = None, rev: bool = False,
                jac: bool = True) -> tuple[tuple[Tensor], Tensor]:
        h = x[0]
        neg = h < 0
        n_neg = neg.flatten(1).sum(dim=1).to(h.dtype)
        if not rev:
            out = torch.where(neg, h * self.alpha, h)
            return (out,), n_neg * self.log_alpha
        out = torch.where(neg, h / self.alpha, h)
        return (out,), -n_neg * self.log_alpha

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        if len(input_dims) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly one input")
        return input_dims

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class DataActNorm2d(nn.Module):
    """Per-channel affine ``scale * (x + loc)``, initialized from the first batch it sees.

    Non-invertible use (the condition embedder), as in the authors' code: ``loc = -mean``,
    ``scale = 1 / (std + 1e-6)`` over batch and space of the first forward batch. The
    ``initialized`` buffer is part of the state dict, so a loaded model never re-initializes.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``loc``/``scale`` so that ``x`` has zero mean and unit std per channel."""
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        if flat.shape[1] < 2:
            raise ValueError("DataActNorm2d needs at least 2 values per channel to initialize")
        self.loc.data.copy_(-flat.mean(1).view_as(self.loc))
        self.scale.data.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.initialized.item() == 0:
            self.initialize(x)
        return self.scale * (x + self.loc)


class ConditionEmbedder(nn.Module):
    """Conv net embedding ŷ (B, C, S, S) into a condition vector (B, cond_dim).

    ``n_down`` (paper 4) × [Conv 4×4 stride 2 pad 1, no bias → :class:`DataActNorm2d` →
    LeakyReLU(0.2)] with ``base_channels * min(2**i, 16)`` channels (paper 64, 128, 256, 512),
    then a Conv with bias whose kernel is the remaining spatial size ``S / 2**n_down`` to
    ``cond_dim`` (paper 256). This is the authors' ``Embedder`` (11,144,320 parameters at
    S = 128). ``S`` must be divisible by ``2**n_down`` (32, 48, 64, 128 all work with 4).
    """

    def __init__(self, in_size: int = 128, in_channels: int = 1, cond_dim: int = 256,
                 base_channels: int = 64, n_down: int = 4) -> None:
        super().__init__()
        if n_down < 1:
            raise ValueError("n_down must be >= 1")
        if in_size % (2**n_down) != 0:
            raise ValueError(f"in_size {in_size} must be divisible by 2**n_down = {2**n_down}")
        self.in_size = in_size
        self.in_channels = in_channels
        self.cond_dim = cond_dim
        self.bottleneck_size = in_size // 2**n_down
        layers: list[nn.Module] = []
        ch_in = in_channels
        for i in range(n_down):
            ch_out = base_channels * min(2**i, 16)
            layers += [
                nn.Conv2d(ch_in, ch_out, kernel_size=4, stride=2, padding=1, bias=False),
                DataActNorm2d(ch_out),
                nn.LeakyReLU(0.2),
            ]
            ch_in = ch_out
        self.features = nn.Sequential(*layers)
        self.dense = nn.Conv2d(ch_in, cond_dim, kernel_size=self.bottleneck_size, bias=True)

    def forward(self, y_hat: Tensor) -> Tensor:
        if y_hat.dim() != 4 or tuple(y_hat.shape[1:]) != (self.in_channels, self.in_size, self.in_size):
            raise ValueError(f"expected condition of shape (B, {self.in_channels}, {self.in_size}, "
                             f"{self.in_size}), got {tuple(y_hat.shape)}")
        return self.dense(self.features(y_hat)).flatten(1)

    @property
    def is_initialized(self) -> bool:
        return all(bool(m.initialized.item()) for m in self.modules() if isinstance(m, DataActNorm2d))


def _mlp_constructor(hidden: int, hidden_depth: int):
    """Subnet factory for FrEIA coupling blocks: ``hidden_depth + 2`` Linear layers."""

    def make(c_in: int, c_out: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(c_in, hidden), nn.LeakyReLU()]
        for _ in range(hidden_depth):
            layers += [nn.Linear(hidden, hidden), nn.LeakyReLU()]
        layers.append(nn.Linear(hidden, c_out))
        return Float32Sequential(*layers)  # the coupling arithmetic stays in float32

    return make


class ConditionalINN(nn.Module):
    """cINN ``v = t(z | ŷ)`` with a jointly trained condition embedder (paper Eq. 5–6).

    Call :meth:`initialize` with a batch of training latents (or run one training
    forward pass, or load a state dict) before :meth:`inverse` / :meth:`sample`:
    FrEIA's ActNorm fits itself to the first batch it sees, whichever direction.
    """

    def __init__(self, latent_dim: int = 256, cond_size: int = 128, cond_channels: int = 1,
                 cond_dim: int = 256, base_channels: int = 64, n_down: int = 4, n_blocks: int = 12,
                 hidden: int = 1024, hidden_depth: int = 2, clamp: float = 1.0, leaky_slope: float = 0.9,
                 coupling: Literal["rnvp", "glow"] = "rnvp") -> None:
        super().__init__()
        if coupling not in ("rnvp", "glow"):
            raise ValueError(f"coupling must be 'rnvp' or 'glow', got {coupling!r}")
        self.latent_dim = latent_dim
        self.cond_dim = cond_dim
        self.config = dict(latent_dim=latent_dim, cond_size=cond_size, cond_channels=cond_channels,
                           cond_dim=cond_dim, base_channels=base_channels, n_down=n_down, n_blocks=n_blocks,
                           hidden=hidden, hidden_depth=hidden_depth, clamp=clamp, leaky_slope=leaky_slope,
                           coupling=coupling)
        self.embedder = ConditionEmbedder(cond_size, cond_channels, cond_dim, base_channels, n_down)
        block = Fm.RNVPCouplingBlock if coupling == "rnvp" else Fm.GLOWCouplingBlock
        subnet = _mlp_constructor(hidden, hidden_depth)
        np_state = np.random.get_state()  # PermuteRandom(seed=...) reseeds NumPy's global RNG
        try:
            flow = Ff.SequenceINN(latent_dim)
            for i in range(n_blocks):
                flow.append(Fm.ActNorm)
                flow.append(InvertibleLeakyReLU, alpha=leaky_slope)
                flow.append(block, cond=0, cond_shape=(cond_dim,), subnet_constructor=subnet,
                            clamp=clamp, clamp_activation="TANH")
                flow.append(Fm.PermuteRandom, seed=i)
        finally:
            np.random.set_state(np_state)
        self.flow = flow

    # ------------------------------------------------------------------ state
    def _actnorms(self) -> list[Fm.ActNorm]:
        return [m for m in self.flow.modules() if isinstance(m, Fm.ActNorm)]

    @property
    def is_initialized(self) -> bool:
        """True once every ActNorm (flow and embedder) was data-initialized or loaded."""
        return all(not m.init_on_next_batch for m in self._actnorms()) and self.embedder.is_initialized

    def _require_initialized(self) -> None:
        if not self.is_initialized:
            raise NotInitializedError(
                "ConditionalINN was never data-initialized: call model.initialize(z, y_hat) with a batch "
                "of training latents (or run a training forward pass, or load a trained state dict) "
                "before inverse()/sample(); otherwise FrEIA's ActNorm would fit itself to latent-side "
                "samples v.")

    @torch.no_grad()
    def initialize(self, z: Tensor, y_hat: Tensor) -> None:
        """(Re-)initialize all ActNorm layers from one batch of training data (batch >= 2)."""
        if z.shape[0] < 2:
            raise ValueError("initialize needs a batch of at least 2 samples")
        for m in self._actnorms():
            m.init_on_next_batch = True
        for m in self.embedder.modules():
            if isinstance(m, DataActNorm2d):
                m.initialized.fill_(0)
        self.forward(z, y_hat)

    # ------------------------------------------------------------ directions
    def embed(self, y_hat: Tensor) -> Tensor:
        """Condition vector (B, cond_dim) for ŷ (B, C, S, S)."""
        return self.embedder(y_hat)

    def forward_embedded(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(v, log|det ∂v/∂z|)`` for latents z (B, D) and a precomputed condition (B, cond_dim)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected z of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        if z.shape[0] < 2 and any(m.init_on_next_batch for m in self._actnorms()):
            raise ValueError("the first forward pass data-initializes ActNorm and needs a batch >= 2")
        with float32_except_subnets(z.device.type):  # the flow's arithmetic in float32
            v, log_jac_det = self.flow(full(z), c=[full(cond)], jac=True)
        return v, log_jac_det

    def forward(self, z: Tensor, y_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(v, log|det ∂v/∂z|)`` with v = t(z | ŷ)."""
        return self.forward_embedded(z, self.embed(y_hat))

    def inverse_embedded(self, v: Tensor, cond: Tensor) -> Tensor:
        """``z = t⁻¹(v | ŷ)`` for a precomputed condition."""
        self._require_initialized()
        with float32_except_subnets(v.device.type):
            z, _ = self.flow(full(v), c=[full(cond)], rev=True, jac=False)
        return z

    def inverse(self, v: Tensor, y_hat: Tensor) -> Tensor:
        """``z = t⁻¹(v | ŷ)``."""
        self._require_initialized()
        return self.inverse_embedded(v, self.embed(y_hat))

    # ------------------------------------------------------------ likelihood
    def nll_loss(self, z: Tensor, y_hat: Tensor, per_dim: bool = False) -> Tensor:
        """Paper's loss ``mean(½‖v‖²) − mean(log|det J|)`` (nats per sample, no ½D·log 2π).

        ``per_dim=True`` divides by ``latent_dim`` (nats per dimension); optimum unchanged.
        """
        v, log_jac_det = self.forward(z, y_hat)
        v, log_jac_det = full(v), full(log_jac_det)  # float32 under autocast too
        loss = 0.5 * v.pow(2).sum(dim=1).mean() - log_jac_det.mean()
        return loss / self.latent_dim if per_dim else loss

    def log_prob(self, z: Tensor, y_hat: Tensor) -> Tensor:
        """Exact per-sample ``log p(z | ŷ)`` in nats, including ``−½D·log 2π``."""
        v, log_jac_det = self.forward(z, y_hat)
        return -0.5 * v.pow(2).sum(dim=1) - 0.5 * self.latent_dim * math.log(2 * math.pi) + log_jac_det

    # -------------------------------------------------------------- sampling
    def sample_embedded(self, cond: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` latents per condition row: (B, n, D), v ~ N(0, I), z̃ = t⁻¹(v | ŷ).

        v is drawn on the ``generator``'s device (None: on the condition's) and moved to the
        condition's, so a CPU generator gives the same v on every device.
        """
        self._require_initialized()
        b = cond.shape[0]
        where = generator.device if generator is not None else cond.device
        v = torch.randn(b * n, self.latent_dim, generator=generator, device=where,
                        dtype=cond.dtype).to(cond.device)
        z = self.inverse_embedded(v, cond.repeat_interleave(n, dim=0))
        return z.view(b, n, self.latent_dim)

    def sample(self, y_hat: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` invariance latents per crop: ŷ (B, C, S, S) or (C, S, S) → z̃ (B, n, D) or (n, D).

        Each crop is embedded once.
        """
        self._require_initialized()
        single = y_hat.dim() == 3
        cond = self.embed(y_hat[None] if single else y_hat)
        z = self.sample_embedded(cond, n, generator=generator)
        return z[0] if single else z


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; FrEIA's fixed permutations are not trainable."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def expected_parameter_count(latent_dim: int = 256, cond_size: int = 128, cond_channels: int = 1,
                             cond_dim: int = 256, base_channels: int = 64, n_down: int = 4, n_blocks: int = 12,
                             hidden: int = 1024, hidden_depth: int = 2, coupling: str = "rnvp",
                             **_: object) -> dict[str, int]:
    """Analytic trainable-parameter counts ``{"flow", "embedder", "total"}`` of :class:`ConditionalINN`."""

    def mlp(c_in: int, c_out: int) -> int:
        return (c_in + 1) * hidden + hidden_depth * (hidden + 1) * hidden + (hidden + 1) * c_out

    d1 = round(latent_dim * 0.5)
    d2 = latent_dim - d1
    if coupling == "rnvp":
        coup = 2 * mlp(d1 + cond_dim, d2) + 2 * mlp(d2 + cond_dim, d1)
    else:
        coup = mlp(d1 + cond_dim, 2 * d2) + mlp(d2 + cond_dim, 2 * d1)
    flow = n_blocks * (2 * latent_dim + coup)
    emb, ch_in = 0, cond_channels
    for i in range(n_down):
        ch_out = base_channels * min(2**i, 16)
        emb += ch_in * ch_out * 16 + 2 * ch_out
        ch_in = ch_out
    k = cond_size // 2**n_down
    emb += ch_in * cond_dim * k * k + cond_dim
    return {"flow": flow, "embedder": emb, "total": flow + emb}
