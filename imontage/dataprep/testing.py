"""Small shard sets for tests and benchmarks: mixed images and videos, and every kind of bad data.

Everything is drawn from seeded RNGs, so the same arguments give the same shards.
"""

from __future__ import annotations

import io
import json
import math
import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imontage.data.shards import ShardWriter, iter_tar

# Sizes of the mixed set.
IMAGE_SIZES = ((32, 32), (32, 48), (48, 32), (64, 64), (40, 56), (24, 40))
VIDEO_SIZES = ((32, 32), (32, 48), (24, 40))
VIDEO_FRAMES = (5, 8, 9, 12)
IMAGE_BUCKETS = ((32, 32), (32, 48), (48, 32), (64, 64))
VIDEO_BUCKETS = ((32, 32), (32, 48))
FRAME_BUCKETS = (4, 8)


def mixed_buckets(scale: int = 1) -> dict[str, list]:
    """Buckets (as data.buckets takes them) that keep some sizes of a set written with ``scale``
    and resize the others."""
    return {
        "image": [[h * scale, w * scale] for h, w in IMAGE_BUCKETS],
        "video": [[h * scale, w * scale] for h, w in VIDEO_BUCKETS],
        "frames": list(FRAME_BUCKETS),
    }


MIXED_BUCKETS = mixed_buckets()


IMAGE_FORMATS = ("png", "jpg", "webp")
VIDEO_FORMATS = ("mp4", "webm")
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_VIDEO_CODECS = {"mp4": "libx264", "webm": "libvpx"}  # h264 and vp8: codecs the loader allows


def pattern(height: int, width: int, seed: int, frame: int = 0) -> np.ndarray:
    """``[H, W, 3]`` uint8: smooth colour gradients, moving with ``frame`` (compresses like photos, not noise)."""
    rng = np.random.default_rng(seed)
    fy, fx, phase = rng.uniform(0.05, 0.3, 3), rng.uniform(0.05, 0.3, 3), rng.uniform(0, 6.3, 3)
    y, x = np.mgrid[0:height, 0:width]
    channels = [np.sin(fy[c] * y + fx[c] * (x + 2 * frame) + phase[c]) for c in range(3)]
    return ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)


def image_bytes(height: int, width: int, fmt: str = "png", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(height, width, seed)).save(buffer, format=_PIL_FORMATS[fmt])
    return buffer.getvalue()


def video_bytes(
    frames: int,
    height: int,
    width: int,
    fmt: str = "mp4",
    fps: int = 8,
    seed: int = 0,
    codec: str | None = None,  # default: the format's usual one (h264, vp8)
) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec or _VIDEO_CODECS[fmt], rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern(height, width, seed, index), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def broken_png(height: int, width: int) -> bytes:
    """A PNG whose header reads fine but whose pixel data does not decode."""
    data = image_bytes(height, width, "png")
    start = data.index(b"IDAT") + 8
    return data[:start] + bytes(64) + data[start + 64 :]


def record(task: str, text: str, segments: list[dict[str, Any]]) -> bytes:
    return json.dumps({"task": task, "text": text, "segments": segments}).encode()


def mixed_sample(index: int, seed: int = 0, scale: int = 1) -> dict[str, bytes]:
    """An image task (1-2 conditions, one target) or a video task (a condition image, a target clip).

    Sizes are those of IMAGE_SIZES and VIDEO_SIZES times ``scale``.
    """
    rng = random.Random(seed * 1_000_003 + index)
    fmt = rng.choice(IMAGE_FORMATS)
    if index % 3 != 2:
        conditions = rng.randint(1, 2)
        sizes = [(h * scale, w * scale) for h, w in (rng.choice(IMAGE_SIZES) for _ in range(conditions + 1))]
        members = {
            f"{i}.{fmt}": image_bytes(*size, fmt, seed=rng.randrange(1 << 30)) for i, size in enumerate(sizes)
        }
        segments = [
            {"role": "condition" if i < conditions else "target", "kind": "image", "member": name}
            for i, name in enumerate(members)
        ]
        return {**members, "json": record("image", f"image sample {index}", segments)}
    size, frames, container = rng.choice(VIDEO_SIZES), rng.choice(VIDEO_FRAMES), rng.choice(VIDEO_FORMATS)
    size = (size[0] * scale, size[1] * scale)
    members = {
        f"0.{fmt}": image_bytes(*size, fmt, seed=rng.randrange(1 << 30)),
        f"1.{container}": video_bytes(frames, *size, container, seed=rng.randrange(1 << 30)),
    }
    segments = [
        {"role": "condition", "kind": "image", "member": f"0.{fmt}"},
        {"role": "target", "kind": "video", "member": f"1.{container}"},
    ]
    return {**members, "json": record("video", f"video sample {index}", segments)}


def write_mixed_shards(
    out: str | Path, sizes: Sequence[int], seed: int = 0, prefix: str = "mixed", scale: int = 1
) -> list[str]:
    """Shards of ``sizes[i]`` mixed samples each; keys are global sample numbers. Returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, index = [], 0
    for shard, size in enumerate(sizes):
        path = out / f"{prefix}-{shard:06d}.tar"
        with ShardWriter(path) as writer:
            for _ in range(size):
                writer.add_sample(f"{index:06d}", mixed_sample(index, seed, scale))
                index += 1
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------------
# bad data


def _image_sample(key: str, size: tuple[int, int] = (32, 32)) -> dict[str, bytes]:
    segments = [{"role": "target", "kind": "image", "member": "0.png"}]
    return {
        "0.png": image_bytes(*size, "png", seed=zlib.crc32(key.encode())),
        "json": record("image", f"sample {key}", segments),
    }


def _video_sample(members: dict[str, bytes]) -> dict[str, bytes]:
    segments = [{"role": "target", "kind": "video", "member": "0.mp4"}]
    return {**members, "json": record("video", "a clip", segments)}


BAD_LIMITS = {"max_pixels": 64 * 64, "max_video_frames": 12}  # the caps the bad set is planted against


def bad_samples() -> dict[str, dict[str, bytes]]:
    """One sample of each sample-level bad case, by the reason it is skipped for."""
    good = _image_sample("x")
    pickled = {
        "0.pth": b"\x80\x04K\x01.",
        "json": record("t", "", [{"role": "target", "kind": "latent", "member": "0.pth"}]),
    }
    return {
        "bad_json": {**good, "json": b'{"segments": [{"kind": "image", "member": "0.png",'},
        "missing_member": {"json": good["json"]},
        "unsafe_member": pickled,
        "undecodable_image": {**good, "0.png": broken_png(32, 32)},
        "undecodable_video": _video_sample({"0.mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(100)}),
        "too_many_pixels": _image_sample("big", (80, 80)),
        "too_many_frames": _video_sample({"0.mp4": video_bytes(20, 32, 32)}),
    }


def _truncate_inside(path: Path, key: str) -> None:
    """Cut the tar 100 bytes into the first member of sample ``key``."""
    with open(path, "rb") as stream:
        offset = next(member.offset for member in iter_tar(stream) if member.name.startswith(f"{key}."))
    path.write_bytes(path.read_bytes()[: offset + 512 + 100])


def write_bad_shards(out: str | Path) -> dict[str, int]:
    """Five shards holding good samples and one of each bad case; returns the planted count per reason.

    Good samples come first and last in each readable shard, so a loader reading in stored order
    meets every bad sample before its last good one.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bad = bad_samples()
    layout: list[list[tuple[str, dict[str, bytes]]]] = [
        [("a0", _image_sample("a0")), ("a1", bad["bad_json"]), ("a2", bad["missing_member"]), ("a3", _image_sample("a3"))],
        [("b0", _image_sample("b0")), ("b1", bad["unsafe_member"]), ("b2", bad["undecodable_image"]),
         ("b3", bad["undecodable_video"]), ("b4", _image_sample("b4"))],
        [("c0", _image_sample("c0")), ("c1", bad["too_many_pixels"]), ("c2", bad["too_many_frames"]),
         ("c0", _image_sample("c0-again")), ("c3", _image_sample("c3"))],
    ]  # fmt: skip
    for number, samples in enumerate(layout):
        with ShardWriter(out / f"bad-{number:06d}.tar") as writer:
            for key, members in samples:
                writer.add_sample(key, members)
    with ShardWriter(out / "bad-000003.tar") as writer:  # truncated inside its third sample
        for key in ("d0", "d1", "d2"):
            writer.add_sample(key, _image_sample(key, (48, 48)))
    _truncate_inside(out / "bad-000003.tar", "d2")
    (out / "bad-000004.tar").write_bytes(b"<html>404 Not Found</html>\n" * 40)  # a failed download
    return {
        "bad_json": 1, "missing_member": 1, "unsafe_member": 1, "undecodable": 2, "duplicate_key": 1,
        "too_many_pixels": 1, "too_many_frames": 1, "truncated_tar": 1, "not_a_tar": 1,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# hostile data: members whose bytes are another format than their extension names


def eps_bytes() -> bytes:
    """A one-line EPS: Pillow's EPS plugin would run Ghostscript to load it."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def _pillow_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(8, 8, 0)).save(buffer, format=fmt)
    return buffer.getvalue()


# Payloads that other decoders (Ghostscript, ImageMagick, librsvg, FFmpeg demuxers) would read.
HOSTILE_IMAGES = {
    "eps": eps_bytes,
    "tiff": lambda: _pillow_bytes("TIFF"),
    "gif": lambda: _pillow_bytes("GIF"),
    "pdf": lambda: _pillow_bytes("PDF"),
    "svg": lambda: (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><image href="file:///etc/passwd"/></svg>'
    ),
}
HOSTILE_VIDEOS = {
    "ffconcat": lambda: b"ffconcat version 1.0\nfile 'other.mp4'\n",
    "m3u8": lambda: b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
    "webm": lambda: video_bytes(4, 16, 16, "webm"),  # a valid video, of another container
    "mpeg4": lambda: video_bytes(4, 16, 16, "mp4", codec="mpeg4"),  # mp4, of a codec not allowed
}


def hostile_samples() -> dict[str, dict[str, bytes]]:
    """Samples whose one member is named as an accepted format but holds another, by key
    (``<payload>-<extension>``): every hostile image as png, jpg and webp, and playlists as mp4."""
    samples = {}
    for payload, make in HOSTILE_IMAGES.items():
        for suffix in IMAGE_FORMATS:
            segments = [{"role": "target", "kind": "image", "member": f"0.{suffix}"}]
            samples[f"{payload}-{suffix}"] = {
                f"0.{suffix}": make(),
                "json": record("image", payload, segments),
            }
    for payload, make in HOSTILE_VIDEOS.items():
        samples[f"{payload}-mp4"] = _video_sample({"0.mp4": make()})
    return samples


def write_hostile_shards(out: str | Path) -> list[str]:
    """One shard of the hostile samples between two good ones (keys ``good0``, ``good1``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "hostile-000000.tar"
    with ShardWriter(path) as writer:
        writer.add_sample("good0", _image_sample("good0"))
        for key, members in hostile_samples().items():
            writer.add_sample(key, members)
        writer.add_sample("good1", _image_sample("good1"))
    return [str(path)]


# ---------------------------------------------------------------------------------------------
# latent samples; members whose headers claim sizes their bytes do not hold; NaN and Inf

LATENT_SHAPE = (4, 1, 4, 4)  # [C, T, H, W] of each latent segment of latent_sample
TEXT_SHAPE = (5, 16)  # [L, E] of its text embedding
HUGE = (4, 64, 4096, 4096)  # a latent of 4 Gi values: 16 GiB as float32, 268 M tokens at (1, 2, 2)


def array_bytes(array: np.ndarray, fmt: str = "safetensors", tensor: str = "x") -> bytes:
    """``array`` as a ``.npy`` member, or a ``.safetensors`` one holding it as ``tensor``."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()
    from safetensors.numpy import save

    return save({tensor: array})


def npy_claiming(shape: Sequence[int], payload: bytes = bytes(100), descr: str = "<f4") -> bytes:
    """A ``.npy`` whose header claims ``shape`` of ``descr`` values, followed by ``payload`` only."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def safetensors_claiming(
    header: dict[str, Any] | bytes, payload: bytes = bytes(100), header_length: int | None = None
) -> bytes:
    """A ``.safetensors`` of ``header`` (name -> dtype, shape, data_offsets; or its bytes) followed by
    ``payload`` only; ``header_length``: the length it claims for its header instead of the true one."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return length.to_bytes(8, "little") + text + payload


def png_claiming(height: int, width: int) -> bytes:
    """A PNG whose IHDR chunk claims ``height`` x ``width`` RGB pixels, with the pixel data of a few."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    size = height.to_bytes(4, "big") + width.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    pixels = zlib.compress(bytes(64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", size) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def tar_member_claiming(name: str, size: int) -> bytes:
    """A tar header of member ``name`` claiming ``size`` bytes of data, which do not follow."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)


def latent_segments(
    condition: str = "0.safetensors", target: str = "1.safetensors", condition_latent: str | None = None
) -> list[dict[str, Any]]:
    """The json segments of a latent sample: a condition and a target latent (with its condition latent)."""
    extra = {} if condition_latent is None else {"condition_latent": condition_latent}
    return [{"role": "condition", "kind": "latent", "member": condition},
            {"role": "target", "kind": "latent", "member": target, **extra}]  # fmt: skip


def latent_sample(seed: int, members: dict[str, bytes] | None = None, **fields: Any) -> dict[str, bytes]:
    """A latent sample: condition ``0.safetensors`` and target ``1.safetensors`` (LATENT_SHAPE) and
    text embedding ``text.safetensors`` (TEXT_SHAPE); ``members`` replace or add members, ``fields``
    set json fields (``segments``: :func:`latent_segments`)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "0.safetensors": rng.standard_normal(LATENT_SHAPE, dtype=np.float32),
        "1.safetensors": rng.standard_normal(LATENT_SHAPE, dtype=np.float32),
        "text.safetensors": rng.standard_normal(TEXT_SHAPE, dtype=np.float32),
    }
    record = {"task": "latent", "text": f"latent sample {seed}", "text_embedding": "text.safetensors",
              "segments": latent_segments(), **fields}  # fmt: skip
    out = {name: array_bytes(array) for name, array in arrays.items()}
    return {**out, **(members or {}), "json": json.dumps(record).encode()}


def size_claim_samples() -> dict[str, dict[str, bytes]]:
    """Latent samples each holding one member whose header claims far more than its bytes hold,
    by key. Each is ``undecodable`` from its header alone, naming the member."""
    huge = {"dtype": "F32", "shape": list(HUGE), "data_offsets": [0, 4 * math.prod(HUGE)]}
    past_end = {"dtype": "F32", "shape": list(LATENT_SHAPE), "data_offsets": [0, 1 << 40]}
    npy_target, condition = latent_segments(target="1.npy"), latent_segments(condition_latent="c.safetensors")
    return {
        "npy-latent": latent_sample(1, {"1.npy": npy_claiming(HUGE)}, segments=npy_target),
        "npy-negative-shape": latent_sample(2, {"1.npy": npy_claiming((-4, -1, 64, 64))}, segments=npy_target),
        "safetensors-latent": latent_sample(3, {"1.safetensors": safetensors_claiming({"x": huge})}),
        "safetensors-header-length": latent_sample(4, {"1.safetensors": safetensors_claiming({}, header_length=1 << 62)}),
        "safetensors-offsets": latent_sample(5, {"1.safetensors": safetensors_claiming({"x": past_end})}),
        "safetensors-deep-header": latent_sample(6, {"1.safetensors": safetensors_claiming(b"[" * 100_000 + b"]" * 100_000)}),
        "text-rows": latent_sample(7, {"text.npy": npy_claiming((10**9, 16))}, text_embedding="text.npy"),
        "pooled-text": latent_sample(8, {"pooled.npy": npy_claiming((1 << 40,))}, pooled_text="pooled.npy"),
        "image-embeds": latent_sample(9, {"image.npy": npy_claiming((1 << 20, 1 << 20))}, image_embeds="image.npy"),
        "condition-latent": latent_sample(10, {"c.safetensors": safetensors_claiming({"x": huge})}, segments=condition),
    }  # fmt: skip


def non_finite_samples() -> dict[str, dict[str, bytes]]:
    """Latent samples with NaN or Inf in one array member, by key: the latents and the text
    embedding every latent model reads, and members only some models read (pooled text, condition
    latents)."""

    def with_value(shape: Sequence[int], value: float, dtype: Any = np.float32) -> np.ndarray:
        array = np.zeros(shape, dtype)
        array.flat[1] = value
        return array

    npy_condition, condition = (
        latent_segments(condition="0.npy"),
        latent_segments(condition_latent="c.safetensors"),
    )
    return {
        "nan-latent": latent_sample(21, {"1.safetensors": array_bytes(with_value(LATENT_SHAPE, np.nan))}),
        "inf-latent-npy": latent_sample(22, {"0.npy": array_bytes(with_value(LATENT_SHAPE, np.inf), "npy")}, segments=npy_condition),
        "nan-text": latent_sample(23, {"text.safetensors": array_bytes(with_value(TEXT_SHAPE, np.nan))}),
        "inf-text-float16": latent_sample(24, {"text.safetensors": array_bytes(with_value(TEXT_SHAPE, -np.inf, np.float16))}),
        # finite as float64, infinite as the float32 that training reads
        "overflow-text": latent_sample(25, {"text.safetensors": array_bytes(with_value(TEXT_SHAPE, 1e300, np.float64))}),
        "nan-pooled": latent_sample(26, {"pooled.npy": array_bytes(with_value((8,), np.nan), "npy")}, pooled_text="pooled.npy"),
        "nan-condition": latent_sample(27, {"c.safetensors": array_bytes(with_value(LATENT_SHAPE, np.nan))}, segments=condition),
    }  # fmt: skip
