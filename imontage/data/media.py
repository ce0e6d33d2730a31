"""Media members: header inspection (sizes, frame counts, shapes) and decoding.

Images go through Pillow, videos through PyAV, latents and text embeddings are ``.npy`` (loaded
with ``allow_pickle=False``) or ``.safetensors``. Each function raises :class:`MediaError` with
what went wrong and its reason; the caller adds the shard, key and member.

A member is only ever read by the decoder its extension names. Left to sniff the bytes, Pillow
hands an EPS named ``0.png`` to Ghostscript (an external program found on PATH) and FFmpeg opens
a playlist or concat file named ``.mp4`` as a demuxer that reads further files and URLs. So the
bytes must carry the magic of the declared format, Pillow is restricted to that one format, PyAV
opens the container with its demuxer forced and no protocol or other demuxer allowed, and a
video's codec must be one of :data:`VIDEO_CODECS`; anything else is a ``format_mismatch``.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imontage.data.buckets import Size, fit_image, fit_pixels
from imontage.untrusted import InputError, parse_json

# Pixel caps are ours (data.bad_data.max_pixels), checked on the header before decoding; Pillow's
# own decompression-bomb guard would stop larger images with a less useful error.
Image.MAX_IMAGE_PIXELS = None


class MediaError(Exception):
    """A member that cannot be inspected or decoded, with its reason of problems.SAMPLE_REASONS:
    ``undecodable``, ``unsafe_member`` (it would need pickle) or ``format_mismatch`` (its bytes are
    not the format its extension names, or hold a codec that is not allowed)."""

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason


def _mismatch(message: str) -> MediaError:
    return MediaError(message, reason="format_mismatch")


# ---------------------------------------------------------------------------------------------
# images

# Extension -> the one Pillow format that may read it, and the magic its bytes start with.
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_IMAGE_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff", "WEBP": b"RIFF"}


def _pillow_format(data: bytes, suffix: str | None) -> str:
    """The Pillow format of ``suffix`` that the bytes start like; ``None``: any accepted format
    (local files, not shard members)."""
    formats = [IMAGE_FORMATS[suffix]] if suffix else sorted(set(IMAGE_FORMATS.values()))
    for name in formats:
        if data.startswith(_IMAGE_MAGIC[name]) and (name != "WEBP" or data[8:12] == b"WEBP"):
            return name
    raise _mismatch(f"the bytes are not {' or '.join(formats)}")


def _webp_size(data: bytes) -> Size:
    """(height, width) from a WebP's RIFF header, as libwebp reads it: the canvas of an extended
    file (VP8X), else the frame header of its lossy (VP8) or lossless (VP8L) bitstream. Pillow
    allocates the whole canvas when it opens the file, so the cap must be checked before."""
    chunk, body = data[12:16], data[20:30]
    if len(body) < 10:
        raise MediaError("not a readable image (WebP header cut short)")
    if chunk == b"VP8X":
        return 1 + int.from_bytes(body[7:10], "little"), 1 + int.from_bytes(body[4:7], "little")
    if chunk == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":
        width, height = (int.from_bytes(body[i : i + 2], "little") & 0x3FFF for i in (6, 8))
        return height, width
    if chunk == b"VP8L" and body[0] == 0x2F:
        bits = int.from_bytes(body[1:5], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    raise MediaError(f"not a readable image (WebP chunk {chunk!r} is not VP8X, VP8 or VP8L)")


def image_size(data: bytes, suffix: str | None = None) -> Size:
    """(height, width) from the header of an image of the format ``suffix`` names, decoding nothing."""
    name = _pillow_format(data, suffix)
    if name == "WEBP":
        return _webp_size(data)
    try:
        with Image.open(io.BytesIO(data), formats=[name]) as image:
            return image.height, image.width
    except Exception as error:  # Pillow raises several types for broken data
        raise MediaError(f"not a readable image ({error})") from error


def decode_image(
    data: bytes, size: Size, suffix: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB pixels of an image of the format ``suffix`` names, resized and
    centre-cropped to ``size``. An image over ``max_pixels`` by its own header (whatever an index
    said of it) is refused before Pillow allocates it (``too_many_pixels``)."""
    name = _pillow_format(data, suffix)
    if max_pixels is not None:
        height, width = image_size(data, suffix)
        if height * width > max_pixels:
            raise MediaError(
                f"image of {height}x{width} pixels, over data.bad_data.max_pixels={max_pixels}",
                reason="too_many_pixels",
            )
    try:
        with Image.open(io.BytesIO(data), formats=[name]) as image:
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free when the bucket is that much smaller.
            image.draft("RGB", (size[1], size[0]))
            rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB one
            return np.asarray(fit_image(rgb, size))
    except Exception as error:
        raise MediaError(f"cannot decode image ({error})") from error


# ---------------------------------------------------------------------------------------------
# videos


# Extension -> the one FFmpeg demuxer that may read it (its names, as format_whitelist takes them).
VIDEO_CONTAINERS = {"mp4": "mov,mp4,m4a,3gp,3g2,mj2", "webm": "matroska,webm"}
VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1")
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")  # a first top-level box
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
# FFmpeg's probe of stream parameters decodes a few h264 frames (to learn the reordering delay)
# unless told to discard them all: sizes and counts then come from the container's header only.
_PROBE_OPTIONS = {"skip_frame": "all"}
# Matches no protocol, so a demuxer opens no further file or URL; the member's own bytes come
# through PyAV's I/O, which is no protocol.
NO_PROTOCOLS = {"protocol_whitelist": "none"}


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    height: int
    width: int


def _open_video(data: bytes, suffix: str) -> tuple[Any, Any]:
    """(container, video stream) of a video of the container ``suffix`` names, with an allowed
    codec; no frame is decoded.

    The demuxer is forced and the only one allowed; no protocol is allowed, so nothing the bytes
    name (mp4 data references, further files or URLs) is ever opened.
    """
    import av  # deferred: only video data needs PyAV

    demuxers = VIDEO_CONTAINERS.get(suffix)
    if demuxers is None:
        raise _mismatch(f"'.{suffix}' is not a video container ({', '.join(VIDEO_CONTAINERS)})")
    magic = data[4:8] in _MP4_BOXES if suffix == "mp4" else data.startswith(_EBML_MAGIC)
    if not magic:
        raise _mismatch(f"the bytes are not the {suffix} container")
    limits = {
        **NO_PROTOCOLS,
        "format_whitelist": demuxers,
        "codec_whitelist": ",".join(VIDEO_CODECS),
        **({"enable_drefs": "0", "use_absolute_path": "0"} if suffix == "mp4" else {}),
    }
    container = av.open(
        io.BytesIO(data),
        mode="r",
        format=demuxers.split(",", 1)[0],
        container_options=limits,
        options=_PROBE_OPTIONS,
    )
    try:
        if not container.streams.video:
            raise MediaError("not a readable video (no video stream)")
        stream = container.streams.video[0]
        codec = stream.codec_context.codec.canonical_name if stream.codec_context else "unknown"
        if codec not in VIDEO_CODECS:
            raise _mismatch(f"codec '{codec}' is not one of {', '.join(VIDEO_CODECS)}")
    except BaseException:
        container.close()
        raise
    return container, stream


def video_info(data: bytes, suffix: str) -> VideoInfo:
    """Frame count, rate and size from the container; frames are counted by demuxing when the
    container does not store the count (WebM), which reads packets but decodes nothing."""
    import av

    try:
        container, stream = _open_video(data, suffix)
        with container:
            rate = stream.average_rate or stream.base_rate or Fraction(0)
            frames = int(stream.frames)
            if frames == 0:
                frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            return VideoInfo(frames, float(rate), int(stream.height), int(stream.width))
    except (av.FFmpegError, ValueError) as error:
        raise MediaError(f"not a readable video ({error})") from error


def decode_video(data: bytes, suffix: str, indices: Sequence[int], size: Size, max_pixels: int) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 RGB: the frames at ``indices`` (ascending), each fitted to ``size``.

    The decoder refuses frames over ``max_pixels``, whatever the container's header said.
    """
    import av
    from av.video.reformatter import VideoReformatter

    wanted = {index: position for position, index in enumerate(indices)}
    frames: list[np.ndarray | None] = [None] * len(indices)
    # One thread each for decoding and colour conversion: DataLoader workers already fill the
    # cores. PyAV >= 17 converts with a thread pool by default, set up again for every frame:
    # that cost several times the conversion itself on short clips.
    to_rgb = VideoReformatter()
    one_thread = {"threads": 1} if int(av.__version__.split(".", 1)[0]) >= 17 else {}
    try:
        container, stream = _open_video(data, suffix)
        with container:
            stream.codec_context.thread_count = 1
            # FFmpeg checks the frame size with rows aligned to 64 pixels: slack for the header's size.
            limit = max_pixels + 63 * int(stream.height)
            stream.codec_context.options = {"max_pixels": str(limit)}
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    pixels = to_rgb.reformat(frame, format="rgb24", **one_thread).to_ndarray()  # [H, W, 3]
                    frames[wanted[index]] = fit_pixels(pixels, size)
                if index >= indices[-1]:
                    break
    except (av.FFmpegError, ValueError) as error:
        raise MediaError(f"cannot decode video ({error})") from error
    if any(frame is None for frame in frames):
        got = sum(frame is not None for frame in frames)
        raise MediaError(
            f"video decodes to fewer frames than its header says (needed frame {indices[-1]}, got {got} of {len(indices)})"
        )
    return np.stack(frames)  # type: ignore[arg-type]


def check_format(data: bytes, suffix: str) -> None:
    """Raise a ``format_mismatch`` :class:`MediaError` unless an image or video member is the
    format (for videos: the container and codec) its extension names. Reads headers only; other
    problems raise with their own reason."""
    if suffix in IMAGE_FORMATS:
        image_size(data, suffix)
    elif suffix in VIDEO_CONTAINERS:
        video_info(data, suffix)


# ---------------------------------------------------------------------------------------------
# arrays: latents and text embeddings
#
# Only float arrays are read. The shape a header claims must account for the member's bytes
# exactly, checked before anything is allocated: a 100-byte member cannot claim gigabytes, and
# the facts an index records from a header are the array's true shape.


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
# safetensors dtypes: item sizes, for checking every tensor's claim against the bytes; the float
# ones can be read, as little-endian numpy dtypes.
_SAFETENSORS_ITEM_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
SAFETENSORS_FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


@dataclass(frozen=True)
class ArrayHeader:
    """A float array's shape and dtype, and where its values lie in the member's bytes."""

    name: str  # "the array" (.npy) or "tensor 'latent'" (.safetensors), for messages
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # of its first value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_claim(shape: Any, itemsize: int, nbytes: int, what: str) -> tuple[int, ...]:
    """``shape`` (a header's claim) as a tuple, if it holds values filling exactly ``nbytes``."""
    if not isinstance(shape, (list, tuple)) or not all(map(_is_count, shape)):
        raise MediaError(f"{what}: shape {str(shape)[:80]} is not a list of sizes")
    claimed = math.prod(shape) * itemsize
    if claimed == 0:
        raise MediaError(f"{what}: shape {list(shape)} holds no values")
    if claimed != nbytes:
        raise MediaError(
            f"{what}: shape {list(shape)} of {itemsize}-byte values needs {claimed:,} bytes, "
            f"{nbytes:,} are there"
        )
    return tuple(shape)


def _npy_header(data: bytes) -> ArrayHeader:
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"format version {version} is not supported")
        shape, _, dtype = read_header(stream)
    except ValueError as error:
        raise MediaError(f"not a .npy array ({error})") from error
    if dtype.hasobject:
        raise MediaError("an object array, which only pickle can load", reason="unsafe_member")
    if dtype.kind != "f":
        raise MediaError(f"the array's dtype {dtype} is not a float dtype")
    offset = stream.tell()
    shape = _check_claim(shape, dtype.itemsize, len(data) - offset, "the array")
    return ArrayHeader("the array", shape, dtype, offset)


SafetensorsEntry = tuple[str, tuple[int, ...], int]  # (dtype, shape, offset of its first value)


def _safetensors_tensors(data: bytes) -> dict[str, SafetensorsEntry]:
    """Every tensor of a ``.safetensors`` member, checked against its bytes: a known dtype, and
    data offsets that tile the data exactly, each with the size its shape claims (what the
    safetensors library itself demands)."""
    if len(data) < 8:
        raise MediaError("not a .safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise MediaError(
            f"not a .safetensors file (it claims a {length:,}-byte header in {len(data):,} bytes)"
        )
    try:
        header = parse_json(data[8 : 8 + length], "its header")
    except InputError as error:
        raise MediaError(f"not a .safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise MediaError("not a .safetensors file (its header is not a JSON object)")
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or entry.get("dtype") not in _SAFETENSORS_ITEM_SIZES
            or not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets)))
        ):
            raise MediaError(f"tensor '{name}': not a tensor entry (a known dtype, two data_offsets)")
        entries.append((offsets[0], offsets[1], name, entry))
    start, end, tensors = 8 + length, 0, {}
    for begin, stop, name, entry in sorted(entries):
        if begin != end or stop < begin:
            raise MediaError(
                f"tensor '{name}': data_offsets [{begin}, {stop}] do not follow on at byte {end}"
            )
        if stop > len(data) - start:
            raise MediaError(
                f"tensor '{name}': data_offsets [{begin}, {stop}] pass the end of its {len(data) - start:,} data bytes"
            )
        itemsize = _SAFETENSORS_ITEM_SIZES[entry["dtype"]]
        shape = _check_claim(entry.get("shape"), itemsize, stop - begin, f"tensor '{name}'")
        tensors[name] = (entry["dtype"], shape, start + begin)
        end = stop
    if end != len(data) - start:
        raise MediaError(f"its tensors cover {end:,} of its {len(data) - start:,} data bytes")
    return tensors


def _safetensors_name(names: Sequence[str], tensor: str | None) -> str:
    if tensor is None:
        if len(names) != 1:
            raise MediaError(f"holds tensors {sorted(names)}: the segment must name one with 'tensor'")
        return names[0]
    if tensor not in names:
        raise MediaError(f"has no tensor '{tensor}' (tensors: {', '.join(sorted(names))})")
    return tensor


def array_header(data: bytes, suffix: str, tensor: str | None = None) -> ArrayHeader:
    """The float array of a ``.npy`` member, or of tensor ``tensor`` of a ``.safetensors`` member
    (its only one when None), from its header, checked against the member's bytes."""
    if suffix == "npy":
        return _npy_header(data)
    tensors = _safetensors_tensors(data)
    name = _safetensors_name(list(tensors), tensor)
    dtype, shape, offset = tensors[name]
    if dtype not in SAFETENSORS_FLOATS:
        raise MediaError(f"tensor '{name}': dtype {dtype} is not one of {', '.join(SAFETENSORS_FLOATS)}")
    return ArrayHeader(f"tensor '{name}'", shape, np.dtype(SAFETENSORS_FLOATS[dtype]), offset)


def array_shape(data: bytes, suffix: str, tensor: str | None = None) -> tuple[int, ...]:
    """The shape of a ``.npy`` or ``.safetensors`` member, from its header (see :func:`array_header`)."""
    return array_header(data, suffix, tensor).shape


def load_array(data: bytes, suffix: str, tensor: str | None = None) -> np.ndarray:
    """The array of a ``.npy`` (never unpickled) or ``.safetensors`` member, as float32; a
    ``non_finite`` :class:`MediaError` when it holds NaN or infinite values (as float32)."""
    header = array_header(data, suffix, tensor)
    try:
        if suffix == "npy":
            stored = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            count = math.prod(header.shape)
            stored = np.frombuffer(data, header.dtype, count, header.offset).reshape(header.shape)
        with np.errstate(over="ignore"):  # float64 beyond float32's range: infinite, counted below
            array = np.array(stored, dtype=np.float32)  # a copy: frombuffer's view is read-only
    except ValueError as error:
        raise MediaError(f"cannot load the array ({error})") from error
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise MediaError(
            f"{header.name} of shape {list(array.shape)} holds {bad:,} NaN or infinite values",
            reason="non_finite",
        )
    return array


def read_array_file(path: Path, what: str) -> np.ndarray:
    """A file of one array as float32: a ``.safetensors`` of one tensor or a ``.npy`` (never
    unpickled), as :func:`load_array` reads a member; ``what`` names it in the errors (ValueError,
    FileNotFoundError), which name ``path``."""
    suffix = path.suffix.lstrip(".")
    if suffix not in ("safetensors", "npy"):
        raise ValueError(f"{path}: {what} must be a .safetensors or .npy file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_array(path.read_bytes(), suffix)
    except MediaError as error:
        raise ValueError(f"{path}: {error}") from error
