"""Resolution and frame buckets: which size a sample is trained at, and how it gets there.

A visual segment goes to the bucket nearest its aspect ratio (then nearest its area), is resized
to cover the bucket and centre-cropped: no random crop, so decoding needs no RNG and a resumed
run decodes exactly what an uninterrupted one did. Videos keep the first frames of their sampled
frames that fill the largest frame bucket not above their count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (height, width)
RESAMPLE = Image.Resampling.BICUBIC


def nearest_bucket(height: int, width: int, buckets: Sequence[Size]) -> Size:
    """The bucket closest in aspect ratio, then in area (log scale); the first one on a tie."""

    def distance(bucket: Size) -> tuple[float, float]:
        bucket_h, bucket_w = bucket
        aspect = abs(math.log((bucket_w / bucket_h) / (width / height)))
        area = abs(math.log((bucket_w * bucket_h) / (width * height)))
        return round(aspect, 9), round(area, 9)  # rounded: equal ratios must tie exactly

    return min(buckets, key=distance)


def target_size(height: int, width: int, buckets: Sequence[Size]) -> Size:
    """The size a segment is trained at: its bucket, or its own size when there are no buckets."""
    return nearest_bucket(height, width, buckets) if buckets else (height, width)


def fit_image(image: Image.Image, size: Size) -> Image.Image:
    """Resize ``image`` to cover ``size`` and centre-crop it, in one resampling pass."""
    height, width = size
    if image.size == (width, height):
        return image
    scale = max(height / image.height, width / image.width)
    crop_w, crop_h = width / scale, height / scale  # the source box that maps onto the bucket
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    return image.resize((width, height), RESAMPLE, box=(left, top, left + crop_w, top + crop_h))


def fit_pixels(pixels: np.ndarray, size: Size) -> np.ndarray:
    """:func:`fit_image` for ``[H, W, 3]`` uint8 pixels; pixels already of ``size`` come back as they are."""
    if pixels.shape[:2] == tuple(size):
        return pixels
    return np.asarray(fit_image(Image.fromarray(pixels), size))


def sample_frame_indices(
    num_frames: int, source_fps: float, sampling: str, stride: int, fps: float, max_frames: int
) -> list[int]:
    """Frame indices to decode: every ``stride``-th frame, or frames ``1/fps`` seconds apart; at most ``max_frames``."""
    if sampling == "stride":
        return list(range(0, num_frames, stride)[:max_frames])  # the range sliced: no list of every frame
    if sampling == "fps":
        step = source_fps / fps  # source frames per sampled frame
        # Compared before dividing: a frame rate from a header can be small enough to overflow it.
        reach = max_frames if num_frames - 1 >= step * max_frames else math.floor((num_frames - 1) / step) + 1
        count = reach if num_frames else 0
        return [round(k * step) for k in range(count)]
    raise ValueError(f"unknown frame sampling '{sampling}' (stride, fps)")


def frame_bucket(num_sampled: int, buckets: Sequence[int], multiple: int) -> int:
    """Frames a video keeps: the largest bucket <= ``num_sampled``; without buckets, a multiple of ``multiple``.

    0 when no bucket fits (the video is too short to train on).
    """
    if buckets:
        return max((b for b in buckets if b <= num_sampled), default=0)
    return num_sampled - num_sampled % multiple
