"""HunyuanVideo (T2V with distilled guidance, I2V latent_concat) and Wan 2.1 I2V on latent shards
written by tools/encode_shards.py with pooled text, CLIP image tokens and I2V condition latents:
the members are what diffusers' pipelines compute, the loader feeds each family what it reads, and
each trains through the trainer with a falling loss."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conditioned_shards import IMAGE_DIM, IMAGE_TOKENS, POOLED_DIM, write_conditioned_shards
from conftest import REPO
from latent_shards import LATENT_CHANNELS, LATENTS_MEAN, LATENTS_STD, TEXT_DIM, save_tiny_vae
from omegaconf import DictConfig
from PIL import Image
from safetensors.torch import load

from imontage.config import load_recipe
from imontage.data import build_loader
from imontage.data.problems import DataError
from imontage.data.shards import RawSample, expand_shards, read_shard
from imontage.dataprep.encode import Encoders, EncodeSettings, encode_sample
from imontage.dataprep.testing import image_bytes, record
from imontage.models import packing_spec
from imontage.models.common.sequence import patchify
from imontage.train.logger import read_metrics
from imontage.train.trainer import train

STEPS = 20
FAMILIES = {
    "hunyuan_video_t2v": ["model=hunyuan_video_tiny", f"model.hunyuan_video.pooled_projection_dim={POOLED_DIM}",
                          "flow_matching.embedded_guidance=4.0"],
    "hunyuan_video_i2v": ["model=hunyuan_video_tiny", f"model.hunyuan_video.pooled_projection_dim={POOLED_DIM}",
                          f"model.in_channels={2 * LATENT_CHANNELS + 1}", "model.hunyuan_video.guidance_embeds=false",
                          "model.hunyuan_video.image_condition_type=latent_concat"],
    "wan_i2v": ["model=wan_tiny", f"model.in_channels={2 * LATENT_CHANNELS + 4}", f"model.wan.image_dim={IMAGE_DIM}",
                "model.wan.added_kv_proj_dim=32"],
}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("conditioned")
    write_conditioned_shards(folder)
    return folder


def recipe(family: str, root: Path, run_dir: Path) -> DictConfig:
    overrides = [
        *FAMILIES[family], "model.prediction=velocity", f"model.text_dim={TEXT_DIM}",
        "model.positions.layout=video3d", f"data.shards={root / 'latents/pixels-*.tar'}", "data.text_embeddings=true",
        "data.max_tokens=0", "data.batch_size=6", "data.shuffle_buffer=0", f"stages.sft.steps={STEPS}",
        "optim.lr=3e-3", "optim.warmup_steps=0", "optim.schedule=constant", "train.ema_decay=0",
        "train.sample.every=0", "train.checkpoint.every=0", "train.progress=false",
        "flow_matching.text_dropout=0", f"run_dir={run_dir}",
    ]  # fmt: skip
    return load_recipe(REPO / "configs/recipes/quickstart.yaml", overrides)


def raw_samples(spec: str) -> dict[str, RawSample]:
    return {raw.key: raw for url in expand_shards(spec) for raw in read_shard(url)}


def member(raw: RawSample, name: str) -> torch.Tensor:
    (tensor,) = load(raw.members[name]).values()
    return tensor


def test_encoded_members_are_what_the_diffusers_pipelines_compute(root: Path) -> None:
    """image_embeds: CLIPVisionModel's hidden_states[-2] of the condition image through its processor
    (WanImageToVideoPipeline.encode_image); condition_latent: the VAE's mode of the image followed by
    zero frames, normalised (WanImageToVideoPipeline.prepare_latents)."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionModel

    pixels, latents = (
        raw_samples(str(root / "pixels/pixels-*.tar")),
        raw_samples(str(root / "latents/pixels-*.tar")),
    )
    vision = CLIPVisionModel.from_pretrained(root / "models/clip_vision").eval()
    processor = CLIPImageProcessor.from_pretrained(root / "models/clip_vision")
    vae = AutoencoderKLWan.from_pretrained(root / "models/vae").eval()
    mean, std = torch.tensor(LATENTS_MEAN).view(-1, 1, 1, 1), torch.tensor(LATENTS_STD).view(-1, 1, 1, 1)
    assert sorted(latents) == sorted(pixels)
    for key in sorted(pixels)[:2]:
        image = np.array(Image.open(io.BytesIO(pixels[key].members["0.png"])).convert("RGB"))  # [H, W, 3]
        with torch.no_grad():
            values = processor(images=image, return_tensors="pt")["pixel_values"]
            tokens = vision(pixel_values=values, output_hidden_states=True).hidden_states[-2][0]
            frame = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W]
            video = torch.cat([frame[:, None], torch.zeros(3, 4, *frame.shape[1:])], dim=1)  # 5 frames
            condition = (vae.encode(video[None]).latent_dist.mode()[0] - mean) / std
        assert tokens.shape == (IMAGE_TOKENS, IMAGE_DIM)
        torch.testing.assert_close(member(latents[key], "image_embeds.safetensors"), tokens)
        torch.testing.assert_close(member(latents[key], "1.condition.safetensors"), condition)
        assert not torch.equal(condition[:, 1:], torch.zeros_like(condition[:, 1:]))  # not zero padding


def test_image_to_video_encoding_leaves_out_samples_it_cannot_condition(root: Path, tmp_path: Path) -> None:
    models = root / "models"
    encoders = Encoders.load(str(models / "vae"), image=str(models / "clip_vision"), i2v_condition=True)

    def encode(segments: list[dict], sizes: dict[str, tuple[int, int]]) -> None:
        members = {name: image_bytes(*size) for name, size in sizes.items()}
        raw = RawSample("k", "in.tar", {**members, "json": record("i2v", "a red circle", segments)}, 0, 0)
        encode_sample(raw, encoders, EncodeSettings())

    target = {"role": "target", "kind": "image", "member": "1.png"}
    with pytest.raises(
        DataError, match="sample 'k': unpackable: image-to-video encoding needs a condition image"
    ):
        encode([target], {"1.png": (32, 48)})
    condition = {"role": "condition", "kind": "image", "member": "0.png"}
    with pytest.raises(DataError, match=r"unpackable: segment 1: .*the target is 32x32 pixels"):
        encode([condition, target], {"0.png": (32, 48), "1.png": (32, 32)})
    with pytest.raises(
        ValueError,
        match="--i2v-condition writes the image-to-video condition latents of the families that encode with AutoencoderKLWan, not AutoencoderKLHunyuanVideo",
    ):
        Encoders.load(str(save_tiny_vae(tmp_path / "hv", family="hunyuan_video")), i2v_condition=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_loader_feeds_each_family_what_it_reads(family: str, root: Path, tmp_path: Path) -> None:
    cfg = recipe(family, root, tmp_path)
    spec = packing_spec(cfg.model, cfg.flow_matching.embedded_guidance)
    loader = build_loader(cfg.data, spec)
    batch = next(loader)
    assert loader.last is not None
    raws = raw_samples(str(root / "latents/pixels-*.tar"))
    samples = [raws[key] for _, key in loader.last.keys]
    assert len(samples) == batch.num_samples == 6
    hunyuan = family.startswith("hunyuan")
    assert (batch.pooled_text is not None) == hunyuan and (batch.image_embeds is not None) == (not hunyuan)
    if hunyuan:
        torch.testing.assert_close(
            batch.pooled_text, torch.stack([member(s, "pooled_text.safetensors") for s in samples])
        )
    else:
        torch.testing.assert_close(
            batch.image_embeds, torch.stack([member(s, "image_embeds.safetensors") for s in samples])
        )
    if family == "hunyuan_video_t2v":
        assert batch.guidance is not None and batch.guidance.tolist() == [4.0] * 6
        assert batch.channel_condition is None
        return
    assert batch.guidance is None and batch.channel_condition is not None
    for span in batch.spans:
        rows = batch.channel_condition[span.start : span.start + span.length]
        if span.role != "target":
            assert not rows.any()
            continue
        raw = samples[span.sample]
        latent = member(raw, "1.latent.safetensors")  # [C, 2, H, W]
        if family == "hunyuan_video_i2v":  # [image latent on frame 0, zeros; mask]
            image = torch.zeros_like(latent)
            image[:, 0] = member(raw, "0.latent.safetensors")[:, 0]
            mask = torch.zeros(1, *latent.shape[1:])
            mask[:, 0] = 1
            expected = torch.cat([image, mask])
        else:  # [4 first-frame mask channels; the condition latent]
            mask = torch.zeros(4, *latent.shape[1:])
            mask[:, 0] = 1
            expected = torch.cat([mask, member(raw, "1.condition.safetensors")])
        torch.testing.assert_close(rows, patchify(expected, spec.patch_size), rtol=0, atol=0)
    loader.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_family_learns_from_conditioned_latent_shards(family: str, root: Path, tmp_path: Path) -> None:
    run_dir = train(recipe(family, root, tmp_path / "run"))
    records = read_metrics(run_dir)
    losses = [record["loss"] for record in records]
    assert len(losses) == STEPS and all(record["target_tokens"] > 0 for record in records)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
