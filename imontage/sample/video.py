"""SAR videos of latent models: keyframes through the VAE, latent frames back to pixels as they come, MP4.

A latent model's SAR video (:mod:`imontage.sample.sar`) is generated in latent frames. Three pieces
turn it into a video without holding it whole:

- :func:`encode_keyframe`: a user's keyframe image (or clip) through the VAE exactly as
  ``tools/encode_shards.py`` encodes an image (or video) segment of a shard, alone (so an image is
  a "first-frame" latent, as training saw it), the posterior's mode; its pixel frame ``f`` goes to
  latent frame ``ceil(f / temporal)``, as encode_shards maps an ``anchor``.
- :class:`StreamingDecoder`: the causal video VAE's decoder run latent frame by latent frame with its
  feature cache carried between calls, so that a segment's new latent frames are decoded as soon as
  they exist and the pixels equal decoding the whole latent video at once (up to float rounding: the
  1x1x1 post-quant convolution over fewer frames may round differently); the cache holds a few
  frames of features per causal convolution, whatever the length.
- :class:`Mp4Writer`: frames appended to an H.264 MP4 through PyAV (FFmpeg's libraries, in process;
  no program is run), written under a temporary name and renamed when complete.

:func:`stream_video` chains them behind :func:`~imontage.sample.sar.iter_sar`: what it holds between
segments is the carried context, the decoder's cache and the encoder's state, so the peak memory of
a long video is that of one window.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from imontage.checkpoint.components import check_component_folder
from imontage.data.media import read_array_file
from imontage.dataprep.encode import VAES, VideoVAE, vae_class_name
from imontage.sample.sar import Keyframe, SarSegment

# The VAE classes whose decoder is causal frame by frame with a feature cache (diffusers' ``_decode``
# loop): only those decode a video in pieces to the pixels of decoding it whole.
STREAMING_VAES = tuple(name for name, vae in VAES.items() if vae.streams)
DEFAULT_FPS = 16  # Wan's pipelines export their videos at 16 frames a second


def check_vae_folder(folder: str | Path) -> None:
    """A VAE folder read as untrusted input before a byte of its weights is: a known VAE class whose
    config describes exactly the folder's safetensors tensors (checkpoint.components.check_component_folder)."""
    check_component_folder(folder, vae_class_name(folder))


def latent_frame(vae: VideoVAE, pixel_frame: int) -> int:
    """The latent frame that holds pixel frame ``pixel_frame``: ``ceil(f / temporal)`` (frame 0 is
    encoded alone, then ``temporal`` frames per latent frame), as encode_shards maps anchors."""
    return -(-pixel_frame // vae.temporal)


def pixel_frames(vae: VideoVAE, latent_frames: int) -> int:
    """Pixel frames a video of ``latent_frames`` latent frames decodes to: ``1 + temporal·(T' − 1)``."""
    return 1 + vae.temporal * (latent_frames - 1) if latent_frames else 0


def encode_keyframe(vae: VideoVAE, keyframe: Keyframe, cell: tuple[int, int], where: str) -> Keyframe:
    """A pixel keyframe ``[3, T, H, W]`` at pixel frame ``keyframe.frame`` as a latent keyframe
    ``[C, T', H', W']`` at its latent frame.

    The pixels are encoded alone, as encode_shards encodes an image or video segment (``vae.fit``,
    then ``vae.encode``, the posterior's mode): nothing is cropped or dropped here, so a keyframe
    whose sides are not multiples of ``cell`` (:func:`keyframe_cell`) or a clip whose frame count is
    not ``1 + k·temporal`` is refused, naming ``where``.
    """
    _, frames, height, width = keyframe.data.shape
    if height % cell[0] or width % cell[1]:
        raise ValueError(
            f"{where}: {height}x{width} pixels; this model's frames need a height that is a multiple of "
            f"{cell[0]} and a width of {cell[1]} (the VAE's {vae.spatial}-pixel cell times the model's patch)"
        )
    if (frames - 1) % vae.temporal:
        raise ValueError(
            f"{where}: a clip of {frames} frames; the VAE encodes 1 + {vae.temporal}·k frames whole "
            f"(1, {1 + vae.temporal}, {1 + 2 * vae.temporal}, ...)"
        )
    pixels = vae.fit(keyframe.data)
    assert pixels.shape == keyframe.data.shape  # the checks above leave fit nothing to trim
    return Keyframe(latent_frame(vae, keyframe.frame), vae.encode(pixels, mode=True).cpu())


def read_text_embedding(path: Path, width: int) -> torch.Tensor:
    """Precomputed text ``[L, width]`` from a ``.safetensors`` file of one tensor (a latent shard's
    ``text.safetensors`` member is one) or a ``.npy`` array (never unpickled)."""
    array = read_array_file(path, "a text embedding")
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(
            f"{path}: a text embedding of shape {list(array.shape)}, the model takes [L, {width}]"
        )
    return torch.from_numpy(array)


class StreamingDecoder:
    """Decodes a latent video piece by piece to the pixels :meth:`VideoVAE.decode` gives it whole.

    The VAE's decoder is causal: diffusers decodes latent frame ``i`` alone, with a cache of the last
    frames each causal convolution saw, frame 0 marked as the first chunk. Here that loop runs over
    the frames of each :meth:`push`, the cache kept between pushes, so the first push gives
    ``1 + temporal·(n − 1)`` pixel frames and each later one ``temporal·n``.
    """

    def __init__(self, vae: VideoVAE) -> None:
        if vae.class_name not in STREAMING_VAES:
            raise ValueError(
                f"{vae.class_name} does not decode a video frame by frame; SAR videos stream through "
                f"{', '.join(STREAMING_VAES)}"
            )
        if vae.tiling:
            raise ValueError("a tiled VAE decodes each tile over the whole video: SAR streams untiled")
        model = vae.vae
        module = importlib.import_module(type(model).__module__)
        causal = getattr(module, "WanCausalConv3d", None)
        if causal is None or not all(hasattr(model, name) for name in ("decoder", "post_quant_conv")):
            raise ValueError(f"this diffusers' {vae.class_name} lacks the causal decoder SAR streams through")
        self.vae = vae
        self._unpatchify = getattr(module, "unpatchify", None)
        self._patch = getattr(model.config, "patch_size", None)
        self._cache: list[Any] = [None] * sum(isinstance(m, causal) for m in model.decoder.modules())
        self.frames = 0  # latent frames decoded so far

    @torch.no_grad()
    def push(self, stored: torch.Tensor) -> torch.Tensor:
        """Pixels ``[3, n', H, W]`` in [-1, 1] (float32, CPU) of the next latent frames ``[C, n, H', W']``
        (normalised, as the model generates them)."""
        vae = self.vae
        latent = vae.norm.invert(stored.float().to(vae.device)).to(vae.dtype).unsqueeze(0)  # [1, C, n, h, w]
        latent = vae.vae.post_quant_conv(latent)  # a 1x1x1 convolution: frame by frame
        out = []
        for i in range(latent.shape[2]):
            frame = vae.vae.decoder(
                latent[:, :, i : i + 1], feat_cache=self._cache, feat_idx=[0], first_chunk=self.frames == 0
            )
            if self._patch is not None:
                assert self._unpatchify is not None
                frame = self._unpatchify(frame, patch_size=self._patch)
            out.append(frame[0].float().clamp(-1, 1).cpu())
            self.frames += 1
        return torch.cat(out, dim=1)


class Mp4Writer:
    """An H.264 MP4 (yuv420p) of frames ``[3, T, H, W]`` in [-1, 1], appended as they come.

    Written as ``<name>.partial.mp4`` and renamed to ``path`` when closed without an error (a failed
    run leaves no MP4 that looks complete). H.264 in 4:2:0 needs even sides, checked here.
    """

    def __init__(self, path: Path, height: int, width: int, fps: int = 16) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"{path}: an H.264 MP4 needs even sides, the video is {height}x{width}")
        if fps < 1:
            raise ValueError(f"{path}: fps must be at least 1, got {fps}")
        import av  # deferred: only SAR videos need PyAV here

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(f"{self.path.stem}.partial.mp4")
        self.container = av.open(os.fspath(self.partial), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.size = (height, width)
        self.frames = 0
        self._frame = av.VideoFrame

    def write(self, pixels: torch.Tensor) -> None:
        if tuple(pixels.shape[2:]) != self.size or pixels.shape[0] != 3:
            raise ValueError(f"{self.path}: frames {tuple(pixels.shape)}, the video is [3, T, {self.size}]")
        frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
        for index in range(frames.shape[1]):
            rgb = frames[:, index].permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
            self.container.mux(self.stream.encode(self._frame.from_ndarray(rgb, format="rgb24")))
            self.frames += 1

    def close(self, complete: bool = True) -> None:
        try:
            if complete:
                self.container.mux(self.stream.encode())  # flush the encoder
        finally:
            self.container.close()
        if complete:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close(complete=kind is None)


def stream_video(
    segments: Iterable[tuple[SarSegment, torch.Tensor]],
    decoder: StreamingDecoder | None,
    writer: Mp4Writer | None,
) -> Iterator[tuple[SarSegment, torch.Tensor]]:
    """Each segment of :func:`~imontage.sample.sar.iter_sar` with its new frames in pixels ``[3, n, H, W]``
    (decoded by ``decoder``; without one, the model's frames are pixels already), each appended to
    ``writer`` first. Nothing is kept from one segment to the next but the decoder's cache."""
    for segment, frames in segments:
        pixels = frames if decoder is None else decoder.push(frames)
        del frames
        if writer is not None:
            writer.write(pixels)
        yield segment, pixels
        del pixels


def keyframe_cell(vae: VideoVAE, patch: tuple[int, int, int]) -> tuple[int, int]:
    """(height, width) in pixels of one model token: the VAE's cell times the model's spatial patch."""
    return vae.spatial * patch[1], vae.spatial * patch[2]


def pixel_span(vae: VideoVAE, first: int, last: int) -> tuple[int, int]:
    """The pixel frames ``[lo, hi)`` of a clip encoded from its frame 0 that its latent frames
    ``[first, last)`` hold: latent frame 0 is pixel frame 0, latent frame j ≥ 1 pixel frames
    ``temporal·(j − 1) + 1 .. temporal·j``."""
    return (0 if first == 0 else pixel_frames(vae, first), pixel_frames(vae, last))
