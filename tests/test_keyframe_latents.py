"""Standalone keyframe latents (DreaMontage): written by encode_shards beside each clip, read by the loader.

A causal Wan VAE encodes frame 0 of a clip alone and later frames four at a time, so a frame encoded
alone (as sampling encodes a user's keyframe) is not its latent inside the clip. encode_shards
``--keyframes anchors`` / ``--keyframe-stride N`` stores each keyframe encoded alone; the loader lays
them on their clip (imontage/data/keyframes.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
from pathlib import Path

import pytest
import torch
from conftest import REPO
from latent_shards import LATENT_CHANNELS, LATENTS_MEAN, LATENTS_STD, save_tiny_encoders

from imontage.config.schema import DataConfig
from imontage.data import build_loader
from imontage.data.decode import DecodeOptions, decode_item, inspect_sample
from imontage.data.media import load_array
from imontage.data.problems import DataError
from imontage.data.shards import RawSample, ShardWriter, read_shard
from imontage.dataprep.testing import image_bytes, video_bytes
from imontage.models.common.sequence import PackingSpec, patchify

FRAMES, HEIGHT, WIDTH = 9, 32, 48  # 3 latent frames of 4x6
ANCHORS = (3, 8)  # pixel frames: latent frames ceil(f / 4) = 1, 2


def clip_sample(index: int) -> dict[str, bytes]:
    """A 9-frame clip with keyframe images anchored at ANCHORS (its own frames there, in practice)."""
    members = {"2.mp4": video_bytes(FRAMES, HEIGHT, WIDTH, seed=40 + index)}
    segments = []
    for number, anchor in enumerate(ANCHORS):
        members[f"{number}.png"] = image_bytes(HEIGHT, WIDTH, "png", seed=10 * number + index)
        segments.append({"role": "condition", "kind": "image", "member": f"{number}.png", "anchor": anchor})
    segments.append({"role": "target", "kind": "video", "member": "2.mp4"})
    record = {"task": "keyframes", "text": "the red circle moves left", "segments": segments}
    return {**members, "json": json.dumps(record).encode()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | dict[str, str]]:
    root = tmp_path_factory.mktemp("keyframes")
    models = save_tiny_encoders(root / "models")
    pixels = root / "pixels"
    pixels.mkdir()
    for shard in range(2):
        with ShardWriter(pixels / f"clips-{shard:06d}.tar") as writer:
            writer.add_sample(f"{shard:06d}", clip_sample(shard))
    return {"root": root, "models": models, "pixels": pixels}


def run_tool(argv: list[str]) -> str:
    tool = runpy.run_path(str(REPO / "tools" / "encode_shards.py"), run_name="encode_shards")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert tool["main"](argv) == 0
    return printed.getvalue()


def encode_to(setup: dict, out: Path, *flags: str) -> str:
    models = setup["models"]
    argv = [str(setup["pixels"] / "clips-*.tar"), "--out", str(out), "--vae", models["vae"],
            "--text-encoder", models["text_encoder"], "--tokenizer", models["tokenizer"], "--device", "cpu",
            "--no-progress", *flags]  # fmt: skip
    return run_tool(argv)


@pytest.fixture(scope="module")
def strided(setup: dict) -> Path:
    out = setup["root"] / "strided"
    encode_to(setup, out, "--keyframe-stride", "2")
    return out


def test_a_keyframe_latent_is_its_frame_encoded_alone_not_its_latent_in_the_clip(
    setup: dict, strided: Path
) -> None:
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKLWan.from_pretrained(setup["models"]["vae"], use_safetensors=True).eval()
    mean, std = (
        torch.tensor(LATENTS_MEAN)[:, None, None, None],
        torch.tensor(LATENTS_STD)[:, None, None, None],
    )
    source = next(read_shard(str(setup["pixels"] / "clips-000000.tar")))
    pixels = (
        decode_item(source, DecodeOptions(max_frames=1 << 30)).samples[0].segments[-1].data
    )  # [3, 9, H, W]
    assert pixels is not None and pixels.shape == (3, FRAMES, HEIGHT, WIDTH)
    encoded = next(read_shard(str(strided / "clips-000000.tar")))
    record = json.loads(encoded.members["json"])
    target = record["segments"][-1]
    # Pixel frames 0, 2, 4, 6, 8 lie in latent frames 0, 1, 1, 2, 2: the first of each is kept.
    assert target["keyframe_frames"] == [0, 1, 2]
    assert record["latent"]["segments"][-1]["keyframe_pixels"] == [0, 2, 6]
    keyframes = torch.from_numpy(load_array(encoded.members[target["keyframes"]], "safetensors"))
    clip = torch.from_numpy(load_array(encoded.members[target["member"]], "safetensors"))
    assert keyframes.shape == (LATENT_CHANNELS, 3, 4, 6) and clip.shape == (LATENT_CHANNELS, 3, 4, 6)
    with torch.no_grad():
        for number, frame in enumerate((0, 2, 6)):
            alone = vae.encode(pixels[None, :, frame : frame + 1]).latent_dist.mode()[0]  # [C, 1, h, w]
            alone = (alone - mean) / std
            torch.testing.assert_close(keyframes[:, number : number + 1], alone, rtol=1e-5, atol=1e-5)
            in_clip = clip[:, -(-frame // 4)]
            if frame == 0:  # the causal VAE encodes frame 0 of a clip alone too
                torch.testing.assert_close(keyframes[:, 0], in_clip, rtol=1e-5, atol=1e-5)
            else:
                assert (keyframes[:, number] - in_clip).abs().max() > 1e-2


def test_anchored_keyframes_are_the_anchors_latent_frames(setup: dict) -> None:
    out = setup["root"] / "anchored"
    encode_to(setup, out, "--keyframes", "anchors")
    for raw in read_shard(str(out / "clips-000001.tar")):
        record = json.loads(raw.members["json"])
        target = record["segments"][-1]
        assert target["keyframe_frames"] == [1, 2]  # ceil(3 / 4), ceil(8 / 4)
        assert record["latent"]["segments"][-1]["keyframe_pixels"] == list(ANCHORS)
        assert [segment["anchor"] for segment in record["segments"][:2]] == [1, 2]
        assert json.loads((out / "encode.json").read_text())["settings"]["keyframes"] == {"anchors": True}


def test_a_rerun_redoes_only_the_unfinished_shard_with_its_keyframes(setup: dict, strided: Path) -> None:
    out = setup["root"] / "resumed"
    encode_to(setup, out, "--keyframe-stride", "2")
    first = (out / "clips-000000.tar").stat().st_mtime_ns
    (out / "clips-000001.tar").unlink()  # as a kill leaves it: the second shard not renamed into place
    (out / "clips-000001.tar.index.json").unlink()
    (out / "clips-000001.tar.partial").write_bytes(b"half a shard")
    printed = encode_to(setup, out, "--keyframe-stride", "2")
    assert "1 shards encoded" in printed and "1 already done" in printed
    assert (out / "clips-000000.tar").stat().st_mtime_ns == first
    assert not list(out.glob("*.partial"))
    for name in ("clips-000000.tar", "clips-000001.tar"):  # the same samples and members as a straight run
        redone = {raw.key: raw.members for raw in read_shard(str(out / name))}
        straight = {raw.key: raw.members for raw in read_shard(str(strided / name))}
        assert redone.keys() == straight.keys()
        for key, members in redone.items():
            assert members.keys() == straight[key].keys() and members["json"] == straight[key]["json"]
            for member in (m for m in members if m.endswith(".safetensors")):  # the CPU VAE: not bitwise
                torch.testing.assert_close(load(members[member]), load(straight[key][member]))


def load(data: bytes) -> torch.Tensor:
    return torch.from_numpy(load_array(data, "safetensors"))


def test_the_loader_pairs_each_clip_with_its_keyframes(strided: Path) -> None:
    cfg = DataConfig(shards=str(strided / "*.tar"), batch_size=1, shuffle_buffer=0, text_embeddings=True)
    cfg.keyframes.mode = "stored"  # every stored keyframe, as condition segments on the clip's positions
    spec = PackingSpec(in_channels=LATENT_CHANNELS, patch_size=(1, 2, 2), max_text_len=32, layout="shared")
    loader = build_loader(cfg, spec)
    stored = {raw.key: raw for url in sorted(strided.glob("*.tar")) for raw in read_shard(str(url))}
    for _ in range(loader.batches_in_epoch(0)):
        batch = next(loader)
        assert loader.last is not None
        (key,) = [key for _, key in loader.last.keys]
        raw = stored[key]
        target = json.loads(raw.members["json"])["segments"][-1]
        keyframes = torch.from_numpy(load_array(raw.members[target["keyframes"]], "safetensors"))
        appended = [span for span in batch.spans if span.index >= 4]  # text, 2 images, the clip, then these
        assert [span.shape for span in appended] == [(LATENT_CHANNELS, 1, 4, 6)] * 3
        for number, span in enumerate(appended):
            assert span.role == "condition"
            rows = slice(span.start, span.start + span.length)
            torch.testing.assert_close(
                batch.tokens[rows], patchify(keyframes[:, number : number + 1], (1, 2, 2))
            )
            assert set(batch.positions[rows, 1].tolist()) == {target["keyframe_frames"][number]}  # its t
    loader.close()


def latent_clip(keyframes: torch.Tensor, frames: object) -> RawSample:
    """A latent clip [4, 3, 4, 6] with ``keyframes`` and ``keyframe_frames`` as given."""
    from safetensors.torch import save

    segment = {"role": "target", "kind": "latent", "member": "0.latent.safetensors",
               "keyframes": "0.keyframes.safetensors", "keyframe_frames": frames}  # fmt: skip
    members = {
        "0.latent.safetensors": save({"latent": torch.zeros(LATENT_CHANNELS, 3, 4, 6)}),
        "0.keyframes.safetensors": save({"keyframes": keyframes}),
        "json": json.dumps({"segments": [segment]}).encode(),
    }
    return RawSample("000000", "clips.tar", members, 0, 0)


@pytest.mark.parametrize(
    ("shape", "frames", "reason", "detail"),
    [((LATENT_CHANNELS, 2, 4, 6), [0, 2], None, None),
     ((LATENT_CHANNELS, 3, 4, 6), [0, 2], "undecodable", "keyframes of shape [4, 3, 4, 6]"),
     ((LATENT_CHANNELS, 1, 4, 4), [1], "undecodable", "keyframe_frames need [4, 1, 4, 6]"),
     ((LATENT_CHANNELS, 2, 4, 6), [0, 3], "undecodable", "reach past the clip's 3 frames"),
     ((LATENT_CHANNELS, 2, 4, 6), [2, 0], "bad_json", "distinct frames >= 0, ascending"),
     ((LATENT_CHANNELS, 1, 4, 6), [], "bad_json", "non-empty 'keyframe_frames'")],
)  # fmt: skip
def test_keyframes_are_checked_against_their_clip_from_headers(
    shape: tuple[int, ...], frames: list[int], reason: str | None, detail: str | None
) -> None:
    raw = latent_clip(torch.zeros(shape), frames)
    if reason is None:
        assert inspect_sample(raw)[1].segments[0].keyframe_frames == tuple(frames)
        return
    with pytest.raises(DataError) as error:
        inspect_sample(raw)
    assert error.value.reason == reason and detail in str(error.value), str(error.value)
