"""What a sample holds, as its json and media headers tell it, before any pixel is decoded.

:func:`imontage.data.decode.inspect_sample` reads them from a raw sample; a shard index stores
them (:mod:`imontage.data.index`), and what decides a sample (the recipe's plan at decode, the
model inputs :mod:`imontage.data.conditions` checks) reads them back from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imontage.data.records import PREFERENCE_GROUPS, SEGMENT_KINDS, SEGMENT_ROLES


@dataclass(frozen=True)
class SegmentFacts:
    kind: str
    role: str
    group: str | None
    anchor: int | None
    channels: int
    frames: int  # frames in the member(s); 1 for images
    height: int
    width: int
    fps: float  # 0 when unknown
    condition_channels: int = 0  # channels C of the segment's condition_latent [C, T, H, W]; 0 without
    member: str = ""  # the member holding it (a frame-image video's first frame), for messages
    # latent frames of the standalone keyframe latents stored beside it (``keyframes``); () without
    keyframe_frames: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> SegmentFacts:
        if isinstance(data, dict):  # an index written before keyframes: none
            data = {"keyframe_frames": [], **data}
        fields = _checked_fields(data, _SEGMENT_FACTS)
        fields["keyframe_frames"] = tuple(fields["keyframe_frames"])
        return cls(**fields)


@dataclass(frozen=True)
class SampleFacts:
    task: str
    text_bytes: int  # UTF-8 length of the text
    embedding_rows: int  # rows L of the precomputed text embedding; 0 without one
    segments: tuple[SegmentFacts, ...]
    pooled_dim: int = 0  # width E of the pooled text vector [E]; 0 without one
    image_tokens: int = 0  # rows L of the image-encoder tokens [L, E]; 0 without them
    image_dim: int = 0  # their width E
    embedding_dim: int = 0  # width E of the precomputed text embedding [L, E]; 0 without one
    embedding_member: str = ""  # the member holding it
    # rows L2 and width E2 of a second text encoder's embeddings [L2, E2] (HunyuanVideo 1.5's glyph
    # text, ``text_embedding_2``); 0 without them
    embedding_2_rows: int = 0
    embedding_2_dim: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SampleFacts:
        """Facts as :meth:`to_json` wrote them; a ValueError naming the first field that is not
        (an index file is read, not trusted)."""
        if isinstance(data, dict):  # an index written before the second text's fields: none
            data = {**dict.fromkeys(_SECOND_TEXT_FACTS, 0), **data}
        fields = _checked_fields(data, _SAMPLE_FACTS)
        segments = []
        for number, segment in enumerate(fields.pop("segments")):
            try:
                segments.append(SegmentFacts.from_json(segment))
            except ValueError as error:
                raise ValueError(f"segments[{number}]: {error}") from None
        return cls(segments=tuple(segments), **fields)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_size(value: Any) -> bool:
    return _is_count(value) and value > 0


def _one_of(*choices: object) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, (str, type(None))) and value in choices


# What each field of the facts may hold, as an index file gives them.
_SEGMENT_FACTS: dict[str, Callable[[Any], bool]] = {
    "kind": _one_of(*SEGMENT_KINDS),
    "role": _one_of(*SEGMENT_ROLES),
    "group": _one_of(None, *PREFERENCE_GROUPS),
    "anchor": lambda value: value is None or _is_count(value),
    "channels": _is_size,
    "frames": _is_count,
    "height": _is_size,
    "width": _is_size,
    "fps": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    and math.isfinite(value) and value >= 0,
    "condition_channels": _is_count,
    "member": lambda value: isinstance(value, str),
    "keyframe_frames": lambda value: isinstance(value, (list, tuple)) and all(_is_count(f) for f in value)
    and list(value) == sorted(set(value)),
}  # fmt: skip
_SAMPLE_FACTS: dict[str, Callable[[Any], bool]] = {
    "task": lambda value: isinstance(value, str),
    "text_bytes": _is_count,
    "embedding_rows": _is_count,
    "segments": lambda value: isinstance(value, list) and len(value) > 0,
    "pooled_dim": _is_count,
    "image_tokens": _is_count,
    "image_dim": _is_count,
    "embedding_dim": _is_count,
    "embedding_member": lambda value: isinstance(value, str),
    "embedding_2_rows": _is_count,
    "embedding_2_dim": _is_count,
}
_SECOND_TEXT_FACTS = ("embedding_2_rows", "embedding_2_dim")


def _checked_fields(data: Any, checks: dict[str, Callable[[Any], bool]]) -> dict[str, Any]:
    """``data``, a JSON object of exactly the fields of ``checks``, each passing its check."""
    if not isinstance(data, dict) or set(data) != set(checks):
        raise ValueError(f"expected an object of the fields {', '.join(checks)}")
    for name, check in checks.items():
        if not check(data[name]):
            raise ValueError(f"field '{name}' cannot be {str(data[name])[:60]!r}")
    return dict(data)
