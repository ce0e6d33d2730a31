"""Exponential moving average of a model's parameters, kept in float32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """``shadow = decay · shadow + (1 − decay) · param`` after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {name: params[name].detach().float().clone() for name in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        shadows = [self.shadow[name] for name in self.names]
        torch._foreach_lerp_(
            shadows, [params[name].detach().float() for name in self.names], 1.0 - self.decay
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name in self.names:
            self.shadow[name].copy_(state[name])

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (for sampling); restored exactly on exit."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.names}
        try:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(self.shadow[name])
            yield model
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(saved[name])
