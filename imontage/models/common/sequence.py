"""Samples as ordered segments, and their packing into one variable-length token sequence.

A sample is an ordered list of segments (text, image, video or latent), each a condition or
a target. ``pack_samples`` patchifies the visual segments, tokenises text, builds positions
with the chosen layout, and lays the samples back to back with ``cu_seqlens``; the model sees
only the packed batch, and ``unpatchify_segments`` turns its output back into segments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from imontage.models.common.positions import SegmentGrid, sample_positions

VISUAL_KINDS = ("image", "video", "latent")
KINDS = ("text", *VISUAL_KINDS)
ROLES = ("condition", "target")
BYTE_VOCAB = 256


@dataclass
class Segment:
    """One segment of a sample.

    Visual segments carry ``data`` as ``[C, T, H, W]`` (an image has T = 1). Text segments carry
    either ``text`` (tokenised by the byte tokenizer) or precomputed embeddings ``data`` ``[L, E]``.
    """

    kind: str
    role: str = "condition"
    data: torch.Tensor | None = None
    text: str | None = None
    anchor: int | None = None  # `shared` layout: target frame this condition starts at
    # Visual segments: channels joined to this segment's input channels and never noised, [C', T, H, W]
    # (image-to-video models: a frame mask and the condition frame's latent, laid over the target).
    channel_condition: torch.Tensor | None = None
    # Text segments given as embeddings: which of the model's text encoders gave them (0: its first,
    # ``model.text_dim`` wide; a family with a second one, such as a glyph-text ByT5, reads 1).
    encoder: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"segment kind '{self.kind}' is not one of {', '.join(KINDS)}")
        if self.role not in ROLES:
            raise ValueError(f"segment role '{self.role}' is not one of {', '.join(ROLES)}")
        if self.kind == "text":
            if self.role != "condition":
                raise ValueError("text segments are conditions")
            if (self.text is None) == (self.data is None):
                raise ValueError("a text segment carries either text or precomputed embeddings [L, E]")
            if self.channel_condition is not None:
                raise ValueError("a text segment has no channels to join a channel_condition to")
            if self.encoder and self.data is None:
                raise ValueError(
                    f"text of encoder {self.encoder} is given as embeddings [L, E], not as a string"
                )
        elif self.data is None or self.data.dim() != 4:
            shape = None if self.data is None else tuple(self.data.shape)
            raise ValueError(f"a {self.kind} segment needs data of shape [C, T, H, W], got {shape}")
        elif self.channel_condition is not None and (
            self.channel_condition.dim() != 4 or self.channel_condition.shape[1:] != self.data.shape[1:]
        ):
            raise ValueError(
                f"channel_condition of shape {tuple(self.channel_condition.shape)} does not lie over "
                f"a {self.kind} segment of shape {tuple(self.data.shape)}: it needs [C', T, H, W] with the same T, H, W"
            )


@dataclass
class Sample:
    segments: list[Segment]
    key: str = ""
    task: str = ""
    # Per-sample conditioning of the pretrained families (None where a model takes none):
    pooled_text: torch.Tensor | None = None  # [E] one pooled text vector (HunyuanVideo: CLIP's)
    image_embeds: torch.Tensor | None = None  # [L, E] image-encoder tokens (Wan 2.1 I2V: CLIP's)
    guidance: float | None = None  # distilled guidance scale (HunyuanVideo's guidance embedding)


# Per-sample fields of a PackedBatch, one row per sample; every other tensor field but cu_seqlens
# has one row per token.
SAMPLE_FIELDS = ("pooled_text", "image_embeds", "guidance")


@dataclass(frozen=True)
class SegmentSpan:
    """Where one segment's tokens sit in a packed batch, and how to unpatchify them."""

    sample: int
    index: int  # position of the segment in its sample
    kind: str
    role: str
    start: int  # first token in the packed sequence
    length: int
    shape: tuple[int, ...]  # [C, T, H, W] for visual segments, [L] for text


@dataclass
class PackedBatch:
    """Several samples back to back; attention never crosses ``cu_seqlens`` boundaries.

    Rows are tokens in sequence order: text rows use ``text_ids``/``text_embeds``, visual rows
    use ``tokens``; the other field is zero there. Text of several encoders (``text_encoder``)
    shares ``text_embeds``, each row zero-padded to the widest.
    """

    tokens: torch.Tensor  # [N, C·pt·ph·pw] patch features of visual rows
    is_text: torch.Tensor  # [N] bool
    text_ids: torch.Tensor  # [N] int64 byte ids of text rows
    text_index: torch.Tensor  # [N] int64 index of a text token inside its segment
    text_embeds: torch.Tensor | None  # [N, E] precomputed text embeddings, or None
    positions: torch.Tensor  # [N, 4] int32 (s, t, h, w)
    cu_seqlens: torch.Tensor  # [B + 1] int32
    target_mask: torch.Tensor  # [N] bool: tokens of target segments (the loss mask)
    timesteps: torch.Tensor  # [N] float32: 0 for clean tokens (text, conditions)
    spans: list[SegmentSpan] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # [B] each sample's task ("" when unnamed)
    channel_condition: torch.Tensor | None = None  # [N, C'·pt·ph·pw] never noised; zero on rows without
    pooled_text: torch.Tensor | None = None  # [B, E]
    image_embeds: torch.Tensor | None = None  # [B, L, E]
    guidance: torch.Tensor | None = None  # [B] float32
    text_encoder: torch.Tensor | None = None  # [N] int64 Segment.encoder of text rows; None: all 0

    def token_fields(self) -> list[str]:
        """Names of the tensor fields with one row per token (those set: ``text_embeds`` may be None)."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name != "cu_seqlens"
            and f.name not in SAMPLE_FIELDS
            and isinstance(getattr(self, f.name), torch.Tensor)
        ]

    def map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``fn`` applied to every per-token field, as keyword arguments for :meth:`replace`."""
        return {name: fn(getattr(self, name)) for name in self.token_fields()}

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max().item()) if self.num_samples else 0

    def sample_index(self) -> torch.Tensor:
        """``[N]`` int64: which sample each token belongs to."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.num_samples, device=lengths.device), lengths)

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def replace(self, **changes: object) -> PackedBatch:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def patch_grid(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(T', H', W') of a ``[C, T, H, W]`` segment; the sizes must divide by the patch size."""
    _, frames, height, width = shape
    pt, ph, pw = patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(
            f"segment of shape {tuple(shape)} does not divide into patches of {tuple(patch_size)}"
        )
    return frames // pt, height // ph, width // pw


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``[C, T, H, W]`` -> ``[T'·H'·W', C·pt·ph·pw]``, tokens t-major, features (C, pt, ph, pw)."""
    channels = x.shape[0]
    gt, gh, gw = patch_grid(x.shape, patch_size)
    pt, ph, pw = patch_size
    x = x.reshape(channels, gt, pt, gh, ph, gw, pw)
    x = x.permute(1, 3, 5, 0, 2, 4, 6)  # [T', H', W', C, pt, ph, pw]
    return x.reshape(gt * gh * gw, channels * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, shape: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[T'·H'·W', C·pt·ph·pw]`` -> ``[C, T, H, W]``."""
    channels = shape[0]
    gt, gh, gw = patch_grid(shape, patch_size)
    pt, ph, pw = patch_size
    x = tokens.reshape(gt, gh, gw, channels, pt, ph, pw)
    x = x.permute(3, 0, 4, 1, 5, 2, 6)  # [C, T', pt, H', ph, W', pw]
    return x.reshape(channels, gt * pt, gh * ph, gw * pw)


def byte_tokenize(text: str, max_len: int) -> torch.Tensor:
    """UTF-8 bytes as int64 ids in [0, 256), truncated to ``max_len``."""
    return torch.tensor(list(text.encode("utf-8")[:max_len]), dtype=torch.int64)


@dataclass(frozen=True)
class PackingSpec:
    """What packing needs to know of the model: channels, patch size, text and positions."""

    in_channels: int
    patch_size: tuple[int, int, int]
    max_text_len: int
    layout: str = "video3d"
    virtual_frames: int = 32
    head_window: int = 8
    tail_window: int = 8
    # What else the model reads per sample, which the data pipeline must supply (0, None, "": nothing):
    pooled_text_dim: int = 0  # Sample.pooled_text [E] of this width (HunyuanVideo: CLIP's pooled text)
    image_embed_dim: int = 0  # Sample.image_embeds [L, E] of this width (Wan 2.1 I2V: CLIP image tokens)
    guidance: float | None = None  # Sample.guidance of every sample (guidance-distilled HunyuanVideo)
    channel_condition: str = ""  # one of CHANNEL_CONDITIONS: how each target's channel condition is built
    text_embed_dim: int = 0  # width E of precomputed text embeddings [L, E] (model.text_dim); 0: byte text
    # Width of a second text encoder's embeddings (text segments of encoder 1; HunyuanVideo 1.5's
    # glyph-text ByT5); 0: the model reads no second text.
    text_embed_2_dim: int = 0
    # How keyframe latents laid at arbitrary frames become the model's channel condition (an image-to-
    # video family's: ModelInputs.keyframe_condition); None: the model takes no channel condition.
    keyframe_condition: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


# Channel conditions a model may take, laid over each target segment [C', T, H, W]:
#   "wan_i2v": 4 first-frame mask channels, then the latent of the condition image followed by
#              zero frames (diffusers' WanImageToVideoPipeline.prepare_latents);
#   "latent_concat": the condition image's latent on frame 0 (zeros after), then 1 mask channel
#              (diffusers' HunyuanVideoImageToVideoPipeline, image_condition_type latent_concat).
CHANNEL_CONDITIONS = ("", "wan_i2v", "latent_concat")
WAN_MASK_CHANNELS = 4  # "wan_i2v": Wan's VAE packs 4 pixel frames into a latent frame, a mask channel each
# The distilled guidance a guidance-embedding model is trained at unless the recipe says otherwise:
# finetrainers (models/hunyuan_video/base_specification.py: forward(guidance=1.0), fed ×1000 like
# diffusers' pipeline) and musubi-tuner (--guidance_scale, default 1.0) fine-tune HunyuanVideo at 1.0.
DEFAULT_EMBEDDED_GUIDANCE = 1.0


def _segment_rows(segment: Segment, spec: PackingSpec, where: str) -> tuple[torch.Tensor, SegmentGrid]:
    """The segment's token rows (byte ids for text, patch features for visual) and its grid."""
    if segment.kind == "text":
        if segment.text is not None:
            rows = byte_tokenize(segment.text, spec.max_text_len)
        else:
            assert segment.data is not None
            rows = segment.data[: spec.max_text_len]
        return rows, SegmentGrid("text", segment.role, (rows.shape[0], 1, 1))
    assert segment.data is not None
    if segment.data.shape[0] != spec.in_channels:
        raise ValueError(f"{where}: {segment.data.shape[0]} channels, the model takes {spec.in_channels}")
    try:
        grid = patch_grid(segment.data.shape, spec.patch_size)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    rows = patchify(segment.data.float(), spec.patch_size)
    return rows, SegmentGrid(segment.kind, segment.role, grid, segment.anchor)


def pack_samples(samples: Sequence[Sample], spec: PackingSpec) -> PackedBatch:
    """Pack samples back to back into one :class:`PackedBatch` (CPU tensors)."""
    patch_dim = spec.in_channels * spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2]
    tokens, is_text, text_ids, text_index, text_embeds, positions, target = [], [], [], [], [], [], []
    spans: list[SegmentSpan] = []
    cu_seqlens = [0]
    uses_embeds = {
        seg.data is not None for sample in samples for seg in sample.segments if seg.kind == "text"
    }
    if len(uses_embeds) > 1:
        raise ValueError("a batch mixes text given as strings with precomputed text embeddings")
    embed_dim = max(
        (
            seg.data.shape[1]
            for s in samples
            for seg in s.segments
            if seg.kind == "text" and seg.data is not None
        ),
        default=0,
    )
    encoders = any(seg.encoder for s in samples for seg in s.segments if seg.kind == "text")
    text_encoder = []
    condition_channels = {
        seg.channel_condition.shape[0]
        for s in samples
        for seg in s.segments
        if seg.channel_condition is not None
    }
    if len(condition_channels) > 1:
        raise ValueError(f"channel conditions of {sorted(condition_channels)} channels in one batch")
    condition_dim = next(iter(condition_channels)) * math.prod(spec.patch_size) if condition_channels else 0
    channel_condition = []
    for sample_index, sample in enumerate(samples):
        grids = []
        start = cu_seqlens[-1]  # first token of the next segment
        for segment_index, segment in enumerate(sample.segments):
            where = f"sample {sample.key or sample_index}, segment {segment_index}"
            rows, grid = _segment_rows(segment, spec, where)
            n = grid.num_tokens
            grids.append(grid)
            text = segment.kind == "text"
            shape = (n,) if text else tuple(segment.data.shape)  # type: ignore[union-attr]
            spans.append(
                SegmentSpan(sample_index, segment_index, segment.kind, segment.role, start, n, shape)
            )
            is_text.append(torch.full((n,), text, dtype=torch.bool))
            target.append(torch.full((n,), segment.role == "target", dtype=torch.bool))
            text_index.append(torch.arange(n) if text else torch.zeros(n, dtype=torch.int64))
            if text and segment.text is not None:
                text_ids.append(rows)
            else:
                text_ids.append(torch.zeros(n, dtype=torch.int64))
            if embed_dim:
                if text:  # zero-padded to the widest encoder's rows
                    text_embeds.append(torch.nn.functional.pad(rows.float(), (0, embed_dim - rows.shape[1])))
                else:
                    text_embeds.append(torch.zeros(n, embed_dim))
            if encoders:
                text_encoder.append(torch.full((n,), segment.encoder if text else 0, dtype=torch.int64))
            tokens.append(torch.zeros(n, patch_dim) if text else rows)
            if condition_dim:
                extra = segment.channel_condition
                channel_condition.append(
                    torch.zeros(n, condition_dim)
                    if extra is None
                    else patchify(extra.float(), spec.patch_size)
                )
            start += n
        try:
            positions.append(
                sample_positions(spec.layout, grids, spec.virtual_frames, spec.head_window, spec.tail_window)
            )
        except ValueError as error:
            raise ValueError(f"sample {sample.key or sample_index}: {error}") from error
        cu_seqlens.append(start)

    total = cu_seqlens[-1]
    return PackedBatch(
        tokens=torch.cat(tokens) if tokens else torch.zeros(0, patch_dim),
        is_text=torch.cat(is_text) if is_text else torch.zeros(0, dtype=torch.bool),
        text_ids=torch.cat(text_ids) if text_ids else torch.zeros(0, dtype=torch.int64),
        text_index=torch.cat(text_index) if text_index else torch.zeros(0, dtype=torch.int64),
        text_embeds=torch.cat(text_embeds) if text_embeds else None,
        positions=torch.cat(positions) if positions else torch.zeros(0, 4, dtype=torch.int32),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        target_mask=torch.cat(target) if target else torch.zeros(0, dtype=torch.bool),
        timesteps=torch.zeros(total),
        spans=spans,
        tasks=[sample.task for sample in samples],
        channel_condition=torch.cat(channel_condition) if channel_condition else None,
        text_encoder=torch.cat(text_encoder) if text_encoder else None,
        **_per_sample_fields(samples),
    )


def _per_sample_fields(samples: Sequence[Sample]) -> dict[str, torch.Tensor | None]:
    """``pooled_text``, ``image_embeds`` and ``guidance`` stacked over samples: all of them or none."""
    fields: dict[str, torch.Tensor | None] = {}
    for name in SAMPLE_FIELDS:
        values = [getattr(sample, name) for sample in samples]
        given = [value is not None for value in values]
        if not any(given):
            fields[name] = None
            continue
        if not all(given):
            missing = next(
                sample.key or str(i) for i, sample in enumerate(samples) if getattr(sample, name) is None
            )
            raise ValueError(f"sample {missing} has no {name} while others in its batch have one")
        if name == "guidance":
            fields[name] = torch.tensor(values, dtype=torch.float32)
            continue
        shapes = {tuple(value.shape) for value in values}
        if len(shapes) > 1:
            raise ValueError(f"{name} of shapes {sorted(shapes)} in one batch: they must agree")
        fields[name] = torch.stack([value.float() for value in values])
    return fields


def unpatchify_segments(
    tokens: torch.Tensor, batch: PackedBatch, patch_size: Sequence[int]
) -> list[list[torch.Tensor | None]]:
    """Per sample, per segment: ``[C, T, H, W]`` from the model's ``[N, P]`` output (None for text)."""
    out: list[list[torch.Tensor | None]] = [[] for _ in range(batch.num_samples)]
    for span in batch.spans:
        if span.kind == "text":
            out[span.sample].append(None)
        else:
            rows = tokens[span.start : span.start + span.length]
            out[span.sample].append(unpatchify(rows, span.shape, patch_size))
    return out
