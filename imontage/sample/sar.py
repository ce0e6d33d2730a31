"""Segment-wise auto-regressive (SAR) sampling: a video longer than the model's window (DreaMontage).

The video is generated one window at a time. Every segment but the first starts with ``context``
frames that the previous segments already generated: they enter as a condition clip anchored at the
segment's frame 0, and the keyframes and clips whose frames the segment generates enter as
conditions anchored at their frames, all under the ``shared`` layout (a condition reuses the
(t, h, w) of the target frames it conditions). Only a segment's new frames are kept, so every frame
of the video is generated once, by exactly one segment.

Frame indices count the model's input frames (latent frames at scale; pixels through the identity
encoder). A segment is one :func:`~imontage.sample.sampler.sample_flow` call on one sample: the
peak memory is that of the largest segment, whatever the video's length; the caller that streams
the frames of :func:`iter_sar` away holds nothing else, and :func:`sample_sar` holds the stitched
video besides.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from imontage.models.common.sequence import PackingSpec, Sample, Segment
from imontage.sample.sampler import sample_flow


@dataclass(frozen=True)
class Keyframe:
    """A keyframe (``T = 1``) or clip (``T > 1``) of ``data`` ``[C, T, H, W]`` whose first frame is ``frame``."""

    frame: int
    data: torch.Tensor

    @property
    def num_frames(self) -> int:
        return int(self.data.shape[1])


@dataclass(frozen=True)
class KeyframeSlice:
    """Frames ``[first, last)`` of keyframe ``keyframe``, anchored at the segment's frame ``anchor``."""

    keyframe: int
    first: int
    last: int
    anchor: int


@dataclass(frozen=True)
class SarSegment:
    """One window of the video: frames ``[start, end)``; the first ``context`` come from earlier segments."""

    index: int
    start: int
    end: int
    context: int
    keyframes: tuple[KeyframeSlice, ...]

    @property
    def num_frames(self) -> int:
        return self.end - self.start

    @property
    def new_start(self) -> int:
        """First frame this segment generates (and the video keeps)."""
        return self.start + self.context


def plan_segments(
    total_frames: int,
    window: int,
    context: int,
    keyframes: Sequence[tuple[int, int]] = (),
    frames_multiple: int = 1,
) -> list[SarSegment]:
    """The segments of a ``total_frames`` video: windows of ``window`` frames overlapping by ``context``.

    ``keyframes`` are ``(first frame, frame count)`` pairs; each goes, sliced where it spans a
    boundary, to the segments that generate its frames. The last segment is shorter when the frames
    left do not fill a window. Every count is a multiple of ``frames_multiple`` (the model's
    temporal patch size), so that each segment and slice patchifies.
    """
    for name, value in (("total_frames", total_frames), ("window", window), ("context", context)):
        if value % frames_multiple:
            raise ValueError(
                f"SAR: {name}={value} is not a multiple of the temporal patch size {frames_multiple}"
            )
    if total_frames < 1 or window < 1:
        raise ValueError(f"SAR: need total_frames >= 1 and window >= 1, got {total_frames} and {window}")
    if not 0 < context < window:
        raise ValueError(f"SAR: context={context} must be at least 1 and less than window={window}")
    taken: list[int | None] = [None] * total_frames  # which keyframe conditions each frame
    for number, (first, count) in enumerate(keyframes):
        if count < 1 or first < 0 or first + count > total_frames:
            raise ValueError(
                f"SAR: keyframe {number} spans frames {first}..{first + count - 1}, "
                f"outside the video's 0..{total_frames - 1}"
            )
        if first % frames_multiple or count % frames_multiple:
            raise ValueError(
                f"SAR: keyframe {number} (frame {first}, {count} frames) is not aligned to the temporal "
                f"patch size {frames_multiple}"
            )
        for frame in range(first, first + count):
            if taken[frame] is not None:
                raise ValueError(f"SAR: keyframes {taken[frame]} and {number} both condition frame {frame}")
            taken[frame] = number

    bounds = [(0, min(window, total_frames), 0)]
    while bounds[-1][1] < total_frames:
        start = bounds[-1][1] - context
        bounds.append((start, min(start + window, total_frames), context))
    segments = []
    for index, (start, end, overlap) in enumerate(bounds):
        slices = []
        for number, (first, count) in enumerate(keyframes):
            lo, hi = max(first, start + overlap), min(first + count, end)
            if lo < hi:
                slices.append(KeyframeSlice(number, lo - first, hi - first, lo - start))
        segments.append(SarSegment(index, start, end, overlap, tuple(slices)))
    return segments


def _visual(data: torch.Tensor, role: str, anchor: int | None = None) -> Segment:
    return Segment("image" if data.shape[1] == 1 else "video", role, data, anchor=anchor)


def segment_sample(
    segment: SarSegment,
    keyframes: Sequence[Keyframe],
    context_frames: torch.Tensor | None,
    size: tuple[int, int, int],
    text: str | torch.Tensor | None = None,
) -> Sample:
    """The sample one segment is generated from, laid out for the ``shared`` layout.

    ``context_frames`` ``[C, context, H, W]``: the video's frames ``[start, new_start)``, already
    generated (None for the first segment). ``size``: the video's (C, H, W). ``text``: a caption, or
    precomputed embeddings ``[L, E]``.
    """
    channels, height, width = size
    segments: list[Segment] = []
    if text is not None:
        segments.append(Segment("text", text=text) if isinstance(text, str) else Segment("text", data=text))
    if segment.context:
        if context_frames is None or tuple(context_frames.shape) != (
            channels,
            segment.context,
            height,
            width,
        ):
            shape = None if context_frames is None else tuple(context_frames.shape)
            raise ValueError(
                f"SAR segment {segment.index}: context frames of shape {shape}, "
                f"expected {(channels, segment.context, height, width)}"
            )
        segments.append(_visual(context_frames, "condition", anchor=0))
    for piece in segment.keyframes:
        data = keyframes[piece.keyframe].data[:, piece.first : piece.last]
        segments.append(_visual(data, "condition", anchor=piece.anchor))
    segments.append(_visual(torch.zeros(channels, segment.num_frames, height, width), "target"))
    return Sample(segments, key=f"sar segment {segment.index} (frames {segment.start}..{segment.end - 1})")


def plan_video(
    spec: PackingSpec,
    total_frames: int,
    size: tuple[int, int, int],
    window: int,
    context: int,
    keyframes: Sequence[Keyframe] = (),
) -> list[SarSegment]:
    """The segments of a video, after checking the model's layout and the keyframes' shapes."""
    if spec.layout != "shared":
        raise ValueError(
            f"SAR sampling conditions segments through the shared layout; the model uses "
            f"model.positions.layout={spec.layout}"
        )
    reads = [
        what
        for what, value in (
            ("pooled text", spec.pooled_text_dim),
            ("image tokens", spec.image_embed_dim),
            (f"a {spec.channel_condition} channel condition", spec.channel_condition),
        )
        if value
    ]
    if reads:  # an image-to-video model: its condition would have to carry the context and keyframes
        raise ValueError(
            f"SAR: the model reads {' and '.join(reads)} per sample, which SAR segments do not give "
            "(SAR conditions through shared-layout tokens: a text-to-video model)"
        )
    if size[0] != spec.in_channels:
        raise ValueError(f"SAR: the video has {size[0]} channels, the model takes {spec.in_channels}")
    for number, keyframe in enumerate(keyframes):
        data = keyframe.data
        if data.dim() != 4 or (data.shape[0], data.shape[2], data.shape[3]) != size:
            raise ValueError(
                f"SAR: keyframe {number} (frame {keyframe.frame}) has shape {tuple(data.shape)}, "
                f"expected [C, T, H, W] with (C, H, W) = {size}"
            )
    pieces = [(k.frame, k.num_frames) for k in keyframes]
    return plan_segments(total_frames, window, context, pieces, spec.patch_size[0])


def iter_sar(
    model: nn.Module,
    spec: PackingSpec,
    total_frames: int,
    size: tuple[int, int, int],
    window: int,
    context: int,
    keyframes: Sequence[Keyframe] = (),
    text: str | torch.Tensor | None = None,
    steps: int = 20,
    guidance: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[SarSegment, torch.Tensor]]:
    """Generate the video segment by segment; yields each segment and its new frames ``[C, n, H, W]``.

    ``size`` is the video's (C, H, W) in model space; ``window`` and ``context`` are in frames (see
    :func:`plan_segments`). Bad arguments raise here, before any sampling; only the last
    ``context`` frames are carried from one segment to the next.
    """
    plan = plan_video(spec, total_frames, size, window, context, keyframes)

    def segments() -> Iterator[tuple[SarSegment, torch.Tensor]]:
        tail: torch.Tensor | None = None  # [C, ≤ context, H, W]: the last frames generated so far
        for segment in plan:
            sample = segment_sample(segment, keyframes, tail, size, text)
            [outputs] = sample_flow(model, [sample], spec, steps, guidance, shift, generator, device)
            video = outputs[-1]  # [C, end − start, H, W]: the target is the sample's last segment
            assert video is not None
            new = video[:, segment.context :].clone()
            del sample, outputs, video
            tail = (new if tail is None else torch.cat([tail, new], dim=1))[:, -context:].clone()
            yield segment, new
            del new  # while the next segment runs, only `tail` is held here

    return segments()


def sample_sar(
    model: nn.Module,
    spec: PackingSpec,
    total_frames: int,
    size: tuple[int, int, int],
    window: int,
    context: int,
    keyframes: Sequence[Keyframe] = (),
    text: str | torch.Tensor | None = None,
    steps: int = 20,
    guidance: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The whole ``[C, total_frames, H, W]`` video of :func:`iter_sar`, stitched from its segments' new frames."""
    channels, height, width = size
    video = torch.empty(channels, total_frames, height, width)
    for segment, new in iter_sar(
        model,
        spec,
        total_frames,
        size,
        window,
        context,
        keyframes,
        text,
        steps,
        guidance,
        shift,
        generator,
        device,
    ):
        video[:, segment.new_start : segment.end] = new
        del new  # not held while the next segment runs
    return video
