"""The sample schema: the ``json`` member of a sample, parsed and checked against its members.

```json
{"task": "edit", "text": "recolour the red circle blue", "text_embedding": "t5.npy", "text_embedding_2": "byt5.npy",
 "pooled_text": "clip.safetensors", "image_embeds": "clip_image.safetensors",
 "segments": [{"role": "condition", "kind": "image", "member": "0.jpg"},
              {"role": "target", "kind": "video", "member": "clip.mp4"},
              {"role": "target", "kind": "video", "frames": ["1.png", "2.png"], "fps": 8},
              {"role": "target", "kind": "latent", "member": "z.safetensors", "tensor": "latent"},
              {"role": "target", "kind": "latent", "member": "v.safetensors", "condition_latent": "c.safetensors"},
              {"role": "condition", "kind": "image", "member": "c.png", "anchor": 12},
              {"role": "target", "kind": "video", "member": "a.mp4", "group": "win"},
              {"role": "target", "kind": "video", "member": "b.mp4", "group": "lose"}]}
```

docs/data.md describes every field. Parsing only reads the json and checks that the members it
names exist and have a readable type; nothing is decoded here. Other top-level fields (provenance, scores) are allowed and ignored;
a segment's fields are checked strictly, since a misspelt one would change what is trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from imontage.data.problems import DataError
from imontage.data.shards import RawSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm")
ARRAY_EXTENSIONS = ("npy", "safetensors")
# Formats that load through pickle: never decoded, whatever the json says.
PICKLE_EXTENSIONS = ("pth", "pt", "pkl", "pickle", "pyd")
SEGMENT_KINDS = ("image", "video", "latent")
SEGMENT_ROLES = ("condition", "target")
PREFERENCE_GROUPS = ("win", "lose")
RECORD_MEMBER = "json"
_SEGMENT_FIELDS = frozenset(
    {"role", "kind", "member", "frames", "fps", "anchor", "group", "tensor", "condition_latent",
     "keyframes", "keyframe_frames"}
)  # fmt: skip
# Top-level fields naming array members the models read per sample (docs/data.md).
ARRAY_FIELDS = ("text_embedding", "pooled_text", "image_embeds", "text_embedding_2")


def extension(member: str) -> str:
    """``"0.PNG"`` -> ``"png"``: the suffix after the last dot, lower case."""
    return member.rsplit(".", 1)[-1].lower()


@dataclass(frozen=True)
class SegmentRecord:
    """One entry of ``segments``: a visual segment and the member(s) holding it."""

    role: str
    kind: str
    members: tuple[str, ...]  # one media member, or a video's frame images in order
    anchor: int | None = None  # `shared` layout: the target frame this condition starts at
    group: str | None = None  # preference pairs: "win" or "lose"; None for segments both share
    fps: float | None = None  # frame-image videos: their frame rate, needed to sample by fps
    tensor: str | None = None  # safetensors latents: the tensor's name (default: the only one)
    # latent targets: a member with the latent an image-to-video channel condition takes [C, T, H, W]
    # (Wan 2.1 I2V: the condition image followed by zero frames, through the VAE)
    condition_latent: str | None = None
    # latent targets: a member with standalone latents of some of the clip's frames [C, K, H, W]
    # (each frame encoded alone, as a user's keyframe is at sampling), and the latent frame of the
    # target each lies in, ascending (tools/encode_shards.py --keyframes; imontage.data.keyframes)
    keyframes: str | None = None
    keyframe_frames: tuple[int, ...] = ()

    @property
    def is_frame_list(self) -> bool:
        return self.kind == "video" and extension(self.members[0]) in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class SampleRecord:
    task: str
    text: str
    text_embedding: str | None  # member with precomputed text embeddings [L, E]
    segments: tuple[SegmentRecord, ...]
    pooled_text: str | None = None  # member with one pooled text vector [E] (HunyuanVideo's CLIP)
    image_embeds: str | None = None  # member with image-encoder tokens [L, E] (Wan 2.1 I2V's CLIP)
    # member with a second text encoder's embeddings [L2, E2] (HunyuanVideo 1.5's ByT5 glyph text)
    text_embedding_2: str | None = None

    @property
    def array_members(self) -> tuple[str, ...]:
        """Its array members besides the latents: text embeddings, pooled text, image tokens, condition latents."""
        named = (self.text_embedding, self.pooled_text, self.image_embeds, self.text_embedding_2)
        conditions = [segment.condition_latent for segment in self.segments]
        conditions += [segment.keyframes for segment in self.segments]
        return tuple(member for member in (*named, *conditions) if member is not None)

    @property
    def groups(self) -> tuple[str | None, ...]:
        """(None,) for a plain sample; ("win", "lose") for a preference pair."""
        return PREFERENCE_GROUPS if any(s.group for s in self.segments) else (None,)


class _Invalid(Exception):
    """A schema violation, turned into a DataError with the sample's shard and key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _field(entry: dict[str, Any], name: str, types: type | tuple[type, ...], where: str) -> Any:
    value = entry.get(name)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        raise _Invalid("bad_json", f"{where}: '{name}' has the wrong type ({value!r})")
    return value


def _check_member(raw: RawSample, member: str, allowed: tuple[str, ...], where: str) -> None:
    suffix = extension(member)
    if suffix in PICKLE_EXTENSIONS:
        raise _Invalid("unsafe_member", f"{where}: member '{member}' would need pickle to load")
    if suffix not in allowed:
        raise _Invalid("bad_json", f"{where}: member '{member}' is not one of .{', .'.join(allowed)}")
    if member not in raw.members:
        present = ", ".join(sorted(raw.members))
        raise _Invalid("missing_member", f"{where}: member '{member}' is missing (members: {present})")


def _segment_members(entry: dict[str, Any], kind: str, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The segment's members and the extensions they may have."""
    member, frames = entry.get("member"), entry.get("frames")
    if kind == "video" and frames is not None:
        if member is not None or not isinstance(frames, list) or not frames:
            raise _Invalid("bad_json", f"{where}: a video has either 'member' or a non-empty 'frames' list")
        if not all(isinstance(name, str) for name in frames):
            raise _Invalid("bad_json", f"{where}: 'frames' must list member names")
        return tuple(frames), IMAGE_EXTENSIONS
    if not isinstance(member, str):
        raise _Invalid("bad_json", f"{where}: needs 'member', the name of its {kind} member")
    allowed = {"image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS, "latent": ARRAY_EXTENSIONS}[kind]
    return (member,), allowed


def _parse_segment(raw: RawSample, entry: Any, where: str) -> SegmentRecord:
    if not isinstance(entry, dict):
        raise _Invalid("bad_json", f"{where}: expected an object, got {entry!r}")
    unknown = sorted(set(entry) - _SEGMENT_FIELDS)
    if unknown:
        raise _Invalid("bad_json", f"{where}: unknown field(s) {', '.join(unknown)}")
    role, kind = entry.get("role", "condition"), entry.get("kind")
    if role not in SEGMENT_ROLES:
        raise _Invalid("bad_json", f"{where}: role '{role}' is not one of {', '.join(SEGMENT_ROLES)}")
    if kind not in SEGMENT_KINDS:
        raise _Invalid("bad_json", f"{where}: kind '{kind}' is not one of {', '.join(SEGMENT_KINDS)}")
    members, allowed = _segment_members(entry, kind, where)
    for member in members:
        _check_member(raw, member, allowed, where)
    anchor = _field(entry, "anchor", int, where)
    if anchor is not None and anchor < 0:
        raise _Invalid("bad_json", f"{where}: anchor must be >= 0, got {anchor}")
    group = entry.get("group")
    if group not in (None, *PREFERENCE_GROUPS):
        raise _Invalid("bad_json", f"{where}: group '{group}' is not one of {', '.join(PREFERENCE_GROUPS)}")
    fps = _field(entry, "fps", (int, float), where)
    if fps is not None and not (math.isfinite(fps) and fps > 0):  # json reads NaN and Infinity too
        raise _Invalid("bad_json", f"{where}: fps must be positive, got {fps}")
    tensor = _field(entry, "tensor", str, where)
    condition = _field(entry, "condition_latent", str, where)
    if condition is not None:
        if kind != "latent" or role != "target":
            raise _Invalid("bad_json", f"{where}: 'condition_latent' goes with a latent target segment")
        _check_member(raw, condition, ARRAY_EXTENSIONS, f"{where} condition_latent")
    keyframes, frames = _keyframes(raw, entry, kind, role, where)
    fps_value = None if fps is None else float(fps)
    return SegmentRecord(role, kind, members, anchor, group, fps_value, tensor, condition, keyframes, frames)


def _keyframes(
    raw: RawSample, entry: dict[str, Any], kind: str, role: str, where: str
) -> tuple[str | None, tuple[int, ...]]:
    """A latent target's ``keyframes`` member and ``keyframe_frames`` (both or neither)."""
    member = _field(entry, "keyframes", str, where)
    frames = entry.get("keyframe_frames")
    if member is None and frames is None:
        return None, ()
    if kind != "latent" or role != "target":
        raise _Invalid("bad_json", f"{where}: 'keyframes' go with a latent target segment")
    if member is None or not isinstance(frames, list) or not frames:
        raise _Invalid("bad_json", f"{where}: 'keyframes' and a non-empty 'keyframe_frames' go together")
    counts = all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in frames)
    if not counts or frames != sorted(set(frames)):
        raise _Invalid("bad_json", f"{where}: 'keyframe_frames' must be distinct frames >= 0, ascending")
    _check_member(raw, member, ARRAY_EXTENSIONS, f"{where} keyframes")
    return member, tuple(frames)


def _parse(raw: RawSample) -> SampleRecord:
    if RECORD_MEMBER not in raw.members:
        raise _Invalid("bad_json", f"no '{RECORD_MEMBER}' member (members: {', '.join(sorted(raw.members))})")
    try:
        record = json.loads(raw.members[RECORD_MEMBER].decode("utf-8"))
    except ValueError as error:  # not UTF-8, not json, or an integer of thousands of digits
        raise _Invalid("bad_json", f"member 'json' is not UTF-8 json ({error})") from None
    except RecursionError:
        raise _Invalid("bad_json", "member 'json' is not UTF-8 json (nested too deeply to read)") from None
    if not isinstance(record, dict) or not isinstance(record.get("segments"), list) or not record["segments"]:
        raise _Invalid("bad_json", "member 'json' must be an object with a non-empty 'segments' list")
    task = _field(record, "task", str, "member 'json'") or ""
    text = _field(record, "text", str, "member 'json'") or ""
    arrays = {name: _field(record, name, str, "member 'json'") for name in ARRAY_FIELDS}
    for name, member in arrays.items():
        if member is not None:
            _check_member(raw, member, ARRAY_EXTENSIONS, name)
    segments = tuple(_parse_segment(raw, entry, f"segment {i}") for i, entry in enumerate(record["segments"]))
    groups = {segment.group for segment in segments if segment.group}
    if groups and groups != set(PREFERENCE_GROUPS):
        raise _Invalid(
            "bad_json", f"a preference pair needs both 'win' and 'lose' segments, got {sorted(groups)}"
        )
    return SampleRecord(
        task, text, arrays["text_embedding"], segments, arrays["pooled_text"], arrays["image_embeds"],
        arrays["text_embedding_2"],
    )  # fmt: skip


def parse_record(raw: RawSample) -> SampleRecord:
    """The sample's json, checked: a :class:`DataError` (bad_json, missing_member, unsafe_member) otherwise."""
    try:
        return _parse(raw)
    except _Invalid as invalid:
        raise DataError.of(invalid.reason, raw.url, raw.key, str(invalid)) from None
