"""What a pretrained family reads besides the packed tokens: checked from a sample's facts, built at decode.

:class:`~imontage.models.common.sequence.PackingSpec` (from the model config) says what the model
needs: a pooled text vector per sample (HunyuanVideo), image-encoder tokens per sample (Wan 2.1
I2V), a distilled guidance scale (guidance-embedding HunyuanVideo) and a channel condition over
each target segment (Wan 2.1 I2V, HunyuanVideo-I2V ``latent_concat``). :func:`check_model_inputs`
tells from the index facts whether a sample has what its model needs (the detail of an
``unpackable`` skip otherwise, never zeros in its place); the builders below make the channel
conditions at decode time, as diffusers' image-to-video pipelines make them:

- ``latent_concat`` (``HunyuanVideoImageToVideoPipeline``): ``[image latent, mask]``, the
  condition image's latent on the target's frame 0 and zeros after it, then one mask channel, 1 on
  frame 0 and 0 after (``image_latents[:, :, 1:] = 0``; ``mask[:, :, 1:] = 0``).
- ``wan_i2v`` (``WanImageToVideoPipeline.prepare_latents``): ``[mask, latent]``, four mask channels
  (one per pixel frame a latent frame packs; all four 1 on frame 0, 0 after), then the VAE latent of
  the condition image followed by zero-valued frames. That latent is not the image latent padded
  with zeros (the causal VAE encodes the zero frames after the image into non-zero latents), so it
  is stored per target as its ``condition_latent`` member by ``tools/encode_shards.py --i2v-condition``.

The given frame is the target's first one where the layout puts the condition image there
(``video3d``, ``shared``). Under ``montage`` and ``editverse4d`` targets are pseudo-frames or
sequence steps of their own that no condition image is the first frame of (the conditions reach
the model as clean tokens): every target's channel condition is zeros with mask 0 (HunyuanVideo's
pipeline feeds exactly that for frames not given; Wan's feeds mask 0 over the VAE latent of the
frames after its image, and with no image given a zero latent stands for it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from imontage.data.facts import SampleFacts
from imontage.models.common.sequence import WAN_MASK_CHANNELS, PackingSpec

FIRST_FRAME_LAYOUTS = ("video3d", "shared")  # layouts where a condition image is a target's first frame
Shape = tuple[int, int, int, int]  # [C, T, H, W]


def condition_channels(spec: PackingSpec) -> int:
    """Channels C' of the channel condition the model takes (0 for none)."""
    if spec.channel_condition == "wan_i2v":
        return WAN_MASK_CHANNELS + spec.in_channels
    if spec.channel_condition == "latent_concat":
        return spec.in_channels + 1
    return 0


def gives_first_frame(spec: PackingSpec) -> bool:
    """Whether targets carry a given first frame (else their channel condition is all zeros)."""
    return bool(spec.channel_condition) and spec.layout in FIRST_FRAME_LAYOUTS


def _check_array(given: int, wanted: int, field: str, what: str, key: str, writer: str) -> None:
    if not wanted:
        return
    if not given:
        raise ValueError(
            f"the model reads {what} per sample (width {wanted}), but the json names no '{field}' "
            f"member ({writer} writes it)"
        )
    if given != wanted:
        raise ValueError(f"'{field}' has width {given}, the model takes {wanted} ({key})")


def condition_segment(roles: Sequence[str], groups: Sequence[str | None], group: str | None) -> int | None:
    """Index of the sample's condition image: its first condition segment (of ``group``'s sample)."""
    return next(
        (
            i
            for i, (role, own) in enumerate(zip(roles, groups, strict=True))
            if role == "condition" and own in (None, group)
        ),
        None,
    )


def check_model_inputs(facts: SampleFacts, shapes: Sequence[Shape], spec: PackingSpec) -> None:
    """Raise a ValueError naming what the sample lacks for ``spec``'s model; ``shapes``: each
    segment's ``[C, T, H, W]`` as trained."""
    _check_array(facts.pooled_dim, spec.pooled_text_dim, "pooled_text", "a pooled text vector",
                 "model.hunyuan_video.pooled_projection_dim", "tools/encode_shards.py --pooled-text-encoder")  # fmt: skip
    _check_array(facts.image_dim, spec.image_embed_dim, "image_embeds", "image-encoder tokens",
                 "model.wan.image_dim", "tools/encode_shards.py --image-encoder")  # fmt: skip
    if not gives_first_frame(spec):
        return
    roles = [segment.role for segment in facts.segments]
    groups = [segment.group for segment in facts.segments]
    for index, (segment, shape) in enumerate(zip(facts.segments, shapes, strict=True)):
        if segment.role != "target":
            continue
        where = f"target segment {index}"
        if spec.channel_condition == "wan_i2v":
            if segment.condition_channels != spec.in_channels:
                found = (
                    f"one of {segment.condition_channels} channels" if segment.condition_channels else "none"
                )
                raise ValueError(
                    f"{where}: Wan image-to-video conditions it on a 'condition_latent' member of "
                    f"{spec.in_channels} channels, found {found} (tools/encode_shards.py --i2v-condition writes it)"
                )
            continue
        image = condition_segment(roles, groups, segment.group)
        if image is None:
            raise ValueError(
                f"{where}: image_condition_type latent_concat conditions each target on the sample's "
                "condition image, and the sample has no condition segment"
            )
        image_shape, anchor = shapes[image], facts.segments[image].anchor
        if image_shape[1] != 1 or image_shape[2:] != shape[2:] or anchor not in (None, 0):
            raise ValueError(
                f"{where}: its condition image (segment {image}, {list(image_shape)}, anchor {anchor}) must be "
                f"one latent frame of the target's {shape[2]}x{shape[3]}, at frame 0, to be its first frame"
            )


def latent_concat_condition(image: torch.Tensor, frames: int) -> torch.Tensor:
    """``[C + 1, T, H, W]``: ``image`` ``[C, 1, H, W]`` on frame 0 (zeros after), then its mask."""
    channels, _, height, width = image.shape
    condition = image.new_zeros(channels + 1, frames, height, width)
    condition[:channels, :1] = image
    condition[channels, 0] = 1.0
    return condition


def wan_i2v_condition(latent: torch.Tensor) -> torch.Tensor:
    """``[4 + C, T, H, W]``: the first-frame mask, then ``latent`` (the segment's condition_latent)."""
    mask = latent.new_zeros(WAN_MASK_CHANNELS, *latent.shape[1:])
    mask[:, 0] = 1.0
    return torch.cat([mask, latent])


def no_given_frame(spec: PackingSpec, target: torch.Tensor) -> torch.Tensor:
    """The channel condition of a target no frame of which is given: zeros ``[C', T, H, W]``."""
    return target.new_zeros(condition_channels(spec), *target.shape[1:])
