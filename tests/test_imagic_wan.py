"""Imagic on a tiny random Wan 2.1 (configs/recipes/imagic_wan2.1_1.3b.yaml's `imagic:` section):
the stages edit a latent image through Wan's precomputed text features [L, E] (the embedding stage
leaves every weight bitwise unchanged and lowers the reconstruction loss, fine-tuning lowers it
further), and ``imontage-imagic`` edits from a diffusers folder, the image encoded by ``--vae`` or
given as a latent, its panels decoded by ``--vae``, with clear errors for what a latent model needs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from latent_shards import LATENT_CHANNELS, TEXT_DIM, save_tiny_vae, save_tiny_wan
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from test_imagic import snapshot

from imontage.config.imagic import load_imagic_config
from imontage.config.schema import ModelConfig
from imontage.data import load_image
from imontage.dataprep.encode import VideoVAE
from imontage.dataprep.testing import pattern
from imontage.imagic.cli import main as imagic_main
from imontage.imagic.edit import (
    finetune_model,
    fit_image,
    optimise_embedding,
    reconstruction_batch,
    reconstruction_loss,
    sample_edits,
)
from imontage.models import packing_spec
from imontage.models.common import PackingSpec
from imontage.models.wan.model import build_wan
from imontage.objectives.flow_matching import FlowMatching
from imontage.sample.grid import GAP, SEPARATOR

RECIPE = REPO / "configs/recipes/imagic_wan2.1_1.3b.yaml"
FAST = [
    "embedding.steps=6", "embedding.lr=1e-2", "finetune.steps=6", "finetune.lr=1e-3", "loss.copies=2",
    "loss.eval_draws=2", "sample.steps=2", "sample.guidance=2.0", "eta=[0.0,0.7,1.0]",
]  # fmt: skip
# The command line's runs show the pipeline, not the optimisation: one step of each stage.
LIGHT = [*FAST, "embedding.steps=1", "finetune.steps=1", "loss.copies=1", "loss.eval_draws=1"]
HEIGHT, WIDTH = 32, 48  # pixels; the tiny VAE's latent is 4 x 6, Wan's patches (1, 2, 2) make 2 x 3 tokens


@pytest.fixture(autouse=True)
def keep_determinism_setting() -> object:
    """imontage-imagic switches deterministic algorithms on for its process; restore the setting."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def tiny_wan() -> tuple[torch.nn.Module, PackingSpec]:
    preset = OmegaConf.load(REPO / "configs/model/wan_tiny.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset, {"text_dim": TEXT_DIM})
    torch.manual_seed(0)
    return build_wan(cfg).eval(), packing_spec(cfg)


def test_stages_edit_a_latent_through_wans_text_features() -> None:
    cfg = load_imagic_config(RECIPE, FAST)
    model, spec = tiny_wan()
    generator = torch.Generator().manual_seed(0)
    latent = (
        torch.randn(LATENT_CHANNELS, 1, 4, 6, generator=generator) * 2
    )  # normalised latents exceed [-1, 1]
    target = torch.randn(5, TEXT_DIM, generator=generator)  # e_tgt [L, E]: the target text's UMT5 features
    assert torch.equal(fit_image(latent, spec, latent=True), latent)  # kept as it is: no pixel clamp
    batch = reconstruction_batch(latent, target, spec, cfg.loss.copies)
    objective = FlowMatching(cfg.loss.t_mean, cfg.loss.t_std, cfg.loss.shift)

    def loss(embedding: torch.Tensor) -> float:
        return reconstruction_loss(model, batch, embedding, objective, seed=1, draws=cfg.loss.eval_draws)

    before = snapshot(model)
    initial = loss(target)
    optimised = optimise_embedding(model, batch, target, cfg.embedding, objective, generator)
    after_embedding = loss(optimised)
    assert optimised.shape == target.shape and not torch.equal(optimised, target)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert after_embedding < initial

    finetune_model(model, batch, optimised, cfg.finetune, objective, generator)
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert loss(optimised) < after_embedding

    edits = sample_edits(model, latent, target, optimised, cfg.eta, spec, cfg.sample, seed=2)
    assert all(edit.shape == latent.shape for edit in edits)
    assert all(
        not torch.equal(a, b) for a, b in zip(edits, edits[1:], strict=False)
    )  # the embedding moves them


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Wan diffusers folder, a tiny Wan VAE (4 latent channels), a photo, a target embedding."""
    root = tmp_path_factory.mktemp("imagic_wan")
    Image.fromarray(pattern(HEIGHT, WIDTH, seed=3)).save(root / "photo.png")
    np.save(root / "target.npy", torch.randn(5, TEXT_DIM, generator=torch.Generator().manual_seed(1)).numpy())
    return {"wan": save_tiny_wan(root / "transformer"), "vae": save_tiny_vae(root / "vae"), "root": root}


def run_cli(folders: dict[str, Path], out: Path, *options: str) -> int:
    argv = [str(folders["wan"]), "--text-embedding", str(folders["root"] / "target.npy"), "--out", str(out),
            "--config", str(RECIPE), "--no-progress", *options, *LIGHT]  # fmt: skip
    return imagic_main(argv)


def panel_grid_size(height: int, width: int) -> tuple[int, int]:
    panels = 1 + 3  # the input, then eta 0, 0.7, 1
    return GAP + panels * (width + GAP) + SEPARATOR, height + 2 * GAP


def test_console_script_edits_from_a_diffusers_folder_through_the_vae(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo, vae = folders["root"] / "photo.png", str(folders["vae"])
    assert run_cli(folders, tmp_path / "image.png", "--image", str(photo), "--vae", vae) == 0
    assert "reconstruction loss: initial" in capsys.readouterr().out
    assert Image.open(tmp_path / "image.png").size == panel_grid_size(HEIGHT, WIDTH)  # decoded panels

    # The same image as a latent file (a latent shard's member): the same edit, the same grid.
    latent = VideoVAE.load(vae).encode(load_image(photo))  # [4, 1, 4, 6]
    save_file({"latent": latent}, tmp_path / "0.latent.safetensors")
    member = ["--latent", str(tmp_path / "0.latent.safetensors")]
    assert run_cli(folders, tmp_path / "latent.png", *member, "--vae", vae) == 0
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "latent.png")), np.asarray(Image.open(tmp_path / "image.png"))
    )
    assert run_cli(folders, tmp_path / "preview.png", *member) == 0  # no VAE: the latents themselves
    assert Image.open(tmp_path / "preview.png").size == panel_grid_size(4, 6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--image", "photo.png"], "the model takes 4-channel latents: give --vae VAE_FOLDER"),
        (
            ["--latent", "wide.npy"],
            "wide.npy: expected a latent [4, 1, H, W] (the model's channels), got (5, 1, 4, 6)",
        ),
        (["--latent", "latent.npy", "image_size=[64,96]"], "a latent is edited at its own size"),
        (["--latent", "latent.npy", "use_ema=true"], "a diffusers folder holds one set of weights, no EMA"),
    ],
    ids=["image-without-vae", "latent-channels", "latent-resize", "no-ema"],
)
def test_cli_errors_say_what_a_latent_model_needs(
    folders: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    message: str,
) -> None:
    np.save(tmp_path / "wide.npy", np.zeros((5, 1, 4, 6), np.float32))
    np.save(tmp_path / "latent.npy", np.zeros((4, 1, 4, 6), np.float32))
    paths = {"photo.png": folders["root"] / "photo.png"}
    options = [str(paths.get(o, tmp_path / o)) if o.endswith((".png", ".npy")) else o for o in options]
    assert run_cli(folders, tmp_path / "grid.png", *options) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "grid.png").exists()


def test_a_text_string_is_refused_for_wans_precomputed_text(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(folders["wan"]), "--latent", str(tmp_path / "latent.npy"), "--text", "make it blue", "--out",
            str(tmp_path / "grid.png"), "--config", str(RECIPE)]  # fmt: skip
    np.save(tmp_path / "latent.npy", np.zeros((4, 1, 4, 6), np.float32))
    assert imagic_main(argv) == 2
    assert "precomputed text embeddings" in capsys.readouterr().err


def test_a_vae_folder_claiming_more_than_its_weights_is_refused_before_loading(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    claims = tmp_path / "vae"  # config.json claiming a VAE far larger than its weights
    shutil.copytree(folders["vae"], claims)
    config = json.loads((claims / "config.json").read_text())
    (claims / "config.json").write_text(json.dumps({**config, "base_dim": 100_000}))
    photo = str(folders["root"] / "photo.png")
    assert run_cli(folders, tmp_path / "grid.png", "--image", photo, "--vae", str(claims)) == 2
    error = capsys.readouterr().err.strip()
    assert "has shape" in error and str(claims) in error and "\n" not in error, error
    assert not (tmp_path / "grid.png").exists()
