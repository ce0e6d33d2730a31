"""Sinusoidal timestep features, shared by every family's timestep embedding."""

from __future__ import annotations

import math

import torch

FREQUENCY_DIM = 256


def timestep_frequencies(
    t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal features of ``t`` in [0, 1] (scaled to [0, 1000]): ``[N]`` -> ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)
