"""Comparing a state dict from a file with a module's own, for clear loading errors."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def describe_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """'' when ``state`` matches ``own`` key for key and shape for shape, else what differs."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs module {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys (first 5 of {len(missing)}): {missing[:5]}")
    if unexpected:
        parts.append(f"unexpected keys (first 5 of {len(unexpected)}): {unexpected[:5]}")
    if shapes:
        parts.append(f"shape mismatches (first 5 of {len(shapes)}): {shapes[:5]}")
    return "; ".join(parts)
