"""SAR on a latent model (Wan): keyframes through the VAE as encode_shards encodes an image, the context
latent frames carried, each segment's new frames decoded as they come, an MP4 beside the grid, the
peak memory of one window, and docs/finetune_wan.md's SAR commands.

The model is a tiny Wan with random weights and the ``shared`` layout (the DreaMontage recipe's): the
mechanics are checked, not what a trained model draws. Frames are 32x32 pixels (4x4 latents, 2x2
tokens); windows of 4 latent frames with 1 of context make a 10-latent-frame video (37 pixel frames)
three windows long.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import REPO
from latent_shards import TEXT_DIM, save_tiny_text_encoder, save_tiny_vae
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load as load_safetensors
from test_encode_wan22 import save_tiny_wan22_vae
from test_sar import peak_allocated

from imontage.checkpoint.store import save_checkpoint
from imontage.config.schema import ModelConfig
from imontage.data.shards import ShardWriter, read_shard
from imontage.dataprep.encode import Encoders, EncodeSettings, VideoVAE, encode_shards
from imontage.dataprep.testing import image_bytes
from imontage.models import build_model, packing_spec
from imontage.models.common import PackingSpec
from imontage.sample import cli, sar
from imontage.sample.grid import GAP
from imontage.sample.sampler import sample_flow
from imontage.sample.sar import Keyframe, iter_sar, plan_video, segment_sample
from imontage.sample.video import Mp4Writer, StreamingDecoder, encode_keyframe, keyframe_cell, stream_video

PIXELS = (32, 32)
WINDOW, CONTEXT, FRAMES = 4, 1, 10  # latent frames: segments 0..3, 3..6, 6..9
PIXEL_FRAMES = 1 + 4 * (FRAMES - 1)  # 37
KEY_PIXEL_FRAMES = (8, 20, 33)  # latent frames 2, 5, 9: one keyframe in each window


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, busy cores


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random `shared`-layout Wan saved as a run's checkpoint, a tiny random AutoencoderKLWan
    folder, keyframe images and a caption's precomputed text."""
    root = tmp_path_factory.mktemp("sar_wan")
    preset = OmegaConf.load(REPO / "configs/model/wan_tiny.yaml")
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), preset, {"text_dim": TEXT_DIM, "positions": {"layout": "shared"}}
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    state = {"step": 1, "model_config": OmegaConf.to_container(cfg, resolve=True)}
    save_checkpoint(root / "run/checkpoints", 1, {"model": model.state_dict()}, state)
    images = []
    for number, frame in enumerate(KEY_PIXEL_FRAMES):
        path = root / f"key{frame}.png"
        path.write_bytes(image_bytes(*PIXELS, "png", seed=number))
        images.append(path)
    return {
        "root": root,
        "run": root / "run",
        "model": model,
        "spec": packing_spec(cfg),
        "vae_dir": save_tiny_vae(root / "vae"),
        "images": images,
        "text": torch.randn(6, TEXT_DIM, generator=torch.Generator().manual_seed(1)),
    }


def load_keyframes(wan: dict) -> list[Keyframe]:
    return [
        Keyframe(frame, cli.load_image(path))
        for frame, path in zip(KEY_PIXEL_FRAMES, wan["images"], strict=True)
    ]


def read_mp4(path: Path) -> np.ndarray:
    """``[T, H, W, 3]`` uint8: every frame of an MP4, as PyAV decodes it."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def shard_latents(wan: dict, tmp_path: Path) -> list[torch.Tensor]:
    """The keyframe images as tools/encode_shards.py encodes them: one sample, each image a segment."""
    segments = [{"role": "condition", "kind": "image", "member": f"{n}.png"} for n in range(2)]
    segments.append({"role": "target", "kind": "image", "member": "2.png"})
    members = {f"{n}.png": path.read_bytes() for n, path in enumerate(wan["images"])}
    members["json"] = json.dumps({"task": "image", "text": "", "segments": segments}).encode()
    (tmp_path / "pixels").mkdir()
    with ShardWriter(tmp_path / "pixels" / "keys-000000.tar") as writer:
        writer.add_sample("000000", members)
    encoders = Encoders.load(str(wan["vae_dir"]))
    encode_shards(
        str(tmp_path / "pixels/keys-*.tar"),
        tmp_path / "latents",
        encoders,
        settings=EncodeSettings(),
        progress=False,
    )
    [raw] = read_shard(str(tmp_path / "latents/keys-000000.tar"))
    return [load_safetensors(raw.members[f"{n}.latent.safetensors"])["latent"] for n in range(3)]


def test_keyframes_encoded_alone_context_carried_decoded_as_it_streams(
    wan: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = VideoVAE.load(wan["vae_dir"])
    spec: PackingSpec = wan["spec"]
    cell = keyframe_cell(vae, spec.patch_size)
    keyframes = [encode_keyframe(vae, k, cell, f"keyframe {k.frame}") for k in load_keyframes(wan)]
    assert [k.frame for k in keyframes] == [2, 5, 9]  # ceil(f / 4), as encode_shards maps an anchor

    calls = []  # (sample, outputs) of every segment's sample_flow

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        outputs = sample_flow(*args, **kwargs)
        calls.append((args[1][0], outputs[0]))
        return outputs

    monkeypatch.setattr(sar, "sample_flow", recording)
    size = (vae.channels, PIXELS[0] // 8, PIXELS[1] // 8)
    segments = iter_sar(
        wan["model"], spec, FRAMES, size, WINDOW, CONTEXT, keyframes, wan["text"], steps=2, guidance=2.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    with Mp4Writer(tmp_path / "long.mp4", *PIXELS) as writer:
        streamed = list(stream_video(segments, StreamingDecoder(vae), writer))
    assert [(s.start, s.end, s.context) for s, _ in streamed] == [(0, 4, 0), (3, 7, 1), (6, 10, 1)]

    # Each segment's keyframe condition is the image as encode_shards encodes it, at its latent frame.
    stored = shard_latents(wan, tmp_path)
    new_latents = []
    for (segment, _), (sample, outputs), keyframe, latent in zip(
        streamed, calls, keyframes, stored, strict=True
    ):
        conditions = [s for s in sample.segments if s.role == "condition" and s.kind != "text"]
        context, key = conditions if segment.context else [None, *conditions]
        assert key.anchor == keyframe.frame - segment.start
        assert torch.equal(key.data, latent)
        generated = outputs[-1]  # [C, window, h, w]
        if context is not None:  # the previous segment's last latent frames, as it generated them
            assert context.anchor == 0 and torch.equal(context.data, new_latents[-1][:, -CONTEXT:])
        new_latents.append(generated[:, segment.context :])

    # Streamed pixels: the whole latent video decoded at once; the MP4 has every frame at the size.
    pixels = torch.cat([p for _, p in streamed], dim=1)
    assert pixels.shape == (3, PIXEL_FRAMES, *PIXELS)
    torch.testing.assert_close(pixels, vae.decode(torch.cat(new_latents, dim=1)), atol=1e-5, rtol=0)
    video = read_mp4(tmp_path / "long.mp4")
    assert video.shape == (PIXEL_FRAMES, *PIXELS, 3)
    expected = ((pixels + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    error = np.abs(video.astype(np.float32) - expected).mean()
    print(f"MP4 vs decoded pixels: mean abs error {error:.2f} of 255")
    assert error < 20  # H.264 of random-weight noise is lossy, but the frames are these frames


def test_streamed_decode_equals_whole_for_wan_vaes_and_only_for_them(wan: dict, tmp_path: Path) -> None:
    """Pieces of 2, 1 and 3 latent frames decode to the whole video's pixels, for Wan 2.1's VAE and
    for Wan 2.2's (patch size 2, residual); a VAE not causal frame by frame, or tiled, is refused."""
    import diffusers

    for vae in (VideoVAE.load(wan["vae_dir"]), VideoVAE.load(save_tiny_wan22_vae(tmp_path / "wan22"))):
        stored = torch.randn(vae.channels, 6, 2, 2, generator=torch.Generator().manual_seed(0))
        decoder = StreamingDecoder(vae)
        pieces = [decoder.push(stored[:, :2]), decoder.push(stored[:, 2:3]), decoder.push(stored[:, 3:])]
        assert [p.shape[1] for p in pieces] == [5, 4, 12]
        # Equal up to float rounding: the 1x1x1 post-quant convolution run over 2, 1 and 3 frames instead
        # of 6 may round differently, and the decoder carries it on (up to 1.7e-6 seen, pixels in [-1, 1]).
        torch.testing.assert_close(torch.cat(pieces, dim=1), vae.decode(stored), atol=1e-5, rtol=0)
    hunyuan = diffusers.AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        mid_block_add_attention=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="does not decode a video frame by frame"):
        StreamingDecoder(VideoVAE(hunyuan, "AutoencoderKLHunyuanVideo"))
    with pytest.raises(ValueError, match="SAR streams untiled"):
        StreamingDecoder(VideoVAE.load(wan["vae_dir"], tiling=True))


def test_peak_memory_of_three_windows_is_that_of_one(wan: dict, tmp_path: Path) -> None:
    vae = VideoVAE.load(wan["vae_dir"])
    model, spec, text = wan["model"], wan["spec"], wan["text"]
    size = (vae.channels, PIXELS[0] // 8, PIXELS[1] // 8)
    cell = keyframe_cell(vae, spec.patch_size)
    keyframes = [encode_keyframe(vae, k, cell, "keyframe") for k in load_keyframes(wan)]
    settings = {"steps": 2, "guidance": 2.0}  # the unconditional pass too
    plan = plan_video(spec, FRAMES, size, WINDOW, CONTEXT, keyframes)
    context = torch.randn(size[0], CONTEXT, *size[1:])

    def one_window(segment: sar.SarSegment, name: str) -> int:
        """The largest segment's work, alone: its sample (context, keyframe, window), its frames decoded
        by a fresh decoder and written to an MP4."""
        sample = segment_sample(segment, keyframes, context if segment.context else None, size, text)
        [outputs] = sample_flow(model, [sample], spec, **settings)
        with Mp4Writer(tmp_path / name, *PIXELS) as writer:
            writer.write(StreamingDecoder(vae).push(outputs[-1]))
        return segment.num_frames

    def three_windows() -> int:
        segments = iter_sar(model, spec, FRAMES, size, WINDOW, CONTEXT, keyframes, text, **settings)
        with Mp4Writer(tmp_path / "sar.mp4", *PIXELS) as writer:
            return sum(p.shape[1] for _, p in stream_video(segments, StreamingDecoder(vae), writer))

    one, _ = peak_allocated(lambda: one_window(plan[1], "one.mp4"), tmp_path / "one.json")
    three, count = peak_allocated(three_windows, tmp_path / "sar.json")
    assert count == PIXEL_FRAMES
    video = PIXEL_FRAMES * 3 * PIXELS[0] * PIXELS[1] * 4  # the decoded video in float32 pixels
    print(
        f"peak allocated: one window {one} B; SAR {FRAMES} latent frames ({PIXEL_FRAMES} pixel frames) {three} B "
        f"({three / one:.3f}x, {three - one} B more; the video it wrote is {video} B as float32 pixels)"
    )
    assert three <= 1.10 * one
    # At 32x32 the decoder's own working set dominates a window (the 10-frame video decoded whole at
    # once peaks only ~1.06x above one window): the SAR run holds far less than its pixels beyond it.
    assert three - one < video / 2


def doc_commands() -> list[str]:
    """The SAR commands of docs/finetune_wan.md: the code block that runs ``imontage-sample ... --sar``."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```$", (REPO / "docs/finetune_wan.md").read_text(), re.S | re.M)
    [block] = [b for b in blocks if "imontage-sample" in b and "--sar" in b]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


# The doc's real-scale numbers, and the tiny ones the test runs (the same segments' shape: 3+ windows).
TINY = {"--sar 61": f"--sar {FRAMES}", "--window 21": f"--window {WINDOW}", "--context 4": f"--context {CONTEXT}",
        "0=first.png": f"{KEY_PIXEL_FRAMES[0]}=first.png", "120=middle.png": f"{KEY_PIXEL_FRAMES[1]}=middle.png",
        "240=last.png": f"{KEY_PIXEL_FRAMES[2]}=last.png"}  # fmt: skip


def test_docs_sar_commands_write_the_grid_and_the_mp4(
    wan: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models/Wan2.1-T2V-1.3B-Diffusers"
    folder.mkdir(parents=True)
    (folder / "vae").symlink_to(wan["vae_dir"])
    save_tiny_text_encoder(folder)  # text_encoder/, tokenizer/
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/dreamontage_wan2.1_1.3b").symlink_to(wan["run"])
    for name, path in zip(("first", "middle", "last"), wan["images"], strict=True):
        (tmp_path / f"{name}.png").symlink_to(path)
    monkeypatch.chdir(tmp_path)
    embed, sample = doc_commands()
    code = shlex.split(embed)
    assert code[:2] == ["python", "-c"]
    exec(compile(code[2], "docs/finetune_wan.md", "exec"), {})  # the doc's one-liner, in this process
    argv = shlex.split(sample)
    assert argv[0] == "imontage-sample"
    line = " ".join(argv[1:])
    for real, tiny in TINY.items():
        assert real in line
        line = line.replace(real, tiny)
    assert cli.main([*shlex.split(line), "--steps", "2"]) == 0
    out = Path(argv[argv.index("--out") + 1])
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] == GAP + 3 * (PIXELS[0] + GAP)  # one row per segment
    video = read_mp4(out.with_suffix(".mp4"))
    assert video.shape == (PIXEL_FRAMES, *PIXELS, 3)


def test_bad_sar_inputs_on_wan_end_in_one_line(
    wan: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = tmp_path / "caption.safetensors"
    from safetensors.torch import save_file

    save_file({"text": wan["text"]}, text)
    claims = tmp_path / "claims"  # config.json claiming a VAE far larger than its weights
    shutil.copytree(wan["vae_dir"], claims)
    config = json.loads((claims / "config.json").read_text())
    (claims / "config.json").write_text(json.dumps({**config, "base_dim": 100_000}))
    pickled = tmp_path / "pickled"  # weights only as a pickle
    pickled.mkdir()
    shutil.copy(wan["vae_dir"] / "config.json", pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not to be opened")
    key = f"{KEY_PIXEL_FRAMES[0]}={wan['images'][0]}"
    base = [
        str(wan["run"]),
        "--no-ema",
        "--sar",
        str(FRAMES),
        "--window",
        str(WINDOW),
        "--out",
        str(tmp_path / "x.png"),
    ]
    cases = {
        "give its VAE with --vae": [*base, "--keyframe", key],
        "reads precomputed text embeddings": [*base, "--vae", str(wan["vae_dir"]), "--keyframe", key, "--text", "a"],
        "outside the video's 0..36": [*base, "--vae", str(wan["vae_dir"]), "--keyframe", f"37={wan['images'][0]}"],
        "a clip of 2 frames": [
            *base, "--vae", str(wan["vae_dir"]), "--keyframe", f"4={wan['images'][0]},{wan['images'][1]}",
        ],
        "multiple of 16": [*base, "--vae", str(wan["vae_dir"]), "--size", "24x32", "--text-embedding", str(text)],
        "has shape (16,), the model's is (200000,)": [*base, "--vae", str(claims), "--keyframe", key],
        "a pickle checkpoint": [*base, "--vae", str(pickled), "--keyframe", key],
    }  # fmt: skip
    for message, argv in cases.items():
        assert cli.main(argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not list(tmp_path.glob("*.mp4"))


def test_sar_refuses_an_image_to_video_model() -> None:
    spec = PackingSpec(16, (1, 2, 2), 16, layout="shared", image_embed_dim=8, channel_condition="wan_i2v")
    with pytest.raises(ValueError, match="reads image tokens and a wan_i2v channel condition per sample"):
        plan_video(spec, FRAMES, (16, 4, 4), WINDOW, CONTEXT)
