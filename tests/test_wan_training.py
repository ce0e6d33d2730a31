"""The Wan tiny preset trains on latent shards written by tools/encode_shards.py (through the trainer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from latent_shards import TEXT_DIM, write_latent_shards

from imontage.config import load_recipe
from imontage.train.logger import read_metrics
from imontage.train.trainer import train

STEPS = 20


@pytest.mark.slow
def test_wan_tiny_learns_from_encoded_latent_shards(tmp_path: Path) -> None:
    shards = write_latent_shards(tmp_path / "data")
    overrides = [
        "model=wan_tiny", "model.prediction=velocity", f"model.text_dim={TEXT_DIM}",
        f"data.shards={shards}", "data.text_embeddings=true", "data.max_tokens=0", "data.batch_size=7",
        "data.shuffle_buffer=0", f"stages.sft.steps={STEPS}", "optim.lr=3e-3", "optim.warmup_steps=0",
        "optim.schedule=constant", "train.ema_decay=0", "train.sample.every=0", "train.checkpoint.every=0",
        "train.progress=false", "flow_matching.text_dropout=0", f"run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run_dir = train(load_recipe(REPO / "configs/recipes/quickstart.yaml", overrides))
    losses = [record["loss"] for record in read_metrics(run_dir)]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
