"""Wan image-to-video's channel condition with keyframes at any latent frames.

diffusers' ``WanImageToVideoPipeline.prepare_latents`` joins ``[mask, condition]`` to the noisy latent:
four mask channels per latent frame (one per pixel frame the VAE packs into it; for frame 0 all four
stand for the one image) and the condition latent. It gives frame 0 only. Here any latent frame may be
given: all four mask channels of a given frame are 1 (a standalone keyframe latent stands for its
latent frame as the first-frame image does for frame 0), and the condition channels hold the keyframe
latents there and zeros on the frames not given.
"""

from __future__ import annotations

import torch

from imontage.models.common.sequence import WAN_MASK_CHANNELS


def keyframe_condition(latents: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """``[4 + C, T, H, W]``: the mask of ``given`` ``[T]`` bool, then ``latents`` ``[C, T, H, W]``."""
    mask = latents.new_zeros(WAN_MASK_CHANNELS, *latents.shape[1:])
    mask[:, given.to(latents.device)] = 1.0
    return torch.cat([mask, latents])
