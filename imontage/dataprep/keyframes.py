"""Standalone latents of a clip's keyframes, written beside the clip's latent (``encode_shards --keyframes``).

A causal video VAE (Wan's, HunyuanVideo's) encodes frame 0 of a clip alone and the later frames four
at a time, so pixel frame ``f`` of a clip lies in latent frame ``ceil(f / 4)`` of the clip's latent,
mixed with its neighbours. A user's keyframe at sampling time is one image, encoded alone: a
"first-frame" latent, unlike the in-clip one. So that training conditions on what sampling will give,
each keyframe is encoded here as its own one-frame clip (the posterior's mode, as diffusers' image-to-
video pipelines encode their image), and stored per target as ``i.keyframes.safetensors`` (tensor
``keyframes``, ``[C, K, H', W']``) with the latent frame each lies in (``keyframe_frames``).

Which frames: ``anchors``, the pixel frames the sample's condition segments are anchored at (its
declared keyframes); or every ``stride``-th frame from 0 (candidates for Adaptive Tuning to draw from,
:mod:`imontage.data.keyframes`). Frames that fall in a latent frame already taken keep the first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from imontage.data.records import SampleRecord, extension
from imontage.data.shards import RawSample

KEYFRAMES_TENSOR = "keyframes"


def keyframes_member(index: int) -> str:
    """Member name of target segment ``index``'s keyframe latents (``1.keyframes.safetensors``)."""
    return f"{index}.keyframes.safetensors"


@dataclass(frozen=True)
class KeyframeSelection:
    """Which frames of each target clip ``encode_shards`` encodes alone."""

    anchors: bool = False  # the pixel frames the sample's condition segments are anchored at
    stride: int = 0  # every stride-th pixel frame from 0 (0: none)

    def __post_init__(self) -> None:
        if self.stride < 0:
            raise ValueError(f"--keyframe-stride must be >= 0, got {self.stride}")
        if self.anchors and self.stride:
            raise ValueError("keyframes come from the anchors or at a stride, not both")

    @property
    def active(self) -> bool:
        return self.anchors or self.stride > 0

    def to_json(self) -> dict[str, Any]:
        return {"anchors": self.anchors} if self.anchors else {"stride": self.stride}

    def pixel_frames(self, record: SampleRecord, index: int, frames: int) -> list[int]:
        """Pixel frames of target ``index`` (of ``frames`` fitted frames) to encode alone, ascending."""
        if self.stride:
            return list(range(0, frames, self.stride))
        group = record.segments[index].group
        anchors = {
            entry.anchor
            for entry in record.segments
            if entry.role == "condition" and entry.anchor is not None and entry.group in (None, group)
        }
        return sorted(f for f in anchors if f < frames)


def latent_frame(pixel_frame: int, temporal: int) -> int:
    """The latent frame a causal VAE of ``temporal``x compression puts pixel frame ``f`` in: ceil(f / t)."""
    return -(-pixel_frame // temporal)


def encode_keyframes(
    record: SampleRecord,
    selection: KeyframeSelection,
    encode: Callable[[torch.Tensor], torch.Tensor],
    temporal: int,
    fitted: dict[int, torch.Tensor],
    segments: list[dict[str, Any]],
    shapes: list[dict[str, Any]],
    store: Callable[[str, str, torch.Tensor], bytes],
) -> dict[str, bytes]:
    """The keyframe members of every target clip encoded from pixels (``fitted``: index -> pixels
    ``[3, T, H, W]``), their fields added to ``segments[i]`` and the pixel frames to ``shapes[i]``.

    ``encode``: pixels ``[3, 1, H, W]`` -> normalised latent ``[C, 1, H', W']`` (the posterior's mode);
    ``store``: (member, tensor name, tensor) -> the member's bytes.
    """
    members: dict[str, bytes] = {}
    for index, pixels in sorted(fitted.items()):
        entry = record.segments[index]
        if entry.role != "target" or pixels.shape[1] == 1:
            continue
        chosen: dict[int, int] = {}  # latent frame -> the first pixel frame lying in it
        for frame in selection.pixel_frames(record, index, pixels.shape[1]):
            chosen.setdefault(latent_frame(frame, temporal), frame)
        if not chosen:
            continue
        latents = [encode(pixels[:, frame : frame + 1]) for frame in chosen.values()]  # [C, 1, H', W'] each
        member = keyframes_member(index)
        members[member] = store(member, KEYFRAMES_TENSOR, torch.cat(latents, dim=1).cpu())  # [C, K, H', W']
        segments[index]["keyframes"] = member
        segments[index]["keyframe_frames"] = list(chosen)
        shapes[index]["keyframe_pixels"] = list(chosen.values())
    return members


def carry_keyframes(
    raw: RawSample, index: int, keyframes: str, frames: tuple[int, ...]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """An input latent segment's own keyframes, carried over as they are: (its fields, its member)."""
    member = f"{index}.keyframes.{extension(keyframes)}"
    return {"keyframes": member, "keyframe_frames": list(frames)}, {member: raw.members[keyframes]}
