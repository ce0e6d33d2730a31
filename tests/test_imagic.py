"""Imagic on one synthetic image: the embedding stage leaves the model bitwise unchanged and lowers
the reconstruction loss, fine-tuning lowers it further, the grid has one panel per eta, the run is
repeatable, and ``imontage-imagic`` runs end to end on a tiny checkpoint with clear errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_model_config
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from imontage.config import RecipeError, load_recipe
from imontage.config.imagic import ImagicConfigError, load_imagic_config
from imontage.dataprep.synthetic import EDIT_CANVAS, Shape, render
from imontage.imagic.cli import main as imagic_main
from imontage.imagic.cli import read_target
from imontage.imagic.edit import (
    finetune_model,
    imagic_grid,
    optimise_embedding,
    reconstruction_batch,
    reconstruction_loss,
    run_imagic,
    sample_edits,
    target_text_embedding,
    with_text_embedding,
)
from imontage.models import packing_spec
from imontage.models.common import PackingSpec
from imontage.models.dit.model import DiT, build_dit
from imontage.objectives.flow_matching import FlowMatching
from imontage.sample.grid import GAP, SEPARATOR, to_frames
from imontage.train.trainer import train

RECIPE = REPO / "configs/recipes/imagic.yaml"
TEXT = "recolour the red square green"
# Few steps, at rates a random tiny model moves under in that many steps.
FAST = [
    "embedding.steps=10",
    "embedding.lr=1e-2",
    "finetune.steps=10",
    "finetune.lr=1e-3",
    "loss.copies=2",
    "loss.eval_draws=4",
    "sample.steps=3",
    "sample.guidance=2.0",  # the recipe samples without CFG; this covers its unconditional branch
    "eta=[0.0,0.7,1.0]",
]


def scene_pixels() -> torch.Tensor:
    """A synthetic edit scene (red square, blue circle) as uint8 ``[H, W, 3]``."""
    shapes = [Shape("square", "red", 4, 4, 10), Shape("circle", "blue", 18, 16, 10)]
    return torch.from_numpy(render(shapes, EDIT_CANVAS, "dark").copy())


def scene_image() -> torch.Tensor:
    return scene_pixels().permute(2, 0, 1).unsqueeze(1).float() / 127.5 - 1.0  # [3, 1, 32, 32]


def tiny_model(seed: int = 0) -> tuple[DiT, PackingSpec]:
    """A tiny DiT whose output depends on its text: the zero-initialised adaLN gates and output
    layer of a fresh model would make every gradient to the embedding vanish."""
    cfg = tiny_model_config()
    torch.manual_seed(seed)
    model = build_dit(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval(), packing_spec(cfg)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def grid_panels(grid: np.ndarray, etas: int) -> list[np.ndarray]:
    """The grid's cells ``[H, W, 3]``, left to right: the input, then one per eta."""
    height, width = EDIT_CANVAS
    first_edit = GAP + width + GAP + SEPARATOR
    starts = [GAP] + [first_edit + k * (width + GAP) for k in range(etas)]
    return [grid[GAP : GAP + height, x : x + width] for x in starts]


def test_stages_lower_the_loss_and_the_embedding_stage_leaves_the_model_bitwise_unchanged() -> None:
    cfg = load_imagic_config(RECIPE, FAST)
    model, spec = tiny_model()
    image = scene_image()
    target = target_text_embedding(model, TEXT, spec)
    assert target.shape == (len(TEXT), 16)  # [L, E]: bytes x text_dim
    batch = reconstruction_batch(image, target, spec, cfg.loss.copies)
    objective = FlowMatching(text_dropout=0.0)
    generator = torch.Generator().manual_seed(0)

    def loss(embedding: torch.Tensor) -> float:
        return reconstruction_loss(model, batch, embedding, objective, seed=1, draws=cfg.loss.eval_draws)

    before = snapshot(model)
    initial = loss(target)
    optimised = optimise_embedding(model, batch, target, cfg.embedding, objective, generator)
    after_embedding = loss(optimised)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # frozen only inside
    assert not torch.equal(optimised, target) and after_embedding < initial

    finetune_model(model, batch, optimised, cfg.finetune, objective, generator)
    after_finetune = loss(optimised)
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert after_finetune < after_embedding, (initial, after_embedding, after_finetune)

    edits = sample_edits(model, image, target, optimised, cfg.eta, spec, cfg.sample, seed=2)
    assert len(edits) == len(cfg.eta) and all(edit.shape == image.shape for edit in edits)
    grid = imagic_grid(image, edits)
    height, width = EDIT_CANVAS
    panels = 1 + len(cfg.eta)  # the input, then one per eta
    assert grid.shape == (height + 2 * GAP, GAP + panels * (width + GAP) + SEPARATOR, 3)
    source, *swept = grid_panels(grid, len(cfg.eta))
    assert np.array_equal(source, scene_pixels().numpy())
    assert all(np.array_equal(panel, to_frames(edit)[0]) for panel, edit in zip(swept, edits, strict=True))
    # Same noise in every column: the embedding alone moves the panels along the sweep.
    assert all(not np.array_equal(a, b) for a, b in zip(swept, swept[1:], strict=False))


def test_text_rows_read_the_given_embedding_in_every_copy() -> None:
    _, spec = tiny_model()
    embedding = torch.randn(5, 16)
    batch = with_text_embedding(reconstruction_batch(scene_image(), embedding, spec, copies=3), embedding)
    assert batch.text_embeds is not None
    assert torch.equal(batch.text_embeds[batch.is_text], embedding.repeat(3, 1))
    assert not batch.text_embeds[~batch.is_text].any()


def test_run_imagic_is_deterministic_given_the_seed() -> None:
    light = ["embedding.steps=2", "finetune.steps=2", "loss.copies=1", "loss.eval_draws=1", "sample.steps=2"]
    cfg = load_imagic_config(RECIPE, [*FAST, *light, "eta=[0.5,1.0]"])
    results = [run_imagic(*tiny_model(), scene_image(), cfg, text=TEXT) for _ in range(2)]
    first, second = results
    assert torch.equal(first.optimised_embedding, second.optimised_embedding)
    assert all(torch.equal(a, b) for a, b in zip(first.edits, second.edits, strict=True))
    assert first.losses == second.losses and list(first.losses) == ["initial", "embedding", "finetune"]
    cfg.seed = 1
    other = run_imagic(*tiny_model(), scene_image(), cfg, text=TEXT)
    assert not torch.equal(other.optimised_embedding, first.optimised_embedding)


def test_config_defaults_file_and_overrides() -> None:
    defaults = load_imagic_config()
    assert (defaults.embedding.steps, defaults.embedding.lr) == (100, 1e-3)  # published values
    assert (defaults.finetune.steps, defaults.finetune.lr) == (1500, 5e-7)
    cfg = load_imagic_config(RECIPE, ["imagic.finetune.steps=7", "eta=[0.25]"])
    assert cfg.finetune.steps == 7 and cfg.eta == [0.25] and cfg.embedding.steps == 100


def test_the_recipe_loader_reads_and_checks_the_same_section() -> None:
    """The recipe schema embeds the section: imontage-train validates it and writes it to config.yaml."""
    section = load_recipe(RECIPE).imagic
    assert OmegaConf.to_object(section) == load_imagic_config(RECIPE)
    with pytest.raises(RecipeError, match=r"<command line>: key 'imagic\.loss\.copies': must be >= 1"):
        load_recipe(RECIPE, ["imagic.loss.copies=0"])
    with pytest.raises(RecipeError, match=r"<command line>: key 'imagic\.embeding'"):
        load_recipe(RECIPE, ["imagic.embeding.steps=3"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["embedding.stpes=3"], r"<command line>: key 'imagic\.embedding\.stpes'"),
        (["finetune.lr=fast"], r"<command line>: key 'imagic\.finetune\.lr'"),
        (["finetune.lr=0"], r"<command line>: key 'imagic\.finetune\.lr': must be positive"),
        (["eta=[]"], r"<command line>: key 'imagic\.eta': needs at least one value"),
        (["steps"], "not a key=value"),
    ],
)
def test_bad_settings_name_the_key_and_source(overrides: list[str], message: str) -> None:
    with pytest.raises(ImagicConfigError, match=message):
        load_imagic_config(RECIPE, overrides)


def test_bad_file_names_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("imagic:\n  sample:\n    gudance: 2.0\n")
    with pytest.raises(ImagicConfigError, match=r"bad\.yaml: key 'imagic\.sample\.gudance'"):
        load_imagic_config(bad)
    bad.write_text("imagic:\n  loss:\n    copies: 0\n")
    with pytest.raises(ImagicConfigError, match=r"bad\.yaml: key 'imagic\.loss\.copies': must be >= 1"):
        load_imagic_config(bad)
    bad.write_text("name: no section\n")
    with pytest.raises(ImagicConfigError, match=r"bad\.yaml: expected an 'imagic:' mapping"):
        load_imagic_config(bad)


def test_target_embedding_file_for_models_with_precomputed_text(tmp_path: Path) -> None:
    model, spec = tiny_model()
    features = target_text_embedding(model, TEXT, spec)  # [L, 16]
    np.save(tmp_path / "e.npy", features.numpy())
    save_file({"text": features}, tmp_path / "e.safetensors")
    for name in ("e.npy", "e.safetensors"):
        assert torch.equal(read_target(model, spec, None, tmp_path / name), features)
    np.save(tmp_path / "wide.npy", np.zeros((4, 17), np.float32))
    with pytest.raises(ValueError, match=r"wide\.npy: a text embedding must be \[L, 16\], got \(4, 17\)"):
        read_target(model, spec, None, tmp_path / "wide.npy")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped recipe's base stage for 3 steps, in this process: a checkpoint as imontage-train writes it."""
    root = tmp_path_factory.mktemp("imagic_run")
    data, run_dir = root / "synthetic", root / "run"
    make = [sys.executable, "tools/make_synthetic.py", "--out", str(data), "--samples", "12", "--no-progress"]
    subprocess.run(make, cwd=REPO, check=True, capture_output=True)
    overrides = [
        f"run_dir={run_dir}", f"data.shards={data}/train-*.tar", "stages.base.steps=3", "data.batch_size=2",
        "train.sample.every=0", "train.progress=false",
    ]  # fmt: skip
    train(load_recipe(RECIPE, overrides))
    return run_dir


def test_console_script_end_to_end_on_a_tiny_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    scene = tmp_path / "scene.png"
    Image.fromarray(scene_pixels().numpy()).save(scene)
    grid = tmp_path / "grid.png"
    command = [
        str(Path(sys.executable).parent / "imontage-imagic"), str(tiny_run), "--image", str(scene),
        "--text", TEXT, "--out", str(grid), "--config", str(RECIPE), "--eta", "0,0.5,1,1.2",
        "embedding.steps=3", "finetune.steps=3", "loss.copies=1", "loss.eval_draws=1", "sample.steps=2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "reconstruction loss: initial" in result.stdout
    [distances] = [
        line for line in result.stdout.splitlines() if line.startswith("mean |panel - input| per eta: ")
    ]
    assert len(distances.split(": ")[1].split(", ")) == 4
    assert "imagic: sampling" in result.stderr  # the progress bar
    height, width = EDIT_CANVAS
    panels = 1 + 4  # the input, then eta 0, 0.5, 1, 1.2
    assert Image.open(grid).size == (GAP + panels * (width + GAP) + SEPARATOR, height + 2 * GAP)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--image": "nope.png"}, "nope.png: no such image file"),
        ({"--image": "odd.png"}, "odd.png: segment of shape (3, 1, 30, 30) does not divide into patches"),
        ({"override": "finetune.setps=3"}, "<command line>: key 'imagic.finetune.setps'"),
        ({"--eta": "0,x"}, "--eta '0,x'"),
        ({"checkpoint": "no_run"}, "no_run: no complete checkpoint"),
        ({"--text-embedding": "e.txt"}, "e.txt: a text embedding must be a .safetensors or .npy file"),
    ],
    ids=["missing-image", "image-size", "unknown-key", "bad-eta", "no-checkpoint", "embedding-file"],
)
def test_cli_errors_name_the_file_or_key(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], message: str
) -> None:
    Image.new("RGB", (30, 30)).save(tmp_path / "odd.png")
    Image.fromarray(scene_pixels().numpy()).save(tmp_path / "scene.png")
    options = {"--image": "scene.png", "--out": "grid.png", **change}
    checkpoint = str(tmp_path / options.pop("checkpoint")) if "checkpoint" in options else str(tiny_run)
    override = options.pop("override", "seed=0")
    target = ["--text", TEXT] if "--text-embedding" not in options else []
    argv = [checkpoint, *target, override]
    for option, value in options.items():
        argv += [option, value if option == "--eta" else str(tmp_path / value)]
    assert imagic_main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "grid.png").exists()
