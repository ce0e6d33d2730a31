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
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image

from imontage.data.buckets import Size, fit_image, fit_pixels

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


def decode_image(data: bytes, size: Size, suffix: str | None = None) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB pixels of an image of the format ``suffix`` names, resized and
    centre-cropped to ``size``."""
    name = _pillow_format(data, suffix)
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


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype]:
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
    return tuple(shape), dtype


def _safetensors_header(data: bytes) -> dict[str, dict]:
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
    except (struct.error, ValueError) as error:
        raise MediaError(f"not a .safetensors file ({error})") from error
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


def _safetensors_name(header: dict[str, dict], tensor: str | None) -> str:
    if tensor is None:
        if len(header) != 1:
            raise MediaError(f"holds tensors {sorted(header)}: the segment must name one with 'tensor'")
        return next(iter(header))
    if tensor not in header:
        raise MediaError(f"has no tensor '{tensor}' (tensors: {', '.join(sorted(header))})")
    return tensor


def array_shape(data: bytes, suffix: str, tensor: str | None = None) -> tuple[int, ...]:
    """The shape of a ``.npy`` or ``.safetensors`` member, from its header."""
    if suffix == "npy":
        return _npy_header(data)[0]
    header = _safetensors_header(data)
    return tuple(int(n) for n in header[_safetensors_name(header, tensor)]["shape"])


def load_array(data: bytes, suffix: str, tensor: str | None = None) -> np.ndarray:
    """The array of a ``.npy`` (never unpickled) or ``.safetensors`` member, as float32."""
    try:
        if suffix == "npy":
            _npy_header(data)  # rejects object arrays as unsafe_member
            array = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            from safetensors.numpy import load

            arrays = load(data)
            array = arrays[_safetensors_name({name: {} for name in arrays}, tensor)]
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(f"cannot load the array ({error})") from error
    return np.asarray(array, dtype=np.float32)
