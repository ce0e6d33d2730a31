"""From a raw sample to training samples, in three steps that can each reject it with a reason.

1. :func:`inspect_sample`: parse the json and read the media headers into :class:`SampleFacts`
   (sizes, frame counts, shapes). Depends on the bytes only, so a shard index can store it.
2. :func:`plan_item`: apply the recipe (caps, buckets, frame sampling, patch size, layout, and what
   the model reads besides tokens: :mod:`imontage.data.conditions`) to the facts: the shape every
   segment is trained at and the item's token count. No pixels decoded.
3. :func:`decode_item`: decode the pixels into those shapes and build the :class:`Sample` (two
   for a preference pair: the shared segments with the ``win`` ones, then with the ``lose`` ones),
   with the per-sample inputs and channel conditions its model reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imontage.data import conditions, media
from imontage.data.buckets import Size, frame_bucket, sample_frame_indices, target_size
from imontage.data.facts import SampleFacts, SegmentFacts
from imontage.data.keyframes import NO_KEYFRAMES, KeyframeOptions, channel_keyframes
from imontage.data.problems import DataError
from imontage.data.records import (
    SampleRecord,
    SegmentRecord,
    extension,
    parse_record,
)
from imontage.data.shards import RawSample
from imontage.models.common.positions import SegmentGrid, check_layout
from imontage.models.common.sequence import PackingSpec, Sample, Segment, patch_grid

RGB_CHANNELS = 3
Shape = tuple[int, int, int, int]  # [C, T, H, W]


@dataclass(frozen=True)
class DecodeOptions:
    """What a recipe's ``data`` section says about decoding (see DataConfig)."""

    image_buckets: tuple[Size, ...] = ()  # empty: images keep their size
    video_buckets: tuple[Size, ...] = ()  # empty: videos keep their size
    frame_buckets: tuple[int, ...] = ()  # empty: all sampled frames, down to a multiple of pt
    frame_sampling: str = "stride"  # "stride" or "fps"
    frame_stride: int = 1
    frame_rate: float = 8.0  # frames per second kept when sampling by fps
    max_frames: int = 16  # sampled frames kept at most
    max_pixels: int = 1 << 24  # larger images and video frames are skipped
    max_video_frames: int = 4096  # longer videos are skipped before decoding
    text_embeddings: bool = False  # text from the `text_embedding` member, not the `text` string
    keyframes: KeyframeOptions = NO_KEYFRAMES  # which stored keyframes condition their clip, and how

    @classmethod
    def from_config(cls, data_cfg: Any) -> DecodeOptions:
        buckets, video, bad = data_cfg.buckets, data_cfg.video, data_cfg.bad_data
        return cls(
            image_buckets=tuple((int(h), int(w)) for h, w in buckets.image),
            video_buckets=tuple((int(h), int(w)) for h, w in buckets.video),
            frame_buckets=tuple(sorted(int(t) for t in buckets.frames)),
            frame_sampling=str(video.sampling),
            frame_stride=int(video.stride),
            frame_rate=float(video.fps),
            max_frames=int(video.max_frames),
            max_pixels=int(bad.max_pixels),
            max_video_frames=int(bad.max_video_frames),
            text_embeddings=bool(data_cfg.text_embeddings),
            keyframes=KeyframeOptions.from_config(data_cfg),
        )


# ---------------------------------------------------------------------------------------------
# 1. facts


def _media_error(raw: RawSample, member: str, error: media.MediaError) -> DataError:
    return DataError.of(error.reason, raw.url, raw.key, f"member '{member}': {error}")


def _media_shape(raw: RawSample, segment: SegmentRecord) -> tuple[int, int, int, int, float]:
    """(channels, frames, height, width, fps) of a segment's member(s), from their headers."""
    first = segment.members[0]
    if segment.kind == "latent":
        shape = media.array_shape(raw.members[first], extension(first), segment.tensor)
        if len(shape) not in (3, 4):
            raise media.MediaError(f"a latent is [C, T, H, W] or [C, H, W], got shape {list(shape)}")
        channels, frames, height, width = shape if len(shape) == 4 else (shape[0], 1, *shape[1:])
        return channels, frames, height, width, 0.0
    if segment.kind == "video" and not segment.is_frame_list:
        info = media.video_info(raw.members[first], extension(first))
        return RGB_CHANNELS, info.frames, info.height, info.width, info.fps
    sizes = set()
    for name in dict.fromkeys(segment.members):  # a frame listed many times is read once
        try:
            sizes.add(media.image_size(raw.members[name], extension(name)))
        except media.MediaError as error:
            raise _media_error(raw, name, error) from None
    if len(sizes) != 1:
        raise media.MediaError(f"frames {list(segment.members)} differ in size {sorted(sizes)}")
    height, width = sizes.pop()
    return RGB_CHANNELS, len(segment.members), height, width, segment.fps or 0.0


def _segment_facts(raw: RawSample, segment: SegmentRecord) -> SegmentFacts:
    channels, frames, height, width, fps = _media_shape(raw, segment)
    if min(channels, height, width) <= 0:
        raise media.MediaError(
            f"a {segment.kind} of {channels} channels, {height}x{width}: nothing to train on"
        )
    condition = 0
    if segment.condition_latent is not None:
        shape = _array_shape(raw, segment.condition_latent, 4, "a condition_latent is [C, T, H, W]")
        if shape[1:] != (frames, height, width):
            error = media.MediaError(
                f"a condition_latent of shape {list(shape)} does not lie over its segment's "
                f"{[frames, height, width]} (T, H, W)"
            )
            raise _media_error(raw, segment.condition_latent, error)
        condition = shape[0]
    if segment.keyframes is not None:
        _check_keyframes(raw, segment, (channels, frames, height, width))
    return SegmentFacts(segment.kind, segment.role, segment.group, segment.anchor, channels, frames,
                        height, width, fps, condition, segment.members[0], segment.keyframe_frames)  # fmt: skip


def _check_keyframes(raw: RawSample, segment: SegmentRecord, shape: Shape) -> None:
    """A target's ``keyframes`` member must hold one ``[C, H, W]`` latent per keyframe frame, each
    inside the clip: ``[C, K, H, W]`` from its header (nothing loaded)."""
    assert segment.keyframes is not None
    channels, frames, height, width = shape
    found = _array_shape(raw, segment.keyframes, 4, "keyframes are [C, K, H, W]")
    wanted = (channels, len(segment.keyframe_frames), height, width)
    problem = ""
    if found != wanted:
        problem = f"keyframes of shape {list(found)}, its segment ({list(shape)}) and keyframe_frames need {list(wanted)}"
    elif segment.keyframe_frames[-1] >= frames:
        problem = f"keyframe_frames {list(segment.keyframe_frames)} reach past the clip's {frames} frames"
    if problem:
        raise _media_error(raw, segment.keyframes, media.MediaError(problem))


def _array_shape(raw: RawSample, member: str, dims: int, what: str) -> tuple[int, ...]:
    """The shape of an array member (from its header), which must have ``dims`` dimensions."""
    try:
        shape = tuple(media.array_shape(raw.members[member], extension(member)))
        if len(shape) != dims:
            raise media.MediaError(f"{what}, got shape {list(shape)}")
    except media.MediaError as error:
        raise _media_error(raw, member, error) from None
    return shape


def _rows(raw: RawSample, member: str | None, dims: int, what: str) -> tuple[int, ...]:
    """Shape of an optional per-sample array member; zeros when the record names none."""
    return (0,) * dims if member is None else _array_shape(raw, member, dims, what)


def inspect_sample(raw: RawSample) -> tuple[SampleRecord, SampleFacts]:
    """The sample's record and facts, from its json and media headers; a :class:`DataError` otherwise."""
    record = parse_record(raw)
    segments = []
    for segment in record.segments:
        try:
            segments.append(_segment_facts(raw, segment))
        except media.MediaError as error:
            raise _media_error(raw, segment.members[0], error) from None
    embedding_rows, embedding_dim = _rows(raw, record.text_embedding, 2, "a text embedding is [L, E]")
    (pooled_dim,) = _rows(raw, record.pooled_text, 1, "a pooled text vector is [E]")
    image_tokens, image_dim = _rows(raw, record.image_embeds, 2, "image embeddings are [L, E]")
    rows_2, dim_2 = _rows(raw, record.text_embedding_2, 2, "a second text embedding is [L, E]")
    facts = SampleFacts(
        record.task, len(record.text.encode("utf-8")), embedding_rows, tuple(segments),
        pooled_dim, image_tokens, image_dim, embedding_dim, record.text_embedding or "", rows_2, dim_2,
    )  # fmt: skip
    return record, facts


def facts_difference(indexed: SampleFacts, found: SampleFacts, record: SampleRecord) -> str:
    """The first fact in which a sample's index differs from its own headers (which differ), naming
    the member (or the json) it is a fact of."""
    if len(indexed.segments) != len(found.segments):
        return f"member 'json' has {len(found.segments)} segments, the index says {len(indexed.segments)}"
    where, name, true, said = next(_differences(indexed, found, record))
    return f"{where}: {name} {true!r}, the index says {said!r}"


def _differences(
    indexed: SampleFacts, found: SampleFacts, record: SampleRecord
) -> Iterator[tuple[str, str, Any, Any]]:
    """(where, field, found value, indexed value) of each fact that differs, segments first."""
    for index, (said, true) in enumerate(zip(indexed.segments, found.segments, strict=True)):
        for name in _differing_fields(said, true):
            member = record.segments[index].condition_latent if name == "condition_channels" else true.member
            yield f"segment {index}, member '{member}'", name, getattr(true, name), getattr(said, name)
    members = {"embedding_rows": record.text_embedding, "embedding_dim": record.text_embedding,
               "pooled_dim": record.pooled_text, "image_tokens": record.image_embeds, "image_dim": record.image_embeds,
               "embedding_2_rows": record.text_embedding_2, "embedding_2_dim": record.text_embedding_2}  # fmt: skip
    for name in _differing_fields(indexed, found):
        where = f"member '{members[name]}'" if members.get(name) else "member 'json'"
        yield where, name, getattr(found, name), getattr(indexed, name)


def _differing_fields(said: Any, true: Any) -> list[str]:
    """The fields of two facts of a kind that differ, but their segments."""
    return [
        f.name
        for f in dataclasses.fields(said)
        if f.name != "segments" and getattr(said, f.name) != getattr(true, f.name)
    ]


# ---------------------------------------------------------------------------------------------
# 2. plan


@dataclass(frozen=True)
class SegmentPlan:
    shape: Shape  # [C, T, H, W] as trained
    frame_indices: tuple[int, ...]  # frames to decode (videos; (0,) for images; () for latents)


@dataclass(frozen=True)
class ItemPlan:
    segments: tuple[SegmentPlan, ...]
    text_tokens: int
    tokens: int  # all samples of the item together
    num_samples: int  # 2 for a preference pair


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _check_limits(facts: SegmentFacts, options: DecodeOptions) -> None:
    if facts.kind == "latent":
        return
    if facts.height * facts.width > options.max_pixels:
        raise _Reject(
            "too_many_pixels",
            f"{facts.kind} of {facts.height}x{facts.width} pixels, over data.bad_data.max_pixels={options.max_pixels}",
        )
    if facts.frames > options.max_video_frames:
        raise _Reject(
            "too_many_frames",
            f"video of {facts.frames} frames, over data.bad_data.max_video_frames={options.max_video_frames}",
        )


def _video_plan(facts: SegmentFacts, options: DecodeOptions, frames_multiple: int) -> SegmentPlan:
    if options.frame_sampling == "fps" and facts.fps <= 0:
        raise _Reject("unpackable", "sampling by fps needs the video's frame rate ('fps' for frame images)")
    indices = sample_frame_indices(
        facts.frames,
        facts.fps,
        options.frame_sampling,
        options.frame_stride,
        options.frame_rate,
        options.max_frames,
    )
    count = frame_bucket(len(indices), options.frame_buckets, frames_multiple)
    if count == 0:
        raise _Reject(
            "unpackable", f"video of {len(indices)} sampled frames is shorter than any frame bucket"
        )
    height, width = target_size(facts.height, facts.width, options.video_buckets)
    return SegmentPlan((RGB_CHANNELS, count, height, width), tuple(indices[:count]))


def _segment_plan(facts: SegmentFacts, options: DecodeOptions, spec: PackingSpec | None) -> SegmentPlan:
    _check_limits(facts, options)
    if facts.kind == "latent":
        return SegmentPlan((facts.channels, facts.frames, facts.height, facts.width), ())
    if facts.kind == "video":
        return _video_plan(facts, options, spec.patch_size[0] if spec else 1)
    height, width = target_size(facts.height, facts.width, options.image_buckets)
    return SegmentPlan((RGB_CHANNELS, 1, height, width), (0,))


def _text_tokens(facts: SampleFacts, options: DecodeOptions, spec: PackingSpec | None) -> int:
    if options.text_embeddings and not facts.embedding_rows:
        raise _Reject(
            "unpackable", "data.text_embeddings is on, but the sample has no 'text_embedding' member"
        )
    width = spec.text_embed_dim if spec and options.text_embeddings else 0
    if width and facts.embedding_dim != width:
        raise _Reject(
            "unpackable",
            f"'text_embedding': member '{facts.embedding_member}' has width {facts.embedding_dim}, "
            f"the model takes {width} (model.text_dim)",
        )
    rows = facts.embedding_rows if options.text_embeddings else facts.text_bytes
    if not (spec and options.text_embeddings and spec.text_embed_2_dim and facts.embedding_2_rows):
        return min(rows, spec.max_text_len) if spec else rows
    # The model reads a second text encoder's rows too: a text segment of its own, cut like the first.
    if facts.embedding_2_dim != spec.text_embed_2_dim:
        raise _Reject(
            "unpackable",
            f"'text_embedding_2': it has width {facts.embedding_2_dim}, the model's second text encoder "
            f"gives {spec.text_embed_2_dim}",
        )
    return min(rows, spec.max_text_len) + min(facts.embedding_2_rows, spec.max_text_len)


def _sample_tokens(
    facts: SampleFacts,
    plans: Sequence[SegmentPlan],
    group: str | None,
    text_tokens: int,
    spec: PackingSpec | None,
    keyframes: KeyframeOptions = NO_KEYFRAMES,
) -> int:
    """Tokens of one sample of the item, checked against the model; 0 without one (previews)."""
    if spec is None:
        return 0
    grids = [SegmentGrid("text", "condition", (text_tokens, 1, 1))] if text_tokens else []
    for index, (segment, plan) in enumerate(zip(facts.segments, plans, strict=True)):
        if segment.group not in (None, group):
            continue
        where = f"segment {index}, member '{segment.member}'"
        if plan.shape[0] != spec.in_channels:
            raise _Reject(
                "unpackable",
                f"{where}: {segment.kind} has {plan.shape[0]} channels, the model takes {spec.in_channels}",
            )
        try:
            grid = patch_grid(plan.shape, spec.patch_size)
        except ValueError as error:
            raise _Reject("unpackable", f"{where}: {error}") from None
        grids.append(SegmentGrid(segment.kind, segment.role, grid, segment.anchor))
    try:  # positions are built only for the batch, from decoded data: nothing here allocates
        check_layout(spec.layout, grids)
    except ValueError as error:
        raise _Reject("unpackable", f"layout {spec.layout}: {error}") from None
    return sum(grid.num_tokens for grid in grids) + _keyframe_tokens(facts, group, spec, keyframes)


def _keyframe_tokens(
    facts: SampleFacts, group: str | None, spec: PackingSpec, keyframes: KeyframeOptions
) -> int:
    """Tokens of the keyframe condition segments a sample may get (``shared`` conditioning): each
    target's most, so that the sample fits its batch whatever its draw; checks the model can take
    them."""
    if not keyframes.on:
        return 0
    if keyframes.conditioning == "channel" and spec.keyframe_condition is None:
        raise _Reject("unpackable", "data.keyframes.conditioning=channel: the model takes no channel "
                      "condition to lay keyframes in (an image-to-video model's)")  # fmt: skip
    if keyframes.conditioning == "channel":
        return 0
    tokens = 0
    for index, segment in enumerate(facts.segments):
        if segment.role != "target" or segment.group not in (None, group) or not segment.keyframe_frames:
            continue
        if spec.patch_size[0] != 1 or spec.layout != "shared":
            raise _Reject("unpackable", f"segment {index}: keyframe condition segments are one latent frame "
                          f"anchored on the target's positions: they need layout shared and patch_size[0] = 1 "
                          f"(got {spec.layout}, {spec.patch_size[0]})")  # fmt: skip
        grid = patch_grid((segment.channels, 1, segment.height, segment.width), spec.patch_size)
        tokens += keyframes.most(segment.keyframe_frames, segment.frames) * grid[1] * grid[2]
    return tokens


def _check_model_inputs(facts: SampleFacts, plans: Sequence[SegmentPlan], spec: PackingSpec) -> None:
    try:
        conditions.check_model_inputs(facts, [plan.shape for plan in plans], spec)
    except ValueError as error:
        raise _Reject("unpackable", str(error)) from None


def plan_item(
    facts: SampleFacts,
    options: DecodeOptions,
    spec: PackingSpec | None,
    url: str,
    key: str,
    tokens: int | None = None,
) -> ItemPlan:
    """Trained shapes and token count of a sample; a :class:`DataError` when the recipe cannot train it.

    Without ``spec`` (previews) the model checks are left out and the token count is 0. Given
    ``tokens`` (what a :class:`~imontage.data.catalog.Catalog` worked out from the same facts),
    the model checks are not made again. Nothing here allocates by the facts' sizes: the token
    count is arithmetic, and the layout is checked without building positions.
    """
    groups = ("win", "lose") if any(segment.group for segment in facts.segments) else (None,)
    try:
        plans = tuple(_segment_plan(segment, options, spec) for segment in facts.segments)
        text_tokens = _text_tokens(facts, options, spec)
        if tokens is None:
            tokens = sum(
                _sample_tokens(facts, plans, group, text_tokens, spec, options.keyframes) for group in groups
            )
            # keyframes laid in the channels replace the first frame's channel condition
            keyframe_channels = options.keyframes.on and options.keyframes.conditioning == "channel"
            if spec is not None and not keyframe_channels:
                _check_model_inputs(facts, plans, spec)
    except _Reject as reject:
        raise DataError.of(reject.reason, url, key, str(reject)) from None
    return ItemPlan(plans, text_tokens, tokens, len(groups))


# ---------------------------------------------------------------------------------------------
# 3. decode


@dataclass
class DecodedItem:
    """The training samples of one raw sample (two for a preference pair: win, then lose)."""

    key: str
    url: str
    task: str
    samples: list[Sample]
    tokens: int


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 -> ``[3, T, H, W]`` float32 in [-1, 1], contiguous."""
    # Transposed while still bytes: patchifying then reads whole rows, several times faster
    # for clips than gathering from a float tensor that keeps the THWC strides.
    planar = np.ascontiguousarray(pixels.transpose(3, 0, 1, 2))
    return torch.from_numpy(planar).float().div_(127.5).sub_(1.0)


def _decode_segment(
    raw: RawSample, segment: SegmentRecord, plan: SegmentPlan, max_pixels: int
) -> torch.Tensor:
    channels, _, height, width = plan.shape
    member = segment.members[0]  # the member an error names
    try:
        if segment.kind == "latent":
            array = media.load_array(raw.members[member], extension(member), segment.tensor)
            return torch.from_numpy(array).reshape(plan.shape)
        if segment.kind == "video" and not segment.is_frame_list:
            pixels = media.decode_video(
                raw.members[member], extension(member), plan.frame_indices, (height, width), max_pixels
            )
            return _to_tensor(pixels)
        frames = []
        for i in plan.frame_indices:
            member = segment.members[i]
            frames.append(
                media.decode_image(raw.members[member], (height, width), extension(member), max_pixels)
            )
    except media.MediaError as error:
        raise _media_error(raw, member, error) from None
    return _to_tensor(np.stack(frames))


def _text_segments(
    raw: RawSample, record: SampleRecord, options: DecodeOptions, spec: PackingSpec | None
) -> list[Segment]:
    """The sample's text: its string, or its precomputed embeddings, and then the second text
    encoder's (a segment of encoder 1) when the model reads them and the sample has any."""
    if not options.text_embeddings:
        return [Segment("text", text=record.text)] if record.text else []
    assert record.text_embedding is not None  # plan_item rejected samples without one
    segments = [Segment("text", data=_array(raw, record.text_embedding))]  # [L, E]
    if spec is not None and spec.text_embed_2_dim and record.text_embedding_2 is not None:
        second = _array(raw, record.text_embedding_2)  # [L2, E2]
        if second.shape[0]:
            segments.append(Segment("text", data=second, encoder=1))
    return segments


def _array(raw: RawSample, member: str) -> torch.Tensor:
    try:
        return torch.from_numpy(media.load_array(raw.members[member], extension(member)))
    except media.MediaError as error:
        raise _media_error(raw, member, error) from None


def check_array_members(raw: RawSample, members: Iterable[str]) -> None:
    """Load each of ``members`` (array members of the sample): a :class:`DataError` for one that
    does not load or holds NaN or Inf (``non_finite``). Training loads only those its model reads;
    ``tools/inspect_shards.py --validate`` checks all of a record's (``SampleRecord.array_members``),
    the encoder those it carries over."""
    for member in members:
        _array(raw, member)


def _sample_inputs(raw: RawSample, record: SampleRecord, spec: PackingSpec | None) -> dict[str, Any]:
    """The per-sample fields the model reads (Sample.pooled_text, image_embeds, guidance); only those
    it reads, so that a batch of a model that takes none never mixes samples with and without."""
    if spec is None:
        return {}
    fields: dict[str, Any] = {"guidance": spec.guidance}
    if spec.pooled_text_dim:
        assert record.pooled_text is not None  # plan_item rejected samples without one
        fields["pooled_text"] = _array(raw, record.pooled_text)  # [E]
    if spec.image_embed_dim:
        assert record.image_embeds is not None
        fields["image_embeds"] = _array(raw, record.image_embeds)  # [L, E]
    return fields


def _keyframe_conditions(
    raw: RawSample,
    record: SampleRecord,
    visual: list[Segment],
    group: str | None,
    spec: PackingSpec | None,
    keyframes: KeyframeOptions,
    epoch: int,
) -> tuple[list[Segment], list[Segment]]:
    """``visual`` with the chosen keyframes of each target laid in its channels (``channel``), and the
    keyframe condition segments to append (``shared``): :mod:`imontage.data.keyframes`."""
    out, extra = list(visual), []
    for index, (segment, entry) in enumerate(zip(visual, record.segments, strict=True)):
        if segment.role != "target" or entry.group not in (None, group):
            continue
        assert segment.data is not None
        clip_frames = segment.data.shape[1]
        chosen: tuple[int, ...] = ()
        stored = None
        if entry.keyframes is not None:
            stored = _array(raw, entry.keyframes)  # [C, K, H, W], checked against its header at inspection
            chosen = keyframes.choose(entry.keyframe_frames, clip_frames, raw.key, index, epoch)
        if keyframes.conditioning == "shared":
            assert stored is not None or not chosen
            extra += [Segment("latent", "condition", data=stored[:, i : i + 1], anchor=entry.keyframe_frames[i])
                      for i in chosen if stored is not None]  # fmt: skip
            continue
        assert spec is not None and spec.keyframe_condition is not None  # plan_item rejected others
        if stored is None:
            stored = segment.data.new_zeros(segment.data.shape[0], 0, *segment.data.shape[2:])
        latents, given = channel_keyframes(stored, entry.keyframe_frames, chosen, clip_frames)
        out[index] = dataclasses.replace(segment, channel_condition=spec.keyframe_condition(latents, given))
    return out, extra


def _with_channel_conditions(
    raw: RawSample, record: SampleRecord, visual: list[Segment], group: str | None, spec: PackingSpec | None
) -> list[Segment]:
    """``visual`` with each target's channel condition, where the model takes one (imontage.data.conditions)."""
    if spec is None or not spec.channel_condition:
        return visual
    out = list(visual)
    roles, groups = [s.role for s in record.segments], [s.group for s in record.segments]
    image = conditions.condition_segment(roles, groups, group)
    for index, (segment, entry) in enumerate(zip(visual, record.segments, strict=True)):
        if segment.role != "target" or entry.group not in (None, group):
            continue
        assert segment.data is not None
        if not conditions.gives_first_frame(spec):
            extra = conditions.no_given_frame(spec, segment.data)
        elif spec.channel_condition == "wan_i2v":
            assert entry.condition_latent is not None  # plan_item rejected targets without one
            latent = _array(raw, entry.condition_latent).reshape(segment.data.shape)
            extra = conditions.wan_i2v_condition(latent)
        else:
            assert image is not None  # plan_item rejected samples without one
            image_latent = visual[image].data  # [C, 1, H, W]
            assert image_latent is not None
            extra = conditions.latent_concat_condition(image_latent, segment.data.shape[1])
        out[index] = dataclasses.replace(segment, channel_condition=extra)
    return out


def decode_item(
    raw: RawSample,
    options: DecodeOptions,
    spec: PackingSpec | None = None,
    facts: SampleFacts | None = None,
    tokens: int | None = None,
    epoch: int = 0,
) -> DecodedItem:
    """Decode one raw sample into its training sample(s); a :class:`DataError` names what is wrong.

    ``facts`` (from a shard index) and ``tokens`` (the sample's count in a catalog) save checking
    them against the model again (see :func:`plan_item`); the sample's own headers must give the
    same facts, or it is ``unpackable`` (the index is out of date or not the shard's), since its
    batch was planned from them. ``epoch`` seeds Adaptive Tuning's keyframe draws (with the key).
    """
    record, found = inspect_sample(raw)
    if facts is not None and found != facts:
        detail = (
            f"{facts_difference(facts, found, record)}: its shard index is out of date or not this shard's"
        )
        raise DataError.of("unpackable", raw.url, raw.key, detail)
    plan = plan_item(found, options, spec, raw.url, raw.key, tokens)
    visual = [
        Segment(
            segment.kind,
            segment.role,
            data=_decode_segment(raw, segment, segment_plan, options.max_pixels),
            anchor=segment.anchor,
        )
        for segment, segment_plan in zip(record.segments, plan.segments, strict=True)
    ]
    text = _text_segments(raw, record, options, spec)
    inputs = _sample_inputs(raw, record, spec)
    samples = []
    for group in record.groups:
        if options.keyframes.on:
            conditioned, keyframe_segments = _keyframe_conditions(
                raw, record, visual, group, spec, options.keyframes, epoch
            )
            if options.keyframes.conditioning == "shared":
                conditioned = _with_channel_conditions(raw, record, conditioned, group, spec)
        else:
            conditioned, keyframe_segments = _with_channel_conditions(raw, record, visual, group, spec), []
        segments = [
            seg
            for seg, entry in zip(conditioned, record.segments, strict=True)
            if entry.group in (None, group)
        ] + keyframe_segments
        key = raw.key if group is None else f"{raw.key}#{group}"
        samples.append(Sample([*text, *segments], key=key, task=record.task, **inputs))
    return DecodedItem(raw.key, raw.url, record.task, samples, plan.tokens)


def decode_sample(
    raw: RawSample, options: DecodeOptions | None = None, spec: PackingSpec | None = None
) -> list[Sample]:
    """The training samples of one raw sample: one, or ``[win, lose]`` for a preference pair.

    Images become ``[3, 1, H, W]`` and videos ``[3, T, H, W]`` float32 RGB in [-1, 1], at their
    bucket size; latents keep their stored shape.
    """
    return decode_item(raw, options or DecodeOptions(), spec).samples
