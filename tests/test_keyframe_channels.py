"""DreaMontage keyframes in an image-to-video model's channels, at any latent frames (data.keyframes
conditioning: channel): Wan I2V's 4 mask + condition channels, HunyuanVideo-I2V's latent_concat.

A clip of 5 latent frames with standalone keyframe latents at frames 0, 2 and 4 (first, middle,
last) goes through the loader; the model's output on the batch equals diffusers' transformer fed the
clip with the mask and condition latents its pipeline's convention gives those frames; the recipe
(configs/recipes/dreamontage_wan2.1_i2v_14b.yaml: channels + Adaptive Tuning) trains 20 steps with
falling loss on both tiny families; and under TP=2 with sequence parallelism and under Ulysses=2 the
output and gradients equal one process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from distributed import run_ranks
from omegaconf import OmegaConf
from safetensors.torch import load_file, save
from test_hunyuan_video import imported, random_diffusers
from test_hunyuan_video import tiny_config as hunyuan_config
from test_parallel_families import assert_close
from test_wan import (
    Case,
    Variant,
    diffusers_kwargs,
    imontage_config,
    randomised,
    reference_output,
    wan_reference,
)

from imontage.config import load_recipe
from imontage.config.schema import DataConfig
from imontage.data import build_loader
from imontage.data.loader import StreamLoader
from imontage.data.shards import ShardWriter, read_shard
from imontage.models import build_model, packing_spec
from imontage.models.common.sequence import PackedBatch, patchify, unpatchify
from imontage.models.wan.model import build_wan
from imontage.train.logger import read_metrics
from imontage.train.trainer import train

LATENT, CLIP, HEIGHT, WIDTH = 4, 5, 4, 6
KEYFRAMES = [0, 2, 4]  # first, middle and last latent frame
TEXT_DIM, IMAGE_DIM, IMAGE_TOKENS, POOLED_DIM = (
    24,
    20,
    5,
    12,
)  # test_wan's and test_hunyuan_video's tiny sizes
WAN_I2V = Variant("i2v", text_len=512, i2v=True)
WAN_CHANNELS = 2 * LATENT + 4  # noisy latent, 4 mask, condition latent
RECIPE = REPO / "configs/recipes/dreamontage_wan2.1_i2v_14b.yaml"


def clip_sample(index: int) -> dict[str, bytes]:
    """A latent clip with keyframe latents at KEYFRAMES and what both tiny families read per sample."""
    g = torch.Generator().manual_seed(index)
    tensors = {
        "0.latent.safetensors": ("latent", torch.randn(LATENT, CLIP, HEIGHT, WIDTH, generator=g)),
        "0.keyframes.safetensors": (
            "keyframes",
            torch.randn(LATENT, len(KEYFRAMES), HEIGHT, WIDTH, generator=g),
        ),
        "text.safetensors": ("text_embedding", torch.randn(3 + index % 3, TEXT_DIM, generator=g)),
        "image_embeds.safetensors": ("image_embeds", torch.randn(IMAGE_TOKENS, IMAGE_DIM, generator=g)),
        "pooled_text.safetensors": ("pooled_text", torch.randn(POOLED_DIM, generator=g)),
    }
    members = {member: save({name: tensor}) for member, (name, tensor) in tensors.items()}
    segments = [{"role": "target", "kind": "latent", "member": "0.latent.safetensors", "tensor": "latent",
                 "keyframes": "0.keyframes.safetensors", "keyframe_frames": KEYFRAMES}]  # fmt: skip
    record = {"task": "video", "text_embedding": "text.safetensors", "image_embeds": "image_embeds.safetensors",
              "pooled_text": "pooled_text.safetensors", "segments": segments}  # fmt: skip
    return {**members, "json": json.dumps(record).encode()}


def write_clips(folder: Path) -> str:
    """One shard of 4 :func:`clip_sample` clips in ``folder``; its spec."""
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder / "clips-000000.tar") as writer:
        for index in range(4):
            writer.add_sample(f"{index:06d}", clip_sample(index))
    return str(folder / "clips-*.tar")


def tiny_wan_i2v() -> list[str]:
    """Overrides making a recipe's model a tiny Wan 2.1 I2V (image tokens, mask + condition channels)."""
    return ["model=wan_tiny", f"model.in_channels={WAN_CHANNELS}", f"model.text_dim={TEXT_DIM}",
            f"model.wan.image_dim={IMAGE_DIM}", "model.wan.added_kv_proj_dim=32"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_clips(tmp_path_factory.mktemp("keyframe_clips"))


def wan_config() -> Any:
    return OmegaConf.merge(imontage_config(WAN_I2V), {"in_channels": WAN_CHANNELS})


def model_config(family: str) -> Any:
    return wan_config() if family == "wan" else hunyuan_config("i2v_latent_concat")


def keyframe_batch(shards: str, family: str, t: float = 0.6) -> tuple[PackedBatch, dict[str, torch.Tensor]]:
    """The first sample's batch, keyframes in its channels, target rows at ``t``; and its stored tensors."""
    cfg = DataConfig(shards=shards, batch_size=1, shuffle_buffer=0, text_embeddings=True)
    cfg.keyframes.mode, cfg.keyframes.conditioning = "stored", "channel"
    loader = build_loader(cfg, packing_spec(model_config(family)))
    assert isinstance(loader, StreamLoader)
    batch = next(loader)
    assert loader.last is not None and [key for _, key in loader.last.keys] == ["000000"]
    loader.close()
    stored = {member: next(iter(load_file_bytes(data).values())) for member, data in clip_sample(0).items()
              if member.endswith(".safetensors")}  # fmt: skip
    return batch.replace(timesteps=torch.where(batch.target_mask, t, 0.0)), stored


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def pipeline_condition(family: str, keyframes: torch.Tensor) -> torch.Tensor:
    """The mask and condition latents as each pipeline lays a given frame, at KEYFRAMES: Wan's
    ``[mask (4 channels per latent frame), latents]``, HunyuanVideo's ``[latents, mask]``."""
    latents = torch.zeros(LATENT, CLIP, HEIGHT, WIDTH)
    latents[:, KEYFRAMES] = keyframes
    mask = torch.zeros(4 if family == "wan" else 1, CLIP, HEIGHT, WIDTH)
    mask[:, KEYFRAMES] = 1.0
    return torch.cat([mask, latents]) if family == "wan" else torch.cat([latents, mask])


def target_rows(batch: PackedBatch) -> slice:
    (span,) = [span for span in batch.spans if span.role == "target"]
    return slice(span.start, span.start + span.length)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_keyframes_at_first_middle_and_last_frames_equal_diffusers_fed_the_same_condition(
    shards: str, family: str, tmp_path: Path
) -> None:
    batch, stored = keyframe_batch(shards, family)
    condition = pipeline_condition(family, stored["0.keyframes.safetensors"])
    rows = target_rows(batch)
    assert batch.channel_condition is not None
    torch.testing.assert_close(batch.channel_condition[rows], patchify(condition, (1, 2, 2)), rtol=0, atol=0)
    latents = unpatchify(batch.tokens[rows], (LATENT, CLIP, HEIGHT, WIDTH), (1, 2, 2))
    text = stored["text.safetensors"]
    if family == "wan":
        torch.manual_seed(0)
        reference = randomised(
            wan_reference()(**{**diffusers_kwargs(WAN_I2V), "in_channels": WAN_CHANNELS}), 1
        )
        reference.eval().save_pretrained(tmp_path)
        model = build_wan(wan_config())
        model.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
        case = Case(latents, condition, torch.full((rows.stop - rows.start,), 0.6), text,
                    stored["image_embeds.safetensors"])  # fmt: skip
        expected = patchify(reference_output(reference, case, WAN_I2V.text_len), (1, 2, 2))
    else:
        reference = random_diffusers("i2v_latent_concat")
        model = imported(reference, tmp_path)
        with torch.no_grad():
            out = reference(
                hidden_states=torch.cat([latents, condition])[None],
                timestep=torch.tensor([600.0]),
                encoder_hidden_states=text[None],
                encoder_attention_mask=torch.ones(1, text.shape[0]),
                pooled_projections=stored["pooled_text.safetensors"][None],
                return_dict=False,
            )[0]
        expected = patchify(out[0], (1, 2, 2))
    with torch.no_grad():
        got = model.eval()(batch)[rows]
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, rtol=1e-5, atol=1e-5)
    # Without its keyframes (the first-frame mask only) the output is another: the frames matter.
    first_only = pipeline_condition(family, stored["0.keyframes.safetensors"]).clone()
    first_only[(slice(0, 4) if family == "wan" else slice(LATENT, LATENT + 1), [2, 4])] = 0.0
    changed = batch.replace(channel_condition=batch.channel_condition.clone())
    changed.channel_condition[rows] = patchify(first_only, (1, 2, 2))
    with torch.no_grad():
        assert (model(changed)[rows] - got).abs().max() > 1e-3 * scale


def recipe_overrides(family: str, shards: str, run_dir: Path) -> list[str]:
    tiny = [f"run_dir={run_dir}", f"data.shards={shards}", "parallel=single", "train.precision=fp32",
            "data.num_workers=0", "data.batch_size=2", "data.shuffle_buffer=0", "train.progress=false",
            "train.checkpoint.every=0", "train.sample.every=0", "stages.sft.steps=20", "optim.lr=3e-3",
            "optim.warmup_steps=0", "optim.min_lr_ratio=1.0", "flow_matching.text_dropout=0.0",
            "data.max_tokens=0"]  # fmt: skip
    if family == "wan":
        return [*tiny, *tiny_wan_i2v()]
    return [*tiny, "model=hunyuan_video_tiny", f"model.text_dim={TEXT_DIM}", f"model.in_channels={2 * LATENT + 1}",
            "model.hunyuan_video.image_condition_type=latent_concat", "model.hunyuan_video.guidance_embeds=false",
            f"model.hunyuan_video.pooled_projection_dim={POOLED_DIM}", "model.positions.layout=video3d"]  # fmt: skip


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
@pytest.mark.slow
def test_the_recipe_trains_20_steps_with_falling_loss(shards: str, family: str, tmp_path: Path) -> None:
    cfg = load_recipe(RECIPE, recipe_overrides(family, shards, tmp_path / "run"))
    assert cfg.data.keyframes.mode == "adaptive" and cfg.data.keyframes.conditioning == "channel"
    losses = [record["loss"] for record in read_metrics(train(cfg))]
    assert len(losses) == 20 and all(loss == loss for loss in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, losses


def build_reference(family: str) -> Any:
    torch.manual_seed(0)
    return randomised(build_model(model_config(family)), seed=1)


def forward_backward(model: Any, batch: PackedBatch) -> dict[str, Any]:
    batch = batch.replace(channel_condition=batch.channel_condition.clone().requires_grad_(True))
    out = model(batch)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
    return {"out": out.detach(), "condition_grad": batch.channel_condition.grad,
            "grads": {name: p.grad for name, p in model.named_parameters()}}  # fmt: skip


def parallel_run(rank: int, world_size: int, tensor: int, context: int, family: str, shards: str) -> dict:
    from imontage.parallel.parallelize import parallelize_model
    from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

    init_process_groups(ParallelLayout(tensor, context, 1), torch.device("cpu"), launch_env())
    model = parallelize_model(build_reference(family), tensor, context, tensor > 1)
    return forward_backward(model, keyframe_batch(shards, family)[0])


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
@pytest.mark.parametrize(("tensor", "context"), [(2, 1), (1, 2)], ids=["tp2_sp", "ulysses2"])
def test_parallel_layouts_equal_one_process(shards: str, family: str, tensor: int, context: int) -> None:
    from imontage.parallel.parallelize import family_plan, tensor_split

    ranks = run_ranks(parallel_run, 2, tensor, context, family, shards)
    reference = build_reference(family)
    plan = family_plan(reference)
    expected = forward_backward(reference, keyframe_batch(shards, family)[0])
    for rank, result in enumerate(ranks):
        assert_close(result["out"], expected["out"], f"rank {rank} output")
    if context > 1:  # each rank holds its tokens' share of every gradient
        assert_close(
            ranks[0]["condition_grad"] + ranks[1]["condition_grad"], expected["condition_grad"], "condition"
        )
        for name, grad in expected["grads"].items():
            assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], grad, f"summed grad of {name}")
        return
    for rank, result in enumerate(ranks):
        assert_close(result["condition_grad"], expected["condition_grad"], f"rank {rank} condition gradient")
    for name, grad in expected["grads"].items():
        split = tensor_split(name, plan)
        if split is None:
            assert_close(ranks[0]["grads"][name], grad, f"grad of {name}")
        else:
            assert_close(split.unshard([r["grads"][name] for r in ranks]), grad, f"gathered grad of {name}")


def docs_commands() -> list[str]:
    """docs/finetune_wan.md's DreaMontage-on-Wan-I2V block: the code block holding ``--keyframe-stride``."""
    blocks: list[str] = []
    lines: list[str] = []
    inside = False
    for line in (REPO / "docs/finetune_wan.md").read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if inside:
                blocks.append("".join(lines))
            lines, inside = [], not inside
        elif inside:
            lines.append(line)
    (block,) = [text for text in blocks if "--keyframe-stride" in text]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_docs_commands_run_on_tiny_models(tmp_path: Path) -> None:
    from conditioned_shards import IMAGE_DIM as CLIP_DIM
    from conditioned_shards import save_tiny_clip_vision
    from latent_shards import TEXT_DIM as UMT5_DIM
    from latent_shards import save_tiny_encoders
    from test_keyframe_latents import clip_sample as pixel_clip

    from imontage.checkpoint.diffusers import build_diffusers_model

    wan = tmp_path / "models/Wan2.1-I2V-14B-480P-Diffusers"
    encoders = save_tiny_encoders(tmp_path / "encoders")
    wan.mkdir(parents=True)
    for part in ("vae", "text_encoder", "tokenizer"):
        (wan / part).symlink_to(encoders[part])
    save_tiny_clip_vision(wan / "image_encoder")
    (wan / "image_processor").symlink_to(wan / "image_encoder")
    tiny = ["model=wan_tiny", f"model.in_channels={WAN_CHANNELS}", f"model.text_dim={UMT5_DIM}",
            f"model.wan.image_dim={CLIP_DIM}", "model.wan.added_kv_proj_dim=32", "parallel=single",
            "train.precision=fp32", "stages.sft.steps=3", "train.checkpoint.every=0", "train.progress=false",
            "data.num_workers=0", "data.batch_size=2", "data.max_tokens=0", "data.shuffle_buffer=0"]  # fmt: skip
    torch.manual_seed(0)
    build_diffusers_model(load_recipe(RECIPE, ["data.shards=x", *tiny]).model).save_pretrained(
        wan / "transformer"
    )
    (tmp_path / "data/clips").mkdir(parents=True)
    with ShardWriter(tmp_path / "data/clips/shard-000000.tar") as writer:
        for index in range(3):  # 9-frame clips: stride 8 keeps frames 0 and 8, latent frames 0 and 2
            writer.add_sample(f"{index:06d}", pixel_clip(index))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = docs_commands()
    assert len(commands) == 2 and commands[1].startswith(
        "torchrun --nproc-per-node 8 --no-python imontage-train"
    )
    for command in commands:
        command = command.replace(" configs/", f" {REPO}/configs/").replace(" tools/", f" {REPO}/tools/")
        command = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", command)
        if "imontage-train" in command:  # one process, the tiny model, a few steps
            command = command.replace("torchrun --nproc-per-node 8 --no-python ", "")
            command += " " + " ".join(shlex.quote(o) for o in [f"run_dir={tmp_path / 'run'}", *tiny])
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    encoded = next(read_shard(str(tmp_path / "data/clips_latents/shard-000000.tar")))
    record = json.loads(encoded.members["json"])
    assert record["segments"][-1]["keyframe_frames"] == [0, 2] and record["image_embeds"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [(["model=wan2.1_t2v_1.3b"], "conditioning", "takes no channel condition"),
     (["data.keyframes.conditioning=shared"], "conditioning", "need model.positions.layout=shared"),
     (["data.keyframes.counts=[0,0]"], "counts", "must not all be 0"),
     (["data.keyframes.positions=[1,-1]"], "positions", "finite and >= 0"),
     (["data.keyframes.mode=often"], "mode", "not one of off, stored, adaptive")],
)  # fmt: skip
def test_settings_the_model_cannot_take_are_refused_naming_the_key(
    overrides: list[str], key: str, reason: str
) -> None:
    from imontage.config.loader import RecipeError

    with pytest.raises(RecipeError, match=rf"key 'data\.keyframes\.{key}': .*{reason}"):
        load_recipe(RECIPE, ["data.shards=x", *overrides])
