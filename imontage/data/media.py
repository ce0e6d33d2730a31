"""Media members: header inspection (sizes, frame counts, shapes) and decoding.

Images go through Pillow, videos through PyAV, latents and text embeddings are ``.npy`` (loaded
with ``allow_pickle=False``) or ``.safetensors``. Each function raises :class:`MediaError` with
what went wrong; the caller adds the shard, key and member and picks the reason.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

from imontage.data.buckets import Size, fit_image, fit_pixels

# Pixel caps are ours (data.bad_data.max_pixels), checked on the header before decoding; Pillow's
# own decompression-bomb guard would stop larger images with a less useful error.
Image.MAX_IMAGE_PIXELS = None


class MediaError(Exception):
    """A member that cannot be inspected or decoded; ``unsafe`` when it would need pickle."""

    def __init__(self, message: str, unsafe: bool = False) -> None:
        super().__init__(message)
        self.unsafe = unsafe


# ---------------------------------------------------------------------------------------------
# images


def image_size(data: bytes) -> Size:
    """(height, width) from the image header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except Exception as error:  # Pillow raises several types for broken data
        raise MediaError(f"not a readable image ({error})") from error


def decode_image(data: bytes, size: Size) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB pixels, resized and centre-cropped to ``size``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free when the bucket is that much smaller.
            image.draft("RGB", (size[1], size[0]))
            rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB one
            return np.asarray(fit_image(rgb, size))
    except Exception as error:
        raise MediaError(f"cannot decode image ({error})") from error


# ---------------------------------------------------------------------------------------------
# videos


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    height: int
    width: int


def video_info(data: bytes) -> VideoInfo:
    """Frame count, rate and size from the container; frames are counted by demuxing when the
    container does not store the count (WebM), which reads packets but decodes nothing."""
    import av  # deferred: only video data needs PyAV

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate or Fraction(0)
            frames = int(stream.frames)
            if frames == 0:
                frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            return VideoInfo(frames, float(rate), int(stream.height), int(stream.width))
    except (IndexError, av.FFmpegError, ValueError) as error:
        raise MediaError(f"not a readable video ({error or 'no video stream'})") from error


def decode_video(data: bytes, indices: Sequence[int], size: Size) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 RGB: the frames at ``indices`` (ascending), each fitted to ``size``."""
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
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError("cannot decode video (no video stream)")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
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
        raise MediaError("an object array, which only pickle can load", unsafe=True)
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
            _npy_header(data)  # rejects object arrays with the unsafe flag
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
