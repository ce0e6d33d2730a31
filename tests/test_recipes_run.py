"""Every shipped training recipe runs a few steps of each of its stages on the synthetic data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from imontage.config import load_recipe
from imontage.train import checkpoint as ckpt
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
    if name == "imontage_wan2.1_1.3b":  # latent shards of tiny random encoders, a tiny Wan, one process
        from latent_shards import TEXT_DIM, write_latent_shards

        latents = root / "latents"
        spec = write_latent_shards(latents) if not latents.exists() else str(latents / "latents/pixels-*.tar")
        return [f"data.shards={spec}", "model=wan_tiny", f"model.text_dim={TEXT_DIM}", "parallel=single",
                "train.precision=fp32", "data.num_workers=0", "data.batch_size=4"]  # fmt: skip
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
