"""A model of several networks that split the timesteps between them, trained in one run.

Wan 2.2 A14B's pipeline holds two transformers of one shape: ``transformer`` denoises the
timesteps at and above ``boundary_ratio``, ``transformer_2`` those below. :class:`TimestepExperts`
holds them all as one module, each under its pipeline component's name (its parameters are
``transformer.*`` and ``transformer_2.*``), so that one optimiser and one ZeRO-3 engine shard them
all. Its forward runs the one expert whose range holds the batch's noised timesteps, as the
pipeline switches at each denoising step; a batch whose noised timesteps fall in two ranges is
refused (the trainer draws every step's timesteps in one expert's range, the sampler steps all
samples at one t).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from imontage.models.common.family import Expert
from imontage.models.common.sequence import PackedBatch


class TimestepExperts(nn.Module):
    """The networks of ``experts`` (highest timesteps first), each built alike, under its expert's name."""

    def __init__(self, experts: tuple[Expert, ...], networks: list[nn.Module]) -> None:
        super().__init__()
        if len(experts) != len(networks) or len(experts) < 2:
            raise ValueError(f"{len(experts)} experts for {len(networks)} networks: two or more of each")
        self.experts = experts
        for expert, network in zip(experts, networks, strict=True):
            self.add_module(expert.name, network)

    def networks(self) -> Iterator[tuple[Expert, nn.Module]]:
        """Each expert with its network, highest timesteps first."""
        for expert in self.experts:
            yield expert, self.get_submodule(expert.name)

    def expert_at(self, t: float) -> Expert:
        """The expert whose range ``[t_min, t_max)`` holds ``t`` (the top one also holds ``t_max``)."""
        for expert in self.experts:
            if expert.t_min <= t < expert.t_max or (t == expert.t_max == 1.0):
                return expert
        raise ValueError(f"timestep {t} is in no expert's range")

    def routed_expert(self, batch: PackedBatch) -> Expert:
        """The expert of ``batch``: the one whose range holds every noised timestep (clean tokens,
        t = 0, are conditions; a batch with none noised is the lowest expert's)."""
        t = batch.timesteps.detach().float()  # [N]
        noised = t[t > 0]
        if noised.numel() == 0:
            return self.experts[-1]
        low, high = (float(v) for v in torch.aminmax(noised))
        expert = self.expert_at(high)
        if self.expert_at(low) != expert:
            raise ValueError(
                f"a batch with noised timesteps from {low:.4f} to {high:.4f} spans two experts' ranges "
                f"({', '.join(f'{e.name}: [{e.t_min}, {e.t_max})' for e in self.experts)}): one step "
                "runs one expert"
            )
        return expert

    def forward(self, batch: PackedBatch, *args: Any, **kwargs: Any) -> Any:
        return self.get_submodule(self.routed_expert(batch).name)(batch, *args, **kwargs)

    # What the trainer and parallelize set on a model, set on every network.
    @property
    def gradient_checkpointing(self) -> bool:
        return all(bool(getattr(network, "gradient_checkpointing", False)) for _, network in self.networks())

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for _, network in self.networks():
            setattr(network, "gradient_checkpointing", value)  # noqa: B010 (a plain attribute of each family's model)


def expert_networks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(parameter-name prefix, network) of each network of ``model``: its experts', or ``("", model)``."""
    if isinstance(model, TimestepExperts):
        return [(f"{expert.name}.", network) for expert, network in model.networks()]
    return [("", model)]


def idle_networks(model: nn.Module, t_range: tuple[float, float]) -> list[int]:
    """The indices (in :func:`expert_networks`' order) of ``model``'s networks that a step drawing
    t in ``t_range`` does not run: every expert but the one of that range; none for one network."""
    if not isinstance(model, TimestepExperts):
        return []
    return [i for i, expert in enumerate(model.experts) if (expert.t_min, expert.t_max) != tuple(t_range)]
