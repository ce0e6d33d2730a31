"""Shared fixtures: the repository root and a tiny model configuration."""

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from imontage.config.schema import ModelConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


def tiny_model_config(**changes: object) -> DictConfig:
    """A DiT small enough for unit tests (head dim 8: 4 rotary pairs)."""
    cfg = OmegaConf.structured(ModelConfig)
    values = {
        "in_channels": 3,
        "patch_size": [1, 4, 4],
        "hidden_size": 32,
        "depth": 2,
        "num_heads": 4,
        "mlp_hidden_size": 64,
        "text_dim": 16,
        "max_text_len": 32,
        "rope": {"bands": [1, 1, 1, 1]},
        "positions": {"layout": "montage"},
    }
    values.update(changes)
    return OmegaConf.merge(cfg, values)  # type: ignore[return-value]


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A shard spec over 256 samples of the embedded synthetic data, written once per session.

    Tests must not read ``data/synthetic`` (made by ``make quickstart``): a fresh clone has none.
    """
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run(
        [sys.executable, "tools/make_synthetic.py", "--out", str(out), "--samples", "256", "--no-progress"],
        cwd=REPO,
        check=True,
    )
    return f"{out}/train-*.tar"
