"""Every shipped YAML loads against the schema; bad recipes fail naming the key and the file."""

from pathlib import Path

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from imontage.config import RecipeError, load_recipe
from imontage.config.loader import stage_section
from imontage.config.schema import GROUPS

RECIPES = sorted((REPO / "configs/recipes").glob("*.yaml"))
GROUP_FILES = sorted(path for group in GROUPS for path in (REPO / "configs" / group).glob("*.yaml"))
BASE = REPO / "configs/recipes/quickstart.yaml"


def test_every_yaml_under_configs_is_covered() -> None:
    every = sorted((REPO / "configs").rglob("*.yaml"))
    assert every == sorted(RECIPES + GROUP_FILES), (
        "a YAML outside configs/recipes and the groups is not tested"
    )
    assert RECIPES and GROUP_FILES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(recipe: Path) -> None:
    cfg = load_recipe(recipe)
    assert cfg.stages and OmegaConf.is_readonly(cfg)
    for index in range(len(cfg.stages)):
        assert stage_section(cfg, index, "data").batch_size > 0


# Group files written for one model: they are validated with it (the layout must split its heads).
COMPANIONS = {"parallel/dit_14b_64gpu": ["model=dit_14b"], "data/latents": ["model.text_encoder=precomputed"]}


@pytest.mark.parametrize("group_file", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_group_file_loads_and_validates(group_file: Path) -> None:
    choice = f"{group_file.parent.name}={group_file.stem}"
    companions = COMPANIONS.get(f"{group_file.parent.name}/{group_file.stem}", [])
    if OmegaConf.load(group_file).get("family", "dit") != "dit":  # the base recipe's prediction is dit's
        companions = [*companions, "model.prediction=velocity"]
    cfg = load_recipe(BASE, [choice, *companions])
    assert OmegaConf.to_container(cfg[group_file.parent.name]) is not None


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_tree(tmp_path: Path) -> Path:
    """A config root with one file per group and a recipe composing them."""
    for group in GROUPS:
        source = REPO / "configs" / group
        name = {"model": "dit_tiny", "data": "synthetic", "parallel": "single", "optim": "adamw"}[group]
        write(tmp_path / group / f"{name}.yaml", (source / f"{name}.yaml").read_text())
    write(
        tmp_path / "recipes/run.yaml",
        "defaults:\n  - model: dit_tiny\n  - data: synthetic\n  - parallel: single\n  - optim: adamw\n"
        "name: run\nrun_dir: runs/x\nstages:\n  - {name: sft, objective: flow_matching, steps: 3}\n",
    )
    return tmp_path


def test_unknown_key_in_a_group_file_names_key_and_file(config_tree: Path) -> None:
    model = config_tree / "model/dit_tiny.yaml"
    model.write_text(model.read_text() + "hiden_size: 3\n")
    with pytest.raises(RecipeError, match=r"model/dit_tiny\.yaml: key 'model\.hiden_size'"):
        load_recipe(config_tree / "recipes/run.yaml")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # a wrong type at the top level, then inside a stage
        (
            "name: run\n",
            "name: run\noptim:\n  lr: fast\n",
            r"recipes/run\.yaml: key 'optim\.lr': .*could not be converted",
        ),
        ("steps: 3", "steps: many", r"recipes/run\.yaml: key 'stages\[0\]\.steps'"),
        # a missing required value at the top level, then inside a stage
        ("run_dir: runs/x\n", "", r"recipes/run\.yaml: missing required value\(s\): run_dir"),
        (", steps: 3", "", r"recipes/run\.yaml: missing required value\(s\): stages\[0\]\.steps"),
    ],
    ids=["wrong-type", "wrong-type-in-stage", "missing", "missing-in-stage"],
)
def test_recipe_errors_name_key_and_file(config_tree: Path, old: str, new: str, message: str) -> None:
    recipe = config_tree / "recipes/run.yaml"
    assert old in recipe.read_text()
    recipe.write_text(recipe.read_text().replace(old, new))
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_command_line_errors_name_the_command_line() -> None:
    with pytest.raises(RecipeError, match=r"<command line>: key 'train\.nope'"):
        load_recipe(BASE, ["train.nope=1"])
    with pytest.raises(RecipeError, match=r"<command line>: key 'stages\[0\]\.data\.batch_size'"):
        load_recipe(BASE, ["stages.sft.data.batch_size=lots"])
    with pytest.raises(RecipeError, match="not a key=value"):
        load_recipe(BASE, ["optim.lr"])


def test_invalid_choice_names_the_file_that_set_it(config_tree: Path) -> None:
    model = config_tree / "model/dit_tiny.yaml"
    model.write_text(model.read_text().replace("layout: montage", "layout: spiral"))
    with pytest.raises(RecipeError, match=r"model/dit_tiny\.yaml: key 'model\.positions\.layout': 'spiral'"):
        load_recipe(config_tree / "recipes/run.yaml")


def test_unknown_group_and_missing_group_file(config_tree: Path) -> None:
    with pytest.raises(RecipeError, match=r"model/nonexistent\.yaml: no such file"):
        load_recipe(config_tree / "recipes/run.yaml", ["model=nonexistent"])
    recipe = config_tree / "recipes/run.yaml"
    recipe.write_text(recipe.read_text().replace("  - optim: adamw\n", "  - optimiser: adamw\n"))
    with pytest.raises(RecipeError, match="unknown config group 'optimiser'"):
        load_recipe(recipe)


def test_merge_order_schema_then_groups_then_recipe_then_command_line(config_tree: Path) -> None:
    recipe = config_tree / "recipes/run.yaml"
    assert load_recipe(recipe).optim.lr == 3.0e-4  # configs/optim/adamw.yaml
    recipe.write_text(recipe.read_text() + "optim:\n  lr: 0.002\n")
    assert load_recipe(recipe).optim.lr == 0.002
    cfg = load_recipe(recipe, ["optim.lr=0.005", "stages.sft.optim.lr=0.007"])
    assert cfg.optim.lr == 0.005 and stage_section(cfg, 0, "optim").lr == 0.007
    assert stage_section(cfg, 0, "optim").warmup_steps == cfg.optim.warmup_steps  # unset overrides inherit


def test_no_resolver_evaluates_code(config_tree: Path) -> None:
    recipe = config_tree / "recipes/run.yaml"
    recipe.write_text(recipe.read_text().replace("name: run", "name: ${eval:'1+1'}"))
    with pytest.raises(Exception, match="eval"):
        OmegaConf.to_yaml(load_recipe(recipe), resolve=True)


def test_a_layout_that_cannot_split_the_heads_names_the_key_and_file() -> None:
    with pytest.raises(
        RecipeError, match=r"dit_14b_64gpu.yaml: key 'parallel.tensor_parallel': model.num_heads=4"
    ):
        load_recipe(BASE, ["parallel=dit_14b_64gpu"])  # dit_tiny has 4 heads; TP × CP = 8


def test_tensor_parallel_needs_the_deepspeed_engine() -> None:
    with pytest.raises(RecipeError, match="key 'parallel.engine': is local"):
        load_recipe(BASE, ["parallel.tensor_parallel=2"])


def test_bad_nonfinite_mode_names_the_key_and_file(config_tree: Path) -> None:
    recipe = config_tree / "recipes/run.yaml"
    recipe.write_text(recipe.read_text() + "train:\n  faults:\n    nonfinite: ignore\n")
    with pytest.raises(RecipeError, match=r"recipes/run\.yaml: key 'train\.faults\.nonfinite': 'ignore'"):
        load_recipe(recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.faults.stop_signals=[SIGKILL]", r"key 'train\.faults\.stop_signals': 'SIGKILL'"),
        ("train.faults.spike_factor=0.5", r"key 'train\.faults\.spike_factor': must be > 1"),
        ("train.faults.timeout_s=0", r"key 'train\.faults\.timeout_s': must be positive"),
    ],
)
def test_fault_settings_are_checked(override: str, message: str) -> None:
    assert load_recipe(BASE).train.faults.nonfinite == "skip"
    with pytest.raises(RecipeError, match=r"<command line>: " + message):
        load_recipe(BASE, [override])


def test_a_pretrained_family_refuses_settings_it_was_not_trained_for() -> None:
    with pytest.raises(RecipeError, match="model.prediction.*family wan predicts the velocity"):
        load_recipe(BASE, ["model=wan_tiny"])  # the base recipe predicts data, as dit may
    with pytest.raises(RecipeError, match="model.text_encoder.*precomputed"):
        load_recipe(BASE, ["model=wan_tiny", "model.prediction=velocity", "model.text_encoder=byte"])
    with pytest.raises(RecipeError, match="model.family"):
        load_recipe(BASE, ["model.family=flux"])
