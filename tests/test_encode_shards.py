"""tools/encode_shards.py: pixel shards through a tiny random VAE and text encoder into latent shards.

The latent shards decode back to the inputs' shapes, a run that fails half way and is rerun
finishes with every sample once and its finished shards untouched, and the training loader
packs them (``data.text_embeddings`` with precomputed text).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from latent_shards import (
    LATENT_CHANNELS,
    LATENTS_MEAN,
    LATENTS_STD,
    POOLED_DIM,
    SHARD_KEYS,
    TEXT_DIM,
    pixel_samples,
    save_tiny_clip,
    save_tiny_encoders,
    save_tiny_llama,
    save_tiny_vae,
    write_pixel_shards,
)

from imontage.config.schema import DataConfig
from imontage.data import build_loader
from imontage.data.index import read_sidecar
from imontage.data.loader import StreamLoader
from imontage.data.problems import DataError
from imontage.data.shards import RawSample, ShardWriter, expand_shards, read_shard
from imontage.dataprep import encode
from imontage.dataprep.encode import (
    Encoders,
    EncodeSettings,
    LatentNorm,
    VideoVAE,
    decode_latent_sample,
    encode_shards,
)
from imontage.dataprep.synthetic import write_shards as write_synthetic
from imontage.dataprep.testing import image_bytes, latent_sample, non_finite_samples
from imontage.models.common.sequence import PackingSpec

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {key: expected for key, _, expected in pixel_samples()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_tiny_encoders(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pixels(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_pixel_shards(tmp_path_factory.mktemp("pixels"))


@dataclass
class KilledRun:
    out: Path
    returncode: int  # of the command-line tool, killed once its first shard was complete
    files_at_kill: list[str]
    first_at_kill: tuple[str, int]  # sha256 and mtime of the first output shard
    rerun_output: str  # what the tool printed when run again to completion


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory, models: dict[str, str], pixels: str) -> KilledRun:
    """The command-line tool in a subprocess, SIGKILLed once the first output shard and its index
    are written, then run again (in this process, through its main) to completion.

    The second input shard is a FIFO nobody writes to while the tool runs: it blocks there, so the
    kill lands between the shards however slowly a loaded machine schedules this process.
    """
    out = tmp_path_factory.mktemp("latents")
    inputs = tmp_path_factory.mktemp("inputs")
    for shard in sorted(Path(pixels).parent.glob("pixels-*.tar")):
        shutil.copy(shard, inputs / shard.name)
    blocking = inputs / "pixels-000001.tar"
    held = blocking.read_bytes()
    blocking.unlink()
    os.mkfifo(blocking)
    argv = [str(inputs / "pixels-*.tar"), "--out", str(out), "--vae", models["vae"], "--text-encoder", models["text_encoder"],
            "--tokenizer", models["tokenizer"], "--device", "cpu"]  # fmt: skip
    first, first_index = out / "pixels-000000.tar", out / "pixels-000000.tar.index.json"
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([sys.executable, "tools/encode_shards.py", *argv], cwd=REPO, stderr=errors)
        deadline = time.monotonic() + 300
        while process.poll() is None and not first_index.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        process.kill()
        returncode = process.wait()
        errors.seek(0)
        assert first_index.exists(), errors.read()[-3000:].decode(errors="replace")
    files, first_digest = sorted(p.name for p in out.iterdir()), digest(first)
    blocking.unlink()
    blocking.write_bytes(held)
    tool = runpy.run_path(str(REPO / "tools" / "encode_shards.py"), run_name="encode_shards")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tool["main"]([*argv, "--no-progress"])
    return KilledRun(out, returncode, files, first_digest, printed.getvalue())


@pytest.fixture(scope="module")
def latents(killed_run: KilledRun) -> Path:
    return killed_run.out


def samples_of(spec: str) -> dict[str, list[str]]:
    """Keys per shard file name."""
    return {os.path.basename(url): [raw.key for raw in read_shard(url)] for url in expand_shards(spec)}


def digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_killed_half_way_and_rerun_it_finishes_without_redoing_the_finished_shard(
    killed_run: KilledRun,
) -> None:
    assert killed_run.returncode == -signal.SIGKILL  # it was still working on the next shards
    assert not {"pixels-000001.tar", "pixels-000002.tar"} & set(killed_run.files_at_kill)
    assert "1 already done" in killed_run.rerun_output and "left out: none" in killed_run.rerun_output
    assert digest(killed_run.out / "pixels-000000.tar") == killed_run.first_at_kill
    keys = [key for shard in samples_of(str(killed_run.out / "*.tar")).values() for key in shard]
    assert sorted(keys) == sorted(EXPECTED)  # every sample exactly once
    assert not list(killed_run.out.glob("*.partial"))


def test_latent_shards_hold_every_sample_and_decode_to_the_input_shapes(
    latents: Path, models: dict[str, str]
) -> None:
    assert samples_of(str(latents / "*.tar")) == {
        f"pixels-{n:06d}.tar": list(k) for n, k in enumerate(SHARD_KEYS)
    }
    vae = VideoVAE.load(models["vae"])
    assert vae.norm == LatentNorm(tuple(LATENTS_MEAN), tuple(1 / s for s in LATENTS_STD))
    manifest = json.loads((latents / encode.MANIFEST).read_text())
    assert manifest["vae"]["class"] == "AutoencoderKLWan"
    assert LatentNorm.from_json(manifest["vae"]["normalization"]) == vae.norm
    for url in expand_shards(str(latents / "*.tar")):
        assert read_sidecar(url) is not None  # the loader need not scan it
        for raw in read_shard(url):
            record = json.loads(raw.members["json"])
            assert record["source"] == "tests" and record["text"]  # other fields kept
            assert [s["kind"] for s in record["segments"]] == ["latent", "latent"]
            assert [s["role"] for s in record["segments"]] == ["condition", "target"]
            assert LatentNorm.from_json(record["latent"]["normalization"]) == vae.norm
            expected = EXPECTED[raw.key]["pixels"]
            decoded = decode_latent_sample(raw, vae)
            assert [list(p.shape) for p in decoded if p is not None] == expected
            for segment, shape in zip(record["segments"], expected, strict=True):
                from safetensors.numpy import load

                latent = load(raw.members[segment["member"]])["latent"]
                frames = 1 + (shape[1] - 1) // 4
                assert list(latent.shape) == [LATENT_CHANNELS, frames, shape[2] // 8, shape[3] // 8]
            text = load(raw.members[record["text_embedding"]])["text_embedding"]
            assert text.shape == (EXPECTED[raw.key]["tokens"], TEXT_DIM)  # valid tokens only, no padding


def test_normalisation_is_applied_and_inverted(models: dict[str, str]) -> None:
    vae = VideoVAE.load(models["vae"])
    pixels = torch.rand(3, 5, 16, 16) * 2 - 1
    raw = vae.vae.encode(pixels[None]).latent_dist.mode()[0]
    stored = vae.encode(pixels)
    mean, std = torch.tensor(LATENTS_MEAN).view(-1, 1, 1, 1), torch.tensor(LATENTS_STD).view(-1, 1, 1, 1)
    torch.testing.assert_close(stored, (raw - mean) / std)
    torch.testing.assert_close(vae.norm.invert(stored), raw)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(stored), vae.vae.decode(raw[None]).sample[0].clamp(-1, 1))


def test_hunyuan_video_vae_takes_the_same_path(tmp_path: Path) -> None:
    folder = save_tiny_vae(tmp_path / "hv", family="hunyuan_video")
    assert VideoVAE.load(folder, tiling=True).tiling
    vae = VideoVAE.load(folder)
    assert not vae.tiling
    assert vae.class_name == "AutoencoderKLHunyuanVideo"
    assert vae.norm.scale == (0.476986,) * LATENT_CHANNELS and vae.norm.shift == (0.0,) * LATENT_CHANNELS
    pixels = vae.fit(torch.rand(3, 6, 20, 32) * 2 - 1)  # 5 frames, 16x32 kept
    stored = vae.encode(pixels)
    assert stored.shape == (LATENT_CHANNELS, 2, 2, 4)
    assert vae.decode(stored).shape == (3, 5, 16, 32)


def test_a_failed_run_rerun_finishes_without_redoing_finished_shards(
    tmp_path: Path, models: dict[str, str], pixels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "latents"
    real = encode.encode_sample

    def failing(raw: RawSample, *args: Any, **kwargs: Any) -> dict[str, bytes]:
        if raw.key == SHARD_KEYS[1][1]:  # the second sample of the second shard
            raise RuntimeError("killed")
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(encode, "encode_sample", failing)
    encoders = Encoders.load(models["vae"], models["text_encoder"], models["tokenizer"])
    with pytest.raises(RuntimeError, match="killed"):
        encode_shards(pixels, out, encoders, progress=False)
    first = out / "pixels-000000.tar"
    assert sorted(p.name for p in out.iterdir()) == [
        "encode.json",
        "pixels-000000.tar",
        "pixels-000000.tar.index.json",
    ]
    before = digest(first)
    # A killed process leaves its partial file behind: the rerun must redo that shard.
    (out / "pixels-000001.tar.partial").write_bytes(b"half a tar")
    monkeypatch.undo()
    reports = encode_shards(pixels, out, encoders, progress=False)
    assert [(r.skipped, r.samples) for r in reports] == [(True, 3), (False, 2), (False, 2)]
    assert digest(first) == before
    assert not list(out.glob("*.partial"))
    keys = [key for shard_keys in samples_of(str(out / "*.tar")).values() for key in shard_keys]
    assert sorted(keys) == sorted(EXPECTED)  # every sample exactly once
    with pytest.raises(ValueError, match="encoded with other settings"):
        encode_shards(pixels, out, encoders, settings=EncodeSettings(latent_dtype="float16"), progress=False)


def test_ranks_take_whole_shards(tmp_path: Path, models: dict[str, str], pixels: str) -> None:
    urls = expand_shards(pixels)
    assert [[os.path.basename(url) for url in encode.rank_shards(urls, rank, 2)] for rank in (0, 1)] == [
        ["pixels-000000.tar", "pixels-000002.tar"],
        ["pixels-000001.tar"],
    ]
    with pytest.raises(ValueError, match="share file names"):
        encode.rank_shards([urls[0], str(tmp_path / "elsewhere" / os.path.basename(urls[0]))], 0, 1)
    out = tmp_path / "latents"
    [report] = encode_shards(pixels, out, Encoders.load(models["vae"]), rank=1, world=2, progress=False)
    assert (os.path.basename(report.url), report.samples) == ("pixels-000001.tar", 2)
    assert sorted(p.name for p in out.glob("*.tar")) == ["pixels-000001.tar"]
    raw = next(read_shard(str(out / "pixels-000001.tar")))
    assert "text_embedding" not in json.loads(raw.members["json"])  # no text encoder given


def test_bad_input_samples_are_left_out_and_counted(tmp_path: Path, models: dict[str, str]) -> None:
    from imontage.dataprep.testing import write_bad_shards

    write_bad_shards(tmp_path / "bad")
    encoders = Encoders.load(models["vae"])
    report = encode.encode_shard(
        str(tmp_path / "bad" / "bad-000000.tar"), tmp_path / "out", encoders, EncodeSettings()
    )
    assert report.samples == 2 and report.problems == {"bad_json": 1, "missing_member": 1}
    with pytest.raises(DataError, match="smaller than the VAE"):
        from imontage.dataprep.testing import image_bytes, record

        members = {
            "0.png": image_bytes(4, 4),
            "json": record("t", "", [{"kind": "image", "member": "0.png"}]),
        }
        encode.encode_sample(RawSample("k", "u", members, 0, 0), encoders, EncodeSettings())


def test_the_loader_packs_latent_shards_with_text_embeddings(latents: Path) -> None:
    cfg = DataConfig(shards=str(latents / "*.tar"), batch_size=2, shuffle_buffer=0, text_embeddings=True)
    spec = PackingSpec(in_channels=LATENT_CHANNELS, patch_size=(1, 2, 2), max_text_len=32, layout="video3d")
    loader = build_loader(cfg, spec)
    assert isinstance(loader, StreamLoader)
    seen = []
    assert loader.batches_in_epoch(0) == 3
    for _ in range(loader.batches_in_epoch(0)):
        batch = next(loader)
        assert loader.last is not None
        keys = [key for _, key in loader.last.keys]
        seen += keys
        assert batch.text_embeds is not None and batch.text_embeds.shape[1] == TEXT_DIM
        assert batch.tokens.shape[1] == LATENT_CHANNELS * 4
        expected = 0
        for key in keys:
            expected += EXPECTED[key]["tokens"]
            expected += sum(
                (1 + (t - 1) // 4) * (h // 16) * (w // 16) for _, t, h, w in EXPECTED[key]["pixels"]
            )
        assert batch.tokens.shape[0] == expected
        assert int(batch.is_text.sum()) == sum(EXPECTED[key]["tokens"] for key in keys)
    loader.close()
    assert len(seen) == len(set(seen)) >= 6  # an epoch leaves out at most N mod batches


def test_pooled_text_from_a_second_encoder(tmp_path: Path, models: dict[str, str], pixels: str) -> None:
    """The pooled vector is CLIP's pooler_output, as diffusers' HunyuanVideo pipelines compute it
    (``_get_clip_prompt_embeds``); a projecting CLIP (text_embeds) is refused."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import HunyuanVideoPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip = str(save_tiny_clip(tmp_path / "clip"))
    encoders = Encoders.load(
        models["vae"], models["text_encoder"], models["tokenizer"], clip, models["tokenizer"]
    )
    raw = next(read_shard(expand_shards(pixels)[0]))
    members = encode.encode_sample(raw, encoders, EncodeSettings())
    record = json.loads(members["json"])
    assert record["pooled_text"] == "pooled_text.safetensors"
    from safetensors.numpy import load

    pooled = torch.from_numpy(load(members["pooled_text.safetensors"])["pooled_text"])
    assert pooled.shape == (POOLED_DIM,)
    assert encoders.pooled is not None
    pipe = SimpleNamespace(tokenizer_2=encoders.pooled.tokenizer, text_encoder_2=encoders.pooled.model)
    with torch.no_grad():
        expected = HunyuanVideoPipeline._get_clip_prompt_embeds(
            pipe, record["text"], device="cpu", dtype=torch.float32
        )
    torch.testing.assert_close(pooled, expected[0], rtol=0, atol=0)
    projecting = tmp_path / "clip_projection"
    CLIPTextModelWithProjection(CLIPTextModel.from_pretrained(clip).config).save_pretrained(projecting)
    with pytest.raises(ValueError, match="pooler_output"):
        Encoders.load(models["vae"], pooled=str(projecting), pooled_tokenizer=models["tokenizer"])


def test_hunyuan_video_text_recipe_stores_what_its_pipeline_feeds_the_transformer(
    tmp_path: Path, models: dict[str, str]
) -> None:
    """``--text-recipe hunyuan_video``: the stored text embeddings are the valid rows of diffusers'
    ``HunyuanVideoPipeline._get_llama_prompt_embeds`` (template, hidden_states[-3], crop) on the same
    tiny Llama, the pooled vector its ``_get_clip_prompt_embeds``, the negative prompt's likewise; the
    manifest records the recipe, and a rerun with another recipe is refused."""
    import inspect

    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
        DEFAULT_PROMPT_TEMPLATE,
        HunyuanVideoPipeline,
    )
    from safetensors.torch import load, load_file

    llama, llama_tokenizer = save_tiny_llama(tmp_path)
    clip = str(save_tiny_clip(tmp_path / "clip"))
    key, members, _ = pixel_samples()[0]  # two 32x32 images, "image sample 0 red circle"
    spec = write_pixel_shards(tmp_path / "pixels", [[(key, members)]])
    load_args = (models["vae"], str(llama), str(llama_tokenizer), clip, models["tokenizer"])
    encoders = Encoders.load(*load_args, text_recipe="hunyuan_video")
    settings, out = EncodeSettings(negative_prompt=""), tmp_path / "latents"
    encode_shards(spec, out, encoders, settings=settings, progress=False)
    raw = next(read_shard(str(out / "pixels-000000.tar")))
    record = json.loads(raw.members["json"])
    assert record["text_encoder"]["recipe"] == "hunyuan_video"
    assert encoders.text is not None and encoders.pooled is not None
    pipe = SimpleNamespace(tokenizer=encoders.text.tokenizer, text_encoder=encoders.text.model,
                           tokenizer_2=encoders.pooled.tokenizer, text_encoder_2=encoders.pooled.model)  # fmt: skip

    def pipeline(text: str, template: dict = DEFAULT_PROMPT_TEMPLATE) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            embeds, mask = HunyuanVideoPipeline._get_llama_prompt_embeds(
                pipe, text, template, device=torch.device("cpu"), dtype=torch.float32
            )  # [1, 256, E], [1, 256]: what the transformer reads, padded
            pooled = HunyuanVideoPipeline._get_clip_prompt_embeds(
                pipe, text, device="cpu", dtype=torch.float32
            )
        return embeds[0][mask[0].bool()], pooled[0]

    text, pooled = pipeline(record["text"])
    assert text.shape == (record["text_encoder"]["tokens"], TEXT_DIM)
    torch.testing.assert_close(load(raw.members["text.safetensors"])["text_embedding"], text, rtol=0, atol=0)
    torch.testing.assert_close(
        load(raw.members["pooled_text.safetensors"])["pooled_text"], pooled, rtol=0, atol=0
    )
    negative = load_file(out / encode.NEGATIVE)
    for name, expected in zip(("text_embedding", "pooled_text"), pipeline(""), strict=True):
        torch.testing.assert_close(negative[name], expected, rtol=0, atol=0)
    # The recipe's constants are the pipeline's defaults, and the manifest records them.
    defaults = inspect.signature(HunyuanVideoPipeline._get_llama_prompt_embeds).parameters
    recipe = encoders.text.recipe
    assert recipe.hidden_state == -(defaults["num_hidden_layers_to_skip"].default + 1) == -3
    assert encoders.text.max_length == defaults["max_sequence_length"].default == 256
    manifest = json.loads((out / encode.MANIFEST).read_text())
    assert manifest["text_encoder"]["recipe"] == {
        "name": "hunyuan_video", "template": DEFAULT_PROMPT_TEMPLATE["template"],
        "crop_start": DEFAULT_PROMPT_TEMPLATE["crop_start"], "hidden_state": -3, "pad": True,
    }  # fmt: skip
    assert manifest["settings"]["negative_prompt"] == ""
    # crop_start drops the template's tokens: cropped where this tokenizer's template ends, the rows
    # left are the prompt's words and the closing <|eot_id|>.
    prefix = len(encoders.text.tokenizer(DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0])["input_ids"])
    encoders.text.recipe = dataclasses.replace(recipe, crop_start=prefix)
    words = "the blue square moves left"
    own, _ = pipeline(words, {**DEFAULT_PROMPT_TEMPLATE, "crop_start": prefix})
    torch.testing.assert_close(encoders.text.encode(words), own, rtol=0, atol=0)
    assert own.shape == (len(words.split()) + 1, TEXT_DIM)
    # hidden_states[-3], not the last hidden state (what the plain recipe stores) of the same tokens.
    encoders.text.recipe = dataclasses.replace(recipe, hidden_state=None)
    assert not torch.allclose(encoders.text.encode(record["text"]), text)
    encoders.text.recipe = recipe
    # Resumable: the same settings skip the finished shard; another recipe or negative prompt is refused.
    [report] = encode_shards(spec, out, encoders, settings=settings, progress=False)
    assert report.skipped
    with pytest.raises(ValueError, match="encoded with other text_encoder"):
        encode_shards(spec, out, Encoders.load(*load_args), settings=settings, progress=False)
    with pytest.raises(ValueError, match="encoded with other settings"):
        encode_shards(spec, out, encoders, settings=EncodeSettings(negative_prompt="blurry"), progress=False)


def test_preference_pairs_keep_their_groups_and_anchors_move_to_latent_frames(models: dict[str, str]) -> None:
    from imontage.dataprep.testing import image_bytes, video_bytes

    segments = [
        {"role": "condition", "kind": "image", "member": "c.png", "anchor": 5},
        {"role": "target", "kind": "video", "member": "w.mp4", "group": "win"},
        {"role": "target", "kind": "video", "member": "l.mp4", "group": "lose"},
    ]
    members = {
        "c.png": image_bytes(16, 16),
        "w.mp4": video_bytes(9, 16, 16, seed=1),
        "l.mp4": video_bytes(9, 16, 16, seed=2),
        "json": json.dumps({"text": "a red circle", "segments": segments, "score": 0.5}).encode(),
    }
    encoders = Encoders.load(models["vae"])
    out = encode.encode_sample(RawSample("k", "u", members, 0, 0), encoders, EncodeSettings())
    record = json.loads(out["json"])
    assert [(s.get("group"), s.get("anchor")) for s in record["segments"]] == [
        (None, 2),
        ("win", None),
        ("lose", None),
    ]
    assert record["score"] == 0.5
    assert [s["pixels"] for s in record["latent"]["segments"]] == [
        [3, 1, 16, 16],
        [3, 9, 16, 16],
        [3, 9, 16, 16],
    ]
    from safetensors.numpy import load

    win, lose = (load(out[s["member"]])["latent"] for s in record["segments"][1:])
    assert win.shape == lose.shape == (LATENT_CHANNELS, 3, 2, 2) and not (win == lose).all()


def test_imontage_sample_decodes_latent_rows_with_its_vae(models: dict[str, str]) -> None:
    from imontage.sample.cli import decode_rows

    vae = VideoVAE.load(models["vae"])
    latent, pixels = torch.randn(LATENT_CHANNELS, 2, 4, 6), torch.rand(3, 1, 32, 48) * 2 - 1
    [[conditions, made]] = decode_rows([[[latent], [pixels]]], vae)
    torch.testing.assert_close(conditions[0], vae.decode(latent))
    assert conditions[0].shape == (3, 5, 32, 48) and made[0] is pixels
    rows = [[[latent]]]
    assert decode_rows(rows, None) is rows


def test_samples_no_model_could_train_on_are_left_out_named_and_counted(
    tmp_path: Path,
    models: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 24x32 image (a Wan latent of 3x4, which the (1, 2, 2) patches of every latent preset do not
    divide), a latent segment holding NaN, and a text embedding carried over with Inf in it: left out,
    named in the log and counted in the tool's last line, beside a sample that is encoded."""
    good = latent_sample(0, segments=[{"role": "target", "kind": "image", "member": "0.png"}])
    samples = {
        "good": {**good, "0.png": image_bytes(32, 48)},
        "odd": {**good, "0.png": image_bytes(24, 32)},
        "nan-latent": non_finite_samples()["nan-latent"],
        "inf-text": {**non_finite_samples()["inf-text-float16"]},
    }
    with ShardWriter(tmp_path / "in-000000.tar") as writer:
        for key, members in samples.items():
            writer.add_sample(key, members)
    tool = runpy.run_path(str(REPO / "tools" / "encode_shards.py"), run_name="encode_shards")
    argv = [
        str(tmp_path / "in-*.tar"),
        "--out",
        str(tmp_path / "out"),
        "--vae",
        models["vae"],
        "--no-progress",
    ]
    assert tool["main"](argv) == 0
    assert "left out: {'unpackable': 1, 'non_finite': 2}" in capsys.readouterr().out
    assert samples_of(str(tmp_path / "out" / "*.tar")) == {"in-000000.tar": ["good"]}
    left_out = [record.getMessage() for record in caplog.records if "left out" in record.getMessage()]
    assert any(
        "sample 'odd': unpackable: segment 0, member '0.png': its latent [4, 1, 3, 4] does not divide into "
        "the model's patches (1, 2, 2)" in line
        for line in left_out
    ), left_out
    assert any("sample 'nan-latent': non_finite: member '1.safetensors'" in line for line in left_out)
    assert any("sample 'inf-text': non_finite: member 'text.safetensors'" in line for line in left_out)


def test_the_default_synthetic_data_encodes_whole(tmp_path: Path, models: dict[str, str]) -> None:
    """Every task of tools/make_synthetic.py's default mix, through a VAE of 8x spatial compression:
    nothing left out (the 24x32 clips it made before gave 3x4 latents, which no preset patchifies)."""
    write_synthetic(tmp_path / "in", samples=3, per_shard=3, seed=0, progress=False)
    encoders = Encoders.load(models["vae"], models["text_encoder"], models["tokenizer"])
    [report] = encode_shards(str(tmp_path / "in" / "train-*.tar"), tmp_path / "out", encoders, progress=False)
    assert (report.samples, dict(report.problems)) == (3, {})
