"""``imontage-sample --data`` on a Wan run, as the Wan recipes' comments say to sample one: the
latent shards' precomputed text reaches the model, and ``--vae`` decodes the grid to pixels."""

from pathlib import Path

import pytest
from conftest import REPO
from latent_shards import TEXT_DIM, write_latent_shards
from PIL import Image

from imontage.config import load_recipe
from imontage.sample.cli import main as sample_main
from imontage.sample.grid import GAP, SEPARATOR
from imontage.train.trainer import train


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(run directory, latent shard spec, VAE folder): one step of the tiny Wan on the latent shards."""
    root = tmp_path_factory.mktemp("sample_wan")
    spec = write_latent_shards(root)
    overrides = [
        f"run_dir={root / 'run'}", f"data.shards={spec}", "model=wan_tiny", f"model.text_dim={TEXT_DIM}",
        "parallel=single", "train.precision=fp32", "data.num_workers=0", "data.batch_size=4",
        "stages.sft.steps=1", "train.progress=false",
    ]  # fmt: skip
    return (
        train(load_recipe(REPO / "configs/recipes/imontage_wan2.1_1.3b.yaml", overrides)),
        spec,
        root / "models/vae",
    )


def test_sampling_a_wan_run_from_latent_shards_decodes_pixels(
    wan_run: tuple[Path, str, Path], tmp_path: Path
) -> None:
    run_dir, spec, vae = wan_run
    out = tmp_path / "grid.png"
    argv = [
        str(run_dir),
        "--data",
        spec,
        "--num",
        "1",
        "--steps",
        "2",
        "--no-ema",
        "--vae",
        str(vae),
        "--out",
        str(out),
    ]
    assert sample_main(argv) == 0
    # The first sample: a 32x32 condition image | its generated 32x32 target | the ground truth, in pixels.
    assert Image.open(out).size == (GAP + 3 * (32 + GAP) + 2 * SEPARATOR, 32 + 2 * GAP)
