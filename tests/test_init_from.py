"""A stage's ``init_from``: it starts from given weights instead of the previous stage's.

One process reads a training checkpoint directory; two ZeRO-3 ranks read a consolidated file and
keep their partitions of it. Bad paths and weights of another model are named.
"""

from pathlib import Path

import pytest
import torch
from conftest import REPO
from distributed import run_ranks
from test_trainer import TINY, TWO_STAGES, run, shards  # noqa: F401 (shards: the fixture)

from imontage.checkpoint import convert
from imontage.checkpoint import store as ckpt
from imontage.config import load_recipe
from imontage.config.loader import RecipeError
from imontage.train.logger import read_metrics
from imontage.train.trainer import Trainer
from imontage.untrusted import ConversionError

RECIPE = REPO / "configs/recipes/quickstart.yaml"
FROM_TUNE = (
    "stages=[{{name: sft, objective: flow_matching, steps: 4}}, {{name: tune, objective: flow_matching, "
    "steps: 3, init_from: '{path}', optim: {{lr: 0.0005}}}}]"
)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, shards: str) -> Path:  # noqa: F811
    """A chained two-stage run; its step-4 checkpoint (the end of stage sft) is the weights to start from."""
    run_dir = run(tmp_path_factory.mktemp("source"), shards, TWO_STAGES)
    return run_dir / "checkpoints" / ckpt.checkpoint_name(4)


def recipe(run_dir: Path, shards: str, init_from: Path, *extra: str):  # noqa: F811
    overrides = [
        *TINY,
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        FROM_TUNE.format(path=init_from),
        *extra,
    ]
    return load_recipe(RECIPE, overrides)


def test_a_stage_alone_starts_from_its_init_from_weights(tmp_path: Path, shards: str, source: Path) -> None:  # noqa: F811
    weights = ckpt.load_checkpoint(source)[0]["model"]
    cfg = recipe(tmp_path / "run", shards, source, "stage=tune")
    trainer = Trainer(cfg)
    trainer.maybe_resume()  # no checkpoint of stage sft here: init_from stands in for it
    assert trainer.step == 4
    trainer.start_stage(trainer.stages[1])
    model = trainer.backend.model.state_dict()
    assert model.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(model[name], tensor), name
        assert torch.equal(trainer.backend.ema.shadow[name], tensor), name  # the EMA restarts there
    trainer.loader.close()
    trainer.logger.close()

    run(tmp_path / "run", shards, FROM_TUNE.format(path=source), "stage=tune")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [5, 6, 7]


def init_from_on_zero3(
    rank: int, world_size: int, cfg_overrides: list[str], consolidated: str
) -> list[float]:
    import deepspeed
    from safetensors.torch import load_file

    expected = load_file(consolidated)
    trainer = Trainer(load_recipe(RECIPE, cfg_overrides))
    trainer.maybe_resume()
    trainer.start_stage(trainer.stages[1])
    module = trainer.backend.engine.module
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            assert torch.equal(param.detach(), expected[name]), f"rank {rank}: {name}"
    trainer.loader.close()
    trainer.fit()  # the stage trains on from there
    return [r["loss"] for r in read_metrics(trainer.run_dir)] if rank == 0 else []


def test_zero3_ranks_start_from_a_consolidated_file(tmp_path: Path, shards: str, source: Path) -> None:  # noqa: F811
    consolidated = convert.consolidate(source, tmp_path / "sft.safetensors", weights="live")
    cfg = [
        *TINY, f"data.shards={shards}", f"run_dir={tmp_path / 'run'}", FROM_TUNE.format(path=consolidated),
        "stage=tune", "parallel=zero3_dp2", "parallel.device=cpu", "train.sample.every=0",
    ]  # fmt: skip
    losses = run_ranks(init_from_on_zero3, 2, cfg, str(consolidated), timeout=300)[0]
    assert len(losses) == 3 and all(loss == loss for loss in losses)


def test_bad_init_from_is_named(tmp_path: Path, shards: str, source: Path) -> None:  # noqa: F811
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(RecipeError, match=r"stages\[1\]\.init_from.*no such file or directory: .*nowhere"):
        recipe(tmp_path / "run", shards, missing)
    other_model = recipe(tmp_path / "run", shards, source, "stage=tune", "model.depth=1")
    trainer = Trainer(other_model)
    trainer.maybe_resume()
    with pytest.raises(
        ConversionError, match=r"model\.safetensors: tensor 'blocks\.1\..*' is not in the model"
    ):
        trainer.start_stage(trainer.stages[1])
    trainer.logger.close()


def test_a_flow_dpo_stage_may_come_first_with_init_from(tmp_path: Path, shards: str, source: Path) -> None:  # noqa: F811
    dpo_first = f"stages=[{{name: dpo, objective: flow_dpo, steps: 2, init_from: '{source}'}}]"
    cfg = load_recipe(RECIPE, [*TINY, f"data.shards={shards}", f"run_dir={tmp_path}", dpo_first])
    assert cfg.stages[0].init_from == str(source)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.objective.*or give it init_from"):
        load_recipe(RECIPE, [*TINY, "stages=[{name: dpo, objective: flow_dpo, steps: 2}]"])
