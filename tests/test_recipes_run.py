"""Every shipped training recipe runs a few steps of each of its stages on the synthetic data."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from imontage.checkpoint import store as ckpt
from imontage.config import load_recipe
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
    if name == "dreamontage_wan2.1_i2v_14b":  # keyframe clips drawn into a tiny Wan I2V's channels
        from test_keyframe_channels import tiny_wan_i2v, write_clips

        clips = root / "keyframe_clips"
        spec = str(clips / "clips-*.tar") if clips.exists() else write_clips(clips)
        return [f"data.shards={spec}", *tiny_wan_i2v(), "parallel=single", "train.precision=fp32",
                "data.num_workers=0", "data.batch_size=4"]  # fmt: skip
    raise AssertionError(f"configs/recipes/{name}.yaml: tell tests/test_recipes_run.py where its data is")


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
    run_dir = train(load_recipe(recipe, overrides))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 2 * len(stages) + 1))
    assert all(r["loss"] == r["loss"] for r in records)  # finite
    assert ckpt.find_resume_checkpoint(run_dir / "checkpoints").name == ckpt.checkpoint_name(2 * len(stages))
    assert (run_dir / "samples" / f"{ckpt.checkpoint_name(2)}.png").exists()
    for index, stage in enumerate(load_recipe(recipe).stages):
        if stage.objective == "flow_dpo":  # its frozen reference is the policy at its start: margin 0
            first = records[2 * index]
            assert first["dpo/reward_margin"] == 0.0, first
            assert math.isclose(first["loss"], math.log(2), rel_tol=1e-6), first
