"""Exponential moving average of a model's parameters, kept in float32.

Under ZeRO-3 each rank averages only the part of every parameter it stores (its partition, or
the whole tensor for the small parameters ZeRO keeps resident), so the EMA is sharded like the
optimiser state and costs no communication.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _zero3_persistent(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor") and bool(getattr(param, "ds_persist", False))


def held_tensor(param: nn.Parameter) -> torch.Tensor:
    """What this rank averages of ``param``: ZeRO-3's partition (``ds_tensor``), or all of it.

    ZeRO-3 keeps small "persistent" parameters whole on every rank and refreshes them after each
    step; the forward pass reads their ``param.data``, so that is what they hold.
    """
    partition = getattr(param, "ds_tensor", None)
    if partition is None or _zero3_persistent(param):
        return param.data
    return partition


def _partition_of(param: Any, whole: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``whole`` (a value of ``param``): flat, the last zero-padded."""
    size = param.ds_tensor.numel()
    flat = whole.reshape(-1)[dist.get_rank(param.ds_process_group) * size :][:size]
    return torch.cat([flat, flat.new_zeros(size - flat.numel())])


def _initial_value(param: nn.Parameter) -> torch.Tensor:
    """``held_tensor(param)`` before training, as float32.

    Right after ``deepspeed.initialize`` ZeRO-3's persistent parameters are not gathered yet
    (they are at the first forward pass); their whole value is assembled from the partitions.
    """
    zero: Any = param  # DeepSpeed's ds_* attributes
    if _zero3_persistent(param) and param.data.numel() != zero.ds_numel:
        group = zero.ds_process_group
        parts = [torch.empty_like(zero.ds_tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, zero.ds_tensor.contiguous(), group=group)
        return torch.cat(parts)[: zero.ds_numel].view(zero.ds_shape).float()
    return held_tensor(param).detach().float().clone()


class EMA:
    """``shadow = decay · shadow + (1 − decay) · param`` after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {name: _initial_value(params[name]) for name in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        shadows = [self.shadow[name] for name in self.names]
        torch._foreach_lerp_(
            shadows, [held_tensor(params[name]).float() for name in self.names], 1.0 - self.decay
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
    def applied_to(self, model: nn.Module, release: Callable[[], None] | None = None) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (for sampling); restored exactly on exit.

        Under ZeRO-3 pass ``release`` (the engine's ``empty_partition_cache``): ZeRO-3 keeps some
        parameters gathered between forward passes (prefetched, within its reuse distance, or
        persistent), and a gathered copy does not see what is written into the partition. So every
        parameter is released, the EMA written into its partition (``ds_tensor``; a persistent
        parameter's whole EMA is cut to this rank's partition), and every parameter released again
        on exit: the forward passes inside gather the EMA, those after it the live weights.
        """
        params = dict(model.named_parameters())
        if release is None:
            held = {name: held_tensor(params[name]) for name in self.names}
            values = self.shadow
        else:
            release()
            zero3_params: dict[str, Any] = params  # DeepSpeed's attributes (ds_tensor, ...)
            held = {name: zero3_params[name].ds_tensor for name in self.names}
            values = {
                name: _partition_of(params[name], shadow) if _zero3_persistent(params[name]) else shadow
                for name, shadow in self.shadow.items()
            }
        saved = {name: tensor.clone() for name, tensor in held.items()}
        try:
            with torch.no_grad():
                for name in self.names:
                    held[name].copy_(values[name])
            yield model
        finally:
            if release is not None:
                release()
            with torch.no_grad():
                for name in self.names:
                    held[name].copy_(saved[name])
