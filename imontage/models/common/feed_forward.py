"""diffusers' ``FeedForward``, named as diffusers names it, for the pretrained families.

``net.0.proj`` (a linear and its activation), ``net.1`` (diffusers' parameter-free dropout, kept so
the names line up) and ``net.2``: state-dict keys equal diffusers', so folders load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


class ActivatedLinear(nn.Module):
    """A linear, then ``activation``: exact GELU, tanh-approximated GELU or SiLU."""

    def __init__(self, dim_in: int, dim_out: int, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation '{activation}' is not one of {', '.join(ACTIVATIONS)}")
        self.proj = nn.Linear(dim_in, dim_out)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.activation == "silu":
            return F.silu(x)
        return F.gelu(x, approximate="tanh" if self.activation == "gelu_tanh" else "none")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int, dim_out: int, activation: str) -> None:
        super().__init__()
        self.net = nn.Sequential(
            ActivatedLinear(dim, inner_dim, activation), nn.Identity(), nn.Linear(inner_dim, dim_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
