"""Hostile members: bytes of another format than the extension names never reach another decoder.

Left to sniff, Pillow hands an EPS named ``0.png`` to Ghostscript and FFmpeg opens a playlist
named ``.mp4`` with a demuxer that reads further files. Every program Pillow or FFmpeg could run
is replaced on PATH by one that leaves a marker file; no test here may leave one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image
from test_data_tools import inspect_shards, make_shards

from imontage.config.schema import BadDataConfig, DataConfig
from imontage.data import build_loader, media
from imontage.data.decode import DecodeOptions, decode_item, inspect_sample, plan_item
from imontage.data.loader import StreamLoader
from imontage.data.problems import DataError
from imontage.data.shards import RawSample
from imontage.dataprep.testing import (
    eps_bytes,
    hostile_samples,
    image_bytes,
    pattern,
    record,
    video_bytes,
    write_hostile_shards,
)
from imontage.models.common.sequence import PackingSpec

SPEC = PackingSpec(in_channels=3, patch_size=(1, 4, 4), max_text_len=32, layout="video3d")
# Ghostscript (EPS), djpeg (JpegImagePlugin.load_djpeg), netpbm (GIF saving), viewers and
# clipboard tools (ImageShow, ImageGrab), ImageMagick, librsvg, poppler and FFmpeg's own tools.
PROGRAMS = (
    "gs", "gsc", "gswin32c", "gswin64c", "djpeg", "cjpeg", "ppmquant", "ppmtogif", "convert",
    "magick", "identify", "rsvg-convert", "inkscape", "pdftoppm", "ffmpeg", "ffprobe", "xdg-open",
    "display", "gm", "eog", "xv", "xclip", "wl-paste",
)  # fmt: skip
HOSTILE = len(hostile_samples())


@pytest.fixture
def marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that each fake program on PATH writes its name into when it runs."""
    bin_dir, marks = tmp_path / "bin", tmp_path / "marks"
    bin_dir.mkdir()
    marks.mkdir()
    for name in PROGRAMS:
        program = bin_dir / name
        program.write_text(f'#!/bin/sh\necho "$@" > "{marks}/{name}"\n')
        program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # Pillow looks Ghostscript up once per process and keeps the answer.
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None)
    return marks


def ran(marks: Path) -> list[str]:
    return sorted(path.name for path in marks.iterdir())


@pytest.fixture(scope="module")
def hostile_shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_hostile_shards(tmp_path_factory.mktemp("hostile"))[0]


def test_the_markers_catch_an_unrestricted_pillow(marks: Path) -> None:
    """Without the restriction, opening and loading the EPS bytes runs the (fake) Ghostscript."""
    with contextlib.suppress(Exception), Image.open(io.BytesIO(eps_bytes())) as image:
        image.load()
    assert "gs" in ran(marks)


def test_each_hostile_member_is_a_format_mismatch_naming_shard_key_and_member(marks: Path) -> None:
    for key, members in hostile_samples().items():
        member = next(name for name in members if name != "json")
        with pytest.raises(DataError) as caught:
            inspect_sample(RawSample(key, "s.tar", members, 0, 0))
        assert (caught.value.reason, caught.value.shard, caught.value.key) == (
            "format_mismatch",
            "s.tar",
            key,
        )
        assert f"shard s.tar, sample '{key}': format_mismatch: member '{member}': " in str(caught.value)
        # decode_item (what --validate and the loader run) stops at the same check
        with pytest.raises(DataError, match="format_mismatch"):
            decode_item(RawSample(key, "s.tar", members, 0, 0), DecodeOptions())
    assert ran(marks) == []


def _config(shard: str, **bad: object) -> DataConfig:
    return DataConfig(shards=shard, batch_size=1, shuffle_buffer=0, bad_data=BadDataConfig(**bad))  # type: ignore[arg-type]


def test_skip_mode_counts_each_hostile_member_once(hostile_shard: str, marks: Path) -> None:
    loader = build_loader(_config(hostile_shard, skip_budget=HOSTILE / (HOSTILE + 2)), SPEC)
    assert isinstance(loader, StreamLoader) and loader.batches_in_epoch(0) == 2
    keys = [key for _ in range(2) for _, key in (next(loader), loader.last)[1].keys]  # type: ignore[union-attr]
    assert keys == ["good0", "good1"]
    assert loader.stats().skipped_by_reason() == {"format_mismatch": HOSTILE}
    assert ran(marks) == []


def test_strict_mode_names_the_first_hostile_member(hostile_shard: str, marks: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"shard \S+/hostile-000000\.tar, sample 'eps-png': format_mismatch: member '0\.png': the bytes are not PNG",
    ):
        build_loader(_config(hostile_shard, strict=True), SPEC)
    assert ran(marks) == []


def test_inspect_shards_validate_reports_each_hostile_member(
    hostile_shard: str, marks: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    assert inspect_shards.main([hostile_shard, "--validate", "--no-progress", "--json", str(report)]) == 1
    problems = json.loads(report.read_text())["problems"][hostile_shard]
    assert sorted((key, reason) for key, reason, _ in problems) == sorted(
        (key, "format_mismatch") for key in hostile_samples()
    )
    assert ran(marks) == []


def test_make_shards_refuses_a_hostile_file(
    marks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = hostile_samples()
    for key, kind, path in (
        ("eps-png", "image", "a.png"),
        ("m3u8-mp4", "video", "b.mp4"),
        ("mpeg4-mp4", "video", "c.mp4"),
    ):
        (tmp_path / path).write_bytes(samples[key][f"0.{path[2:]}"])
        manifest = tmp_path / f"{key}.jsonl"
        manifest.write_text(json.dumps({"segments": [{"role": "target", "kind": kind, "path": path}]}) + "\n")
        assert make_shards.main([str(manifest), "--out", str(tmp_path / key), "--no-progress"]) == 2
        assert f"{manifest}:1, segment 0: {path}: format_mismatch: " in capsys.readouterr().err
        assert not list((tmp_path / key).glob("*.tar"))
    assert ran(marks) == []


def test_no_protocol_is_allowed_to_a_demuxer(tmp_path: Path) -> None:
    """What the bytes name is never opened: a concat list (forced, with its path check off, so
    only the protocol limit stands) reads the file it names, and with the limit it cannot."""
    import av

    other = tmp_path / "other.mp4"
    other.write_bytes(video_bytes(3, 16, 16, "mp4"))
    playlist = f"ffconcat version 1.0\nfile '{other}'\n".encode()
    with av.open(io.BytesIO(playlist), format="concat", container_options={"safe": "0"}) as container:
        assert len(list(container.decode(video=0))) == 3  # type: ignore[union-attr]
    with pytest.raises(av.FFmpegError):
        av.open(io.BytesIO(playlist), format="concat", container_options={"safe": "0", **media.NO_PROTOCOLS})


# ---------------------------------------------------------------------------------------------
# caps from headers, before any pixel is decoded


def _webp(kind: str, height: int, width: int) -> bytes:
    """A WebP of each RIFF layout: lossy (VP8), lossless (VP8L), extended (VP8X, by its EXIF)."""
    buffer = io.BytesIO()
    options = {"lossless": kind == "VP8L", **({"exif": b"Exif\x00\x00MM\x00*"} if kind == "VP8X" else {})}
    Image.fromarray(pattern(height, width, 0)).save(buffer, format="WEBP", **options)
    data = buffer.getvalue()
    assert data[12:16] == kind.ljust(4).encode()
    return data


@pytest.mark.parametrize("kind", ["VP8", "VP8L", "VP8X"])
def test_the_webp_header_size_is_pillows(kind: str) -> None:
    data = _webp(kind, 37, 53)
    with Image.open(io.BytesIO(data)) as image:
        assert media.image_size(data, "webp") == (image.height, image.width) == (37, 53)


def _raw(member: str, data: bytes, kind: str) -> RawSample:
    members = {member: data, "json": record(kind, "", [{"role": "target", "kind": kind, "member": member}])}
    return RawSample("big", "s.tar", members, 0, 0)


@pytest.mark.parametrize(
    "member, make",
    [
        ("0.webp", lambda: _webp("VP8X", 96, 96)),
        ("0.mp4", lambda: video_bytes(4, 96, 96, "mp4")),
        ("0.webm", lambda: video_bytes(4, 96, 96, "webm")),
    ],
)
def test_a_member_over_the_pixel_cap_is_skipped_before_its_decoder_opens(
    member: str, make, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _raw(member, make(), "image" if member.endswith("webp") else "video")

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decoder was opened")

    monkeypatch.setattr(media.Image, "open", no_decoding)  # Pillow allocates a WebP canvas on open
    monkeypatch.setattr(media, "decode_video", no_decoding)
    options = DecodeOptions(max_pixels=64 * 64)
    _, facts = inspect_sample(raw)
    assert facts.segments[0].height * facts.segments[0].width == 96 * 96
    with pytest.raises(DataError, match=r"sample 'big': too_many_pixels: \S+ of 96x96 pixels"):
        plan_item(facts, options, None, raw.url, raw.key)
    with pytest.raises(DataError, match="too_many_pixels"):
        decode_item(raw, options)


def test_the_video_decoder_refuses_frames_over_the_cap_whatever_the_header_says() -> None:
    """The backstop for a bitstream larger than its container says: the decoder's own cap."""
    data = video_bytes(2, 32, 32, "mp4")
    assert media.decode_video(data, "mp4", [0], (16, 16), max_pixels=32 * 32).shape == (1, 16, 16, 3)
    with pytest.raises(media.MediaError, match="cannot decode video") as caught:
        media.decode_video(data, "mp4", [0], (16, 16), max_pixels=16)
    assert caught.value.reason == "undecodable"


@pytest.mark.parametrize(
    "fmt, codec",
    [
        ("mp4", "libx264"),
        ("mp4", "libx265"),
        ("mp4", "libsvtav1"),
        ("webm", "libvpx"),
        ("webm", "libvpx-vp9"),
    ],
)
def test_every_allowed_codec_decodes(fmt: str, codec: str) -> None:
    data = video_bytes(3, 64, 64, fmt, codec=codec)
    info = media.video_info(data, fmt)
    assert (info.frames, info.height, info.width) == (3, 64, 64)
    frames = media.decode_video(data, fmt, [0, 2], (32, 32), max_pixels=64 * 64)
    assert frames.shape == (2, 32, 32, 3) and frames.dtype == np.uint8


def test_every_accepted_image_format_decodes() -> None:
    for suffix in media.IMAGE_FORMATS:
        data = image_bytes(24, 40, "jpg" if suffix == "jpeg" else suffix)
        assert media.image_size(data, suffix) == (24, 40)
        assert media.decode_image(data, (24, 40), suffix).shape == (24, 40, 3)
