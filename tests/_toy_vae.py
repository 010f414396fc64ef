"""A small spatial cVAE for 16² toy problems and its training loop (tests whose answer is known)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from invariscope.models.spatial import SpatialVAE, SpatialVAEConfig, elbo_terms

#: 16² crops, a 4 × 4 × 8 latent, width 32: trains in seconds on a CPU.
TOY_CONFIG = SpatialVAEConfig(crop_size=16, downsample=4, latent_channels=8, encoder_width=32,
                              decoder_width=32, decoder_sd=0.1)


def train_toy_vae(vae: SpatialVAE, f: nn.Module, batch: Callable[[int], torch.Tensor], steps: int,
                  lr: float = 3e-3, batch_size: int = 32) -> SpatialVAE:
    """Train ``vae`` as the cVAE of ``f`` (ELBO, Adam) on ``batch(batch_size)`` draws; eval mode."""
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    for _ in range(steps):
        x = batch(batch_size)
        rec, mu, lv = vae(x, f(x))
        loss = elbo_terms(x, rec, mu, lv, vae.config.decoder_sd)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval()
