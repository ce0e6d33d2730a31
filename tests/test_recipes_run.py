"""Every shipped training recipe runs a few steps of each of its stages on the synthetic data."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from safetensors.torch import load_file

from imontage.checkpoint import store as ckpt
from imontage.config import load_recipe
from imontage.models import trained_experts
from imontage.train.logger import read_metrics
from imontage.train.trainer import train

RECIPES = sorted((REPO / "configs/recipes").glob("*.yaml"))
TASKS = ("edit", "montage", "video")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(root / "all"), "--samples", "24",
                    "--no-progress"], cwd=REPO, check=True)  # fmt: skip
    for task in TASKS:
        subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(root / task), "--tasks", task,
                        "--samples", "12", "--no-progress"], cwd=REPO, check=True)  # fmt: skip
    return root


def data_overrides(name: str, root: Path) -> list[str]:
    """Where each recipe's data comes from in this test; a new recipe must be added here."""
    if name in ("quickstart", "editverse"):
        return [f"data.shards={root}/all/train-*.tar"]
    if name == "imontage_cocktailmix":
        datasets = ", ".join(f"{{name: {t}, shards: '{root / t}/train-*.tar'}}" for t in TASKS)
        return [f"data.datasets=[{datasets}]"]
    if name == "imagic":  # trains the base model; tests/test_imagic.py runs the `imagic:` section
        return [f"data.shards={root}/all/train-*.tar"]
    if name == "dreamontage":  # SFT on every task, DPO on preference pairs (written here, once)
        pairs = root / "edit_pair"
        if not pairs.exists():
            subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(pairs), "--tasks", "edit_pair",
                            "--samples", "12", "--no-progress"], cwd=REPO, check=True)  # fmt: skip
        return [f"data.shards={root}/all/train-*.tar", f"stages.dpo.data.shards={pairs}/train-*.tar"]
    if name.endswith("_wan2.1_1.3b"):  # latent shards of tiny random encoders, a tiny Wan, one process
        from latent_shards import TEXT_DIM, keyframe_samples, save_tiny_wan, write_latent_shards

        pretrained = root / "wan_transformer"  # a diffusers folder of the tiny Wan, as the recipes start from
        if not pretrained.exists():
            save_tiny_wan(pretrained)
        tiny = ["model=wan_tiny", f"model.text_dim={TEXT_DIM}", f"model.init_from_diffusers={pretrained}",
                "parallel=single", "train.precision=fp32", "data.num_workers=0", "data.batch_size=4"]  # fmt: skip
        if name == "dreamontage_wan2.1_1.3b":  # SFT on anchored keyframes (layout shared), DPO on clip pairs
            latents = root / "keyframe_latents"
            if not latents.exists():
                write_latent_shards(latents, [keyframe_samples(4), keyframe_samples(2, pairs=True)])
            shards = latents / "latents"
            return [f"data.shards={shards}/pixels-000000.tar", f"stages.dpo.data.shards={shards}/pixels-000001.tar",
                    *tiny]  # fmt: skip
        latents = root / "latents"  # images and clips (iMontage, EditVerse; Imagic's base stage)
        spec = write_latent_shards(latents) if not latents.exists() else str(latents / "latents/pixels-*.tar")
        return [f"data.shards={spec}", *tiny]
    if name == "imontage_hunyuan_video_i2v":  # those images and clips with pooled text; a tiny HV-I2V
        from conditioned_shards import write_conditioned_shards
        from latent_shards import LATENT_CHANNELS, POOLED_DIM, TEXT_DIM, pixel_samples

        latents = root / "pooled_latents"
        if not latents.exists():
            samples = [(key, members) for key, members, _ in pixel_samples()]
            write_conditioned_shards(latents, [samples], i2v=False)
        spec = str(latents / "latents/pixels-*.tar")  # every task's dataset (CocktailMix) reads them
        datasets = ", ".join(f"{{name: {d.name}, shards: '{spec}'}}" for d in load_recipe(REPO / "configs/recipes"
                             / f"{name}.yaml").data.datasets)  # fmt: skip
        return [f"data.datasets=[{datasets}]", "model=hunyuan_video_tiny", f"model.text_dim={TEXT_DIM}",
                f"model.in_channels={2 * LATENT_CHANNELS + 1}", "model.hunyuan_video.image_condition_type=latent_concat",
                "model.hunyuan_video.guidance_embeds=false", f"model.hunyuan_video.pooled_projection_dim={POOLED_DIM}",
                "parallel=single", "train.precision=fp32", "data.num_workers=0", "data.batch_size=4"]  # fmt: skip
    if name == "imontage_hunyuan_video_1.5_i2v":  # keyframe samples with image tokens; a tiny HV 1.5 I2V
        from conditioned_shards import IMAGE_DIM
        from latent_shards import TEXT_DIM

        pretrained = root / "hunyuan_video_15_transformer"
        # The glyph width at most the Qwen one: the model asks text_embeds for its width even with no glyph rows.
        tiny = ["model=hunyuan_video_1.5_tiny", f"model.text_dim={TEXT_DIM}", "model.hunyuan_video_15.text_embed_2_dim=8",
                f"model.hunyuan_video_15.image_embed_dim={IMAGE_DIM}"]  # fmt: skip
        if not pretrained.exists():  # the diffusers folder the recipe starts from, of the same config
            save_diffusers_transformer(pretrained, name, tiny)
        return [f"data.shards={i2v_keyframe_latents(root)}/pixels-000000.tar", *tiny,
                f"model.init_from_diffusers={pretrained}", "parallel=single", "train.precision=fp32",
                "data.num_workers=0", "data.batch_size=4"]  # fmt: skip
    if name == "dreamontage_wan2.2_i2v_a14b":  # keyframes, clip pairs; a tiny A14B I2V pipeline, both experts
        from latent_shards import LATENT_CHANNELS, TEXT_DIM
        from test_wan22 import save_pipeline

        from imontage.models.common.sequence import WAN_MASK_CHANNELS

        pipeline = root / "a14b_i2v"
        if not pipeline.exists():
            save_pipeline(pipeline, i2v=True, boundary_ratio=0.9)
        shards = i2v_keyframe_latents(root)
        return [f"data.shards={shards}/pixels-000000.tar", f"stages.dpo.data.shards={shards}/pixels-000001.tar",
                "model=wan_tiny", f"model.text_dim={TEXT_DIM}", "model.mlp_hidden_size=48",
                f"model.in_channels={2 * LATENT_CHANNELS + WAN_MASK_CHANNELS}", "model.wan.rope_max_seq_len=64",
                "model.wan.boundary_ratio=0.9", f"model.init_from_diffusers={pipeline / 'pipeline'}",
                "parallel=single", "train.precision=fp32", "data.num_workers=0", "data.batch_size=4"]  # fmt: skip
    if name == "dreamontage_wan2.1_i2v_14b":  # keyframe clips drawn into a tiny Wan I2V's channels
        from test_keyframe_channels import tiny_wan_i2v, write_clips

        clips = root / "keyframe_clips"
        spec = str(clips / "clips-*.tar") if clips.exists() else write_clips(clips)
        return [f"data.shards={spec}", *tiny_wan_i2v(), "parallel=single", "train.precision=fp32",
                "data.num_workers=0", "data.batch_size=4"]  # fmt: skip
    raise AssertionError(f"configs/recipes/{name}.yaml: tell tests/test_recipes_run.py where its data is")


def i2v_keyframe_latents(root: Path) -> Path:
    """Latent shards of keyframe samples (anchored images and a clip; then clip pairs) with what the
    image-to-video families read besides them: image tokens, Wan I2V condition latents (written once)."""
    from conditioned_shards import write_conditioned_shards
    from latent_shards import keyframe_samples

    latents = root / "i2v_keyframe_latents"
    if not latents.exists():
        write_conditioned_shards(latents, [keyframe_samples(4), keyframe_samples(2, pairs=True)])
    return latents / "latents"


def save_diffusers_transformer(folder: Path, recipe: str, model_overrides: list[str]) -> None:
    """A random diffusers transformer of the model config of ``recipe`` with ``model_overrides``
    (``model=PRESET``, ``model.KEY=VALUE``): the tiny stand-in of a pretrained ``transformer/`` folder."""
    from imontage.checkpoint.diffusers import build_diffusers_model

    cfg = load_recipe(REPO / "configs/recipes" / f"{recipe}.yaml", model_overrides).model
    torch.manual_seed(0)
    build_diffusers_model(cfg).save_pretrained(folder)


def is_training_recipe(path: Path) -> bool:
    return "stages" in (OmegaConf.load(path) or {})


@pytest.mark.parametrize("recipe", [p for p in RECIPES if is_training_recipe(p)], ids=lambda p: p.stem)
def test_recipe_runs_a_few_steps_of_every_stage(recipe: Path, synthetic: Path, tmp_path: Path) -> None:
    stages = [stage.name for stage in load_recipe(recipe).stages]
    overrides = [
        f"run_dir={tmp_path / 'run'}", "train.progress=false", "train.sample.every=2", "train.sample.num_samples=1",
        "train.sample.steps=2", "train.checkpoint.every=0", "data.max_tokens=768",
        *(f"stages.{name}.steps=2" for name in stages), *data_overrides(recipe.stem, synthetic),
    ]  # fmt: skip
    cfg = load_recipe(recipe, overrides)
    run_dir = train(cfg)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 2 * len(stages) + 1))
    assert all(r["loss"] == r["loss"] for r in records)  # finite
    assert ckpt.find_resume_checkpoint(run_dir / "checkpoints").name == ckpt.checkpoint_name(2 * len(stages))
    assert (run_dir / "samples" / f"{ckpt.checkpoint_name(2)}.png").exists()
    experts = trained_experts(cfg.model)
    if len(experts) > 1:  # every expert in one run (Wan 2.2 A14B): its checkpoints hold them all
        final = run_dir / "checkpoints" / ckpt.checkpoint_name(2 * len(stages)) / "model.safetensors"
        assert {name.split(".")[0] for name in load_file(final)} == {expert.name for expert in experts}
    for index, stage in enumerate(load_recipe(recipe).stages):
        if stage.objective == "flow_dpo":  # its frozen reference is the policy at its start: margin 0
            first = records[2 * index]
            assert first["dpo/reward_margin"] == 0.0, first
            assert math.isclose(first["loss"], math.log(2), rel_tol=1e-6), first
