"""Euler integration of the flow ODE from noise (t = 1) to data (t = 0), with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imontage.models.dit.sequence import PackingSpec, Sample, pack_samples, unpatchify_segments
from imontage.objectives.flow_matching import select_tokens, shift_timesteps, text_keep_mask


def sampling_timesteps(steps: int, shift: float) -> list[float]:
    """``steps + 1`` decreasing times from 1 to 0, shifted like training's t."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()


@torch.no_grad()
def sample_flow(
    model: nn.Module,
    samples: Sequence[Sample],
    spec: PackingSpec,
    steps: int = 20,
    guidance: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[list[torch.Tensor | None]]:
    """Generate every target segment of ``samples`` given their conditions and text.

    Target segments need ``data`` only for their shape. Returns, per sample and per segment,
    ``[C, T, H, W]`` in model space: the generated targets, and the conditions as given (None for text).
    """
    batch = pack_samples(samples, spec).to(device)
    target = batch.target_mask[:, None]  # [N, 1]
    x = torch.randn(batch.tokens.shape, generator=generator).to(device)
    keep = text_keep_mask(batch, torch.ones(batch.num_samples, dtype=torch.bool))
    unconditional = select_tokens(batch, keep) if guidance != 1.0 else None  # same layout every step
    times = sampling_timesteps(steps, shift)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        tokens = torch.where(target, x, batch.tokens)
        timesteps = torch.where(batch.target_mask, torch.full_like(batch.timesteps, t), 0.0)
        current = batch.replace(tokens=tokens, timesteps=timesteps)
        velocity = model(current).float()  # [N, P]
        if unconditional is not None:
            free = model(unconditional.replace(tokens=tokens[keep], timesteps=timesteps[keep])).float()
            velocity[keep] = free + guidance * (velocity[keep] - free)
        x = x + (t_next - t) * velocity
    return unpatchify_segments(torch.where(target, x, batch.tokens).cpu(), batch, spec.patch_size)
