"""HunyuanVideo-I2V's ``latent_concat`` channel condition with keyframes at any latent frames.

diffusers' ``HunyuanVideoImageToVideoPipeline`` (``image_condition_type`` ``latent_concat``) joins
``[image latents, mask]`` to the noisy latent: the image's latent on frame 0 and zeros after, then one
mask channel, 1 on frame 0. Here any latent frame may be given: the keyframe latents at their frames,
zeros elsewhere, and the mask 1 on the given frames.
"""

from __future__ import annotations

import torch


def keyframe_condition(latents: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """``[C + 1, T, H, W]``: ``latents`` ``[C, T, H, W]``, then the mask of ``given`` ``[T]`` bool."""
    mask = latents.new_zeros(1, *latents.shape[1:])
    mask[:, given.to(latents.device)] = 1.0
    return torch.cat([latents, mask])
