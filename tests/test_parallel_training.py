"""The Trainer on DeepSpeed ZeRO-3 over 2 gloo ranks, from the shipped parallel layouts.

DP=2 resumes bit for bit from its own checkpoint; TP=2 (with and without sequence parallelism)
and Ulysses=2 train end to end under ZeRO-3, checkpoints and samples included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO
from distributed import run_ranks

from imontage.checkpoint import store as ckpt
from imontage.config import load_recipe
from imontage.train.logger import read_metrics

RECIPE = REPO / "configs/recipes/quickstart.yaml"


def train_run(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    from imontage.train.trainer import train

    run_dir = train(load_recipe(RECIPE, overrides))
    return [record["loss"] for record in read_metrics(run_dir)] if rank == 0 else []


def overrides(run_dir: Path, shards: str, layout: str, steps: int, *extra: str) -> list[str]:
    return [
        f"data.shards={shards}",
        f"parallel={layout}",
        "parallel.device=cpu",
        f"run_dir={run_dir}",
        f"stages.sft.steps={steps}",
        "train.progress=false",
        "train.checkpoint.every=4",
        "train.sample.every=0",
        "data.max_tokens=768",
        *extra,
    ]


def test_dp2_zero3_resumes_with_identical_losses(tmp_path: Path, synthetic_shards: str) -> None:
    shards = synthetic_shards
    straight = run_ranks(train_run, 2, overrides(tmp_path / "straight", shards, "zero3_dp2", 8), timeout=300)[
        0
    ]
    stopped = tmp_path / "stopped"
    first = run_ranks(
        train_run, 2, overrides(stopped, shards, "zero3_dp2", 8, "train.stop_at_step=4"), timeout=300
    )[0]
    assert len(first) == 4 and (stopped / "checkpoints/step_000004/manifest.json").exists()
    resumed = run_ranks(train_run, 2, overrides(stopped, shards, "zero3_dp2", 8), timeout=300)[0]
    assert len(straight) == 8 and straight[-1] < straight[0]
    assert resumed == straight  # steps 1-4 from the first run, 5-8 after the resume: bit for bit
    checkpoint = stopped / "checkpoints/step_000008"
    ckpt.verify_checkpoint(checkpoint)
    names = {p.name for p in checkpoint.iterdir()}
    assert {"state.json", "rank_00000.json", "rank_00001.json", "rank_00000.safetensors"} <= names
    assert any(name.endswith("optim_states.pt") for name in names)  # DeepSpeed's ZeRO shards
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["layout"] == {
        "tensor_parallel": 1,
        "context_parallel": 1,
        "data_parallel": 2,
        "zero_stage": 3,
    }


_ONE_PROCESS: dict[int, list[float]] = {}


def one_process_losses(tmp_path: Path, shards: str, accumulation: int) -> list[float]:
    """The same recipe on one process (engine local): the reference of every DP=1 layout."""
    if accumulation not in _ONE_PROCESS:
        run_dir = tmp_path / f"single-{accumulation}"
        _ONE_PROCESS[accumulation] = train_run(
            0, 1, overrides(run_dir, shards, "single", 6, f"train.grad_accumulation={accumulation}")
        )
    return _ONE_PROCESS[accumulation]


@pytest.mark.parametrize(("layout", "accumulation"), [("tp2", 1), ("tp2_sp", 1), ("ulysses2", 1), ("tp2", 2)])
def test_parallel_layout_trains_under_zero3_like_one_process(
    tmp_path: Path, synthetic_shards: str, layout: str, accumulation: int
) -> None:
    """TP=2 or CP=2 leaves DP=1: both ranks read the one process's batches and draw its noise.

    With 2 micro-batches per step, DeepSpeed's gradient accumulation must equal the local one.
    """
    run_dir = tmp_path / layout
    extra = ("train.sample.every=6", f"train.grad_accumulation={accumulation}")
    losses = run_ranks(train_run, 2, overrides(run_dir, synthetic_shards, layout, 6, *extra), timeout=300)[0]
    assert losses == pytest.approx(one_process_losses(tmp_path, synthetic_shards, accumulation), rel=1e-4)
    assert (run_dir / "samples/step_000006.png").exists()  # sampled with the EMA weights on both ranks
    ckpt.verify_checkpoint(run_dir / "checkpoints/step_000006")


def test_a_checkpoint_of_another_layout_is_refused(tmp_path: Path, synthetic_shards: str) -> None:
    shards = synthetic_shards
    run_dir = tmp_path / "run"
    run_ranks(train_run, 2, overrides(run_dir, shards, "zero3_dp2", 4), timeout=300)
    with pytest.raises(
        Exception, match=r"saved under layout .*'data_parallel': 2.* this run is .*'tensor_parallel': 2"
    ):
        run_ranks(train_run, 2, overrides(run_dir, shards, "tp2", 8), timeout=300)
