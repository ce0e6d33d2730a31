"""Held-out validation: the loss at fixed timesteps and noise, per task, alike under every parallel
layout and after a kill and resume; it changes no training step; a flow_dpo stage's preference
accuracy; the recipe's mistakes as one-line errors; the commands of docs/training.md.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from distributed import run_ranks
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_trainer import TINY, final_tensors

from imontage.config import load_recipe
from imontage.config.loader import RecipeError
from imontage.dataprep.synthetic import write_shards
from imontage.models.common.sequence import Sample
from imontage.train import cli
from imontage.train.logger import read_metrics
from imontage.train.trainer import train
from imontage.train.validation import HeldOutSet, preference_metrics

QUICKSTART = REPO / "configs/recipes/quickstart.yaml"
# How far the loss of one set of weights may move when TP+SP reorders the forward pass's sums.
TP_TOLERANCE = 1e-6
DREAMONTAGE = REPO / "configs/recipes/dreamontage.yaml"
TASKS = ("edit", "video")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Training shards and held-out shards per task: 3 edits and a clip (with ``batch_size=2``: 3
    batches, so that 2 data-parallel ranks get 2 and 1), and 3 preference pairs."""
    root = tmp_path_factory.mktemp("validation_data")
    write_shards(root / "train", samples=20, per_shard=7, seed=0, progress=False)
    write_shards(root / "edit", samples=3, per_shard=7, seed=11, tasks=["edit"], progress=False)
    write_shards(root / "video", samples=1, per_shard=7, seed=12, tasks=["video"], progress=False)
    write_shards(root / "pairs", samples=8, per_shard=8, seed=13, tasks=["edit_pair"], progress=False)
    write_shards(root / "heldout_pairs", samples=3, per_shard=8, seed=14, tasks=["edit_pair"], progress=False)
    return {
        name: f"{root / name}/train-*.tar" for name in ("train", "edit", "video", "pairs", "heldout_pairs")
    }


def validated(data: dict[str, str], run_dir: Path, steps: int, *extra: str) -> list[str]:
    """The quickstart recipe at the tiny size, validating per task at its start and every 2 steps."""
    datasets = ", ".join(f"{{task: {task}, shards: '{data[task]}'}}" for task in TASKS)
    return [
        *TINY, f"data.shards={data['train']}", f"run_dir={run_dir}", f"stages.sft.steps={steps}",
        "train.sample.every=0", "validation.every=2", "validation.at_start=true", "validation.batch_size=2",
        "validation.timesteps=[0.3,0.8]", f"validation.datasets=[{datasets}]", *extra,
    ]  # fmt: skip


def validation_records(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the ``val/...`` values metrics.jsonl holds for it."""
    records = {r["step"]: {k: v for k, v in r.items() if k.startswith("val/")} for r in read_metrics(run_dir)}
    return {step: values for step, values in records.items() if values}


def assert_same_training(a: Path, b: Path) -> None:
    """The same losses at every step and the same final weights, EMA and optimiser state, bit for bit."""
    assert [(r["step"], r["loss"]) for r in read_metrics(a) if "loss" in r] == [
        (r["step"], r["loss"]) for r in read_metrics(b) if "loss" in r
    ]
    tensors_a, tensors_b = final_tensors(a), final_tensors(b)
    for group in ("model", "ema", "optimizer"):
        assert tensors_a[group].keys() == tensors_b[group].keys()
        assert all(torch.equal(tensors_a[group][k], tensors_b[group][k]) for k in tensors_a[group]), group


# ---------------------------------------------------------------------------------- one process


def test_validation_changes_no_training_step_and_repeats_after_a_resume(
    tmp_path: Path, data: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    plain = train(load_recipe(QUICKSTART, [*validated(data, tmp_path / "plain", 4), "validation.every=0",
                                            "validation.at_start=false"]))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="imontage.train.trainer"):
        straight = train(
            load_recipe(QUICKSTART, validated(data, tmp_path / "straight", 4, "validation.preview_every=4"))
        )
    killed = tmp_path / "killed"
    train(load_recipe(QUICKSTART, validated(data, killed, 4, "train.stop_at_step=1")))
    train(load_recipe(QUICKSTART, validated(data, killed, 4)))

    # Validation draws nothing from the training generator: the training run is bit for bit the same.
    assert_same_training(plain, straight)
    assert_same_training(straight, killed)
    values = validation_records(straight)
    assert list(values) == [0, 2, 4]  # at the start, then every 2 steps
    assert values == validation_records(killed)  # steps 2 and 4 after the resume at 1: bit for bit
    for step, record in values.items():
        assert set(record) == {"val/loss", "val/loss/edit", "val/loss/video"}, step
        assert all(math.isfinite(v) and v > 0 for v in record.values())
    assert values[4]["val/loss"] < values[0]["val/loss"]  # the model learns the held-out tasks too
    assert len({r["val/loss"] for r in values.values()}) == 3

    events = EventAccumulator(str(straight / "tensorboard")).Reload()
    assert {"val/loss", "val/loss/edit", "val/loss/video"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/loss/edit")] == [0, 2, 4]
    assert (straight / "samples/val_step_000004.png").stat().st_size > 0  # the held-out previews
    assert "val_samples" in events.Tags()["images"]
    lines = [r.getMessage() for r in caplog.records if "validation:" in r.getMessage()]
    assert re.fullmatch(r"step 4 \(stage sft\) validation: loss \S+ \(edit \S+, video \S+\)", lines[-1])


def test_a_flow_dpo_stage_reports_its_preference_accuracy(tmp_path: Path, data: dict[str, str]) -> None:
    """SFT 2 steps, DPO 2 steps validated on held-out pairs (the DPO stage's own validation): at the
    stage's start policy = reference, so every margin is 0 and no pair is ordered yet."""
    run_dir = tmp_path / "dpo"
    heldout = f"[{{task: edit_pair, shards: '{data['heldout_pairs']}'}}]"
    overrides = [
        *TINY, f"run_dir={run_dir}", f"data.shards={data['train']}", f"stages.dpo.data.shards={data['pairs']}",
        "model.prediction=velocity", "stages.sft.steps=2", "stages.dpo.steps=2", "stages.dpo.optim.lr=1.0e-2",
        "stages.dpo.optim.warmup_steps=0", "dpo.beta=2000", "data.batch_size=4", "train.sample.every=0",
        f"stages.dpo.validation.datasets={heldout}", "stages.dpo.validation.every=2",
        "stages.dpo.validation.at_start=true", "stages.dpo.validation.batch_size=4",
    ]  # fmt: skip
    train(load_recipe(DREAMONTAGE, overrides))
    values = validation_records(run_dir)
    assert list(values) == [2, 4]  # the SFT stage validates nothing
    assert values[2]["val/dpo/accuracy"] == 0.0 and values[2]["val/dpo/reward_margin"] == 0.0
    record = values[4]
    assert set(record) == {"val/loss", "val/loss/edit_pair", "val/dpo/accuracy", "val/dpo/reward_margin",
                           "val/dpo/accuracy/edit_pair"}  # fmt: skip
    assert record["val/dpo/reward_margin"] != 0.0
    assert record["val/dpo/accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)  # of 3 held-out pairs


def test_the_preference_accuracy_is_the_share_of_pairs_the_mean_margin_orders() -> None:
    """Two pairs at two timesteps, errors by hand: pair 0's gaps (e_w − e_w_ref) − (e_l − e_l_ref) are
    −0.1 and −0.3 (margin −β/2 · −0.2 = +0.2 at β = 2), pair 1's +0.2 and −0.1 (margin −0.05)."""
    # rows: win0, lose0, win1, lose1; [timesteps, (squared error, values, reference squared error)]
    values = 10.0
    errors = torch.tensor([[0.1, 0.1], [0.4, 0.6], [0.5, 0.2], [0.3, 0.3]], dtype=torch.float64)
    reference = torch.tensor([[0.2, 0.2], [0.4, 0.4], [0.3, 0.3], [0.3, 0.3]], dtype=torch.float64)
    table = torch.stack([errors * values, torch.full_like(errors, values), reference * values], dim=2)
    heldout = HeldOutSet(["a", "b"], [Sample([])] * 4, ["a", "a", "b", "b"], [], pairs=True)
    result = preference_metrics(table, heldout, beta=2.0)
    assert result["dpo/accuracy"] == 0.5
    assert result["dpo/reward_margin"] == pytest.approx((0.2 - 0.05) / 2, abs=1e-12)
    assert result["dpo/accuracy/a"] == 1.0 and result["dpo/accuracy/b"] == 0.0


# ------------------------------------------------------------------------------ parallel layouts


def validate_on_ranks(rank: int, world_size: int, straight: Path, killed: Path, runs: list[list[str]]) -> Any:
    """In one launch: a straight run, then a run killed after step 2 and resumed (rank 0's records)."""
    from megatron.core import parallel_state

    for overrides in runs:
        if parallel_state.model_parallel_is_initialized():  # the previous run's groups
            parallel_state.destroy_model_parallel()
        train(load_recipe(QUICKSTART, overrides))
    return (validation_records(straight), validation_records(killed)) if rank == 0 else None


_SINGLE: dict[str, Path] = {}


@pytest.mark.parametrize("layout", ["zero3_dp2", "tp2_sp", "ulysses2"])
def test_the_validation_loss_is_the_same_under_every_layout(
    tmp_path: Path, data: dict[str, str], layout: str
) -> None:
    """One process trains 4 steps (the DiT's output layers start at zero, so the seeded weights would
    predict 0 in every layout); each layout starts from its step-4 checkpoint (stage init_from) and
    validates at its start: the numbers equal one process's at step 4, bit for bit under ZeRO-3 data
    parallelism (the set split over the ranks, 3 batches on 2 ranks) and Ulysses, and within what
    TP+SP changes in the forward pass's rounding. A kill after step 2 and a resume give each layout
    its own numbers again, bit for bit."""
    if "single" not in _SINGLE:
        _SINGLE["single"] = train(load_recipe(QUICKSTART, [*validated(data, tmp_path / "single", 4),
                                                           "parallel.device=cpu"]))  # fmt: skip
    single = _SINGLE["single"]
    reference = validation_records(single)[4]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    start = [
        f"stages.sft.init_from={single / 'checkpoints/step_000004'}",
        f"parallel={layout}",
        "parallel.device=cpu",
    ]
    runs = [
        [*validated(data, straight, 4), *start],
        [*validated(data, killed, 4), *start, "train.stop_at_step=2"],
        [*validated(data, killed, 4), *start],
    ]
    values, resumed = run_ranks(validate_on_ranks, 2, straight, killed, runs, timeout=400)[0]
    assert list(values) == [0, 2, 4] and set(values[0]) == {"val/loss", "val/loss/edit", "val/loss/video"}
    assert resumed == values  # kill and resume: bit for bit
    if layout == "tp2_sp":  # RowParallelLinear adds two ranks' partial sums: 8e-10 apart measured
        assert values[0] == pytest.approx(reference, rel=TP_TOLERANCE) and values[0] != reference
    else:  # ZeRO-3 gathers whole weights, Ulysses moves whole heads: no sum is reordered
        assert values[0] == reference
    assert values[4] != values[0]  # it trains on


# --------------------------------------------------------------------------------------- errors


def test_validation_mistakes_are_one_line_errors_naming_the_key(
    tmp_path: Path, data: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cocktail = REPO / "configs/recipes/imontage_cocktailmix.yaml"
    with pytest.raises(RecipeError) as unknown:
        load_recipe(cocktail, ["validation.every=10", "validation.datasets=[{task: edti, shards: x.tar}]"])
    assert str(unknown.value) == (
        "<command line>: key 'validation.datasets[0].task': unknown task 'edti': "
        "the stage's data mixture has edit, montage, video"
    )
    with pytest.raises(
        RecipeError, match=r"key 'validation.datasets': validation is on .* no held-out shards"
    ):
        load_recipe(QUICKSTART, ["validation.every=10"])
    missing = f"{tmp_path}/nowhere/*.tar"
    code = cli.main([str(QUICKSTART), *validated(data, tmp_path / "run", 2),
                     f"stages.sft.validation.datasets=[{{task: edit, shards: '{missing}'}}]"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == (
        f"imontage-train: recipe quickstart: key 'stages[0].validation.datasets[0].shards': "
        f"shard spec item '{missing}' matches no file"
    )
    assert not (tmp_path / "run/metrics.jsonl").exists()  # refused before the first step
    with pytest.raises(RecipeError, match=r"key 'stages\[1\].validation.batch_size': 3: a flow_dpo stage"):
        load_recipe(DREAMONTAGE, [f"stages.dpo.validation.datasets=[{{task: p, shards: '{data['pairs']}'}}]",
                                  "stages.dpo.validation.every=1", "stages.dpo.validation.batch_size=3"])  # fmt: skip
    # A stage of one A14B expert: the default timesteps need not fit its range while validation is
    # off; once it is on, t outside the range the expert is trained on is named.
    expert = ["model=wan2.2_t2v_a14b", "model.expert=transformer", "model.prediction=velocity"]
    load_recipe(QUICKSTART, expert)
    with pytest.raises(RecipeError, match=r"key 'validation.timesteps': \[0.1, 0.3, 0.5, 0.7\] outside"):
        load_recipe(
            QUICKSTART, [*expert, "validation.every=5", "validation.datasets=[{task: a, shards: x.tar}]"]
        )
    load_recipe(QUICKSTART, [*expert, "validation.every=5", "validation.datasets=[{task: a, shards: x.tar}]",
                             "validation.timesteps=[0.9, 0.95]"])  # fmt: skip


# --------------------------------------------------------------------------------- the docs' commands


def doc_commands() -> list[str]:
    """The commands of docs/training.md's held-out validation block, continuation lines joined."""
    text = (REPO / "docs/training.md").read_text()
    block = text.split("## Held-out validation", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_commands_of_docs_training_md_run(tmp_path: Path, data: dict[str, str]) -> None:
    """The held-out shards as the docs make them (fewer samples here), then the recipe with them at
    the tiny size: it logs the loss per task."""
    commands = doc_commands()
    assert [c.split()[:2] for c in commands] == [["python", "tools/make_synthetic.py"]] * 2 + [
        ["imontage-train", "configs/recipes/quickstart.yaml"]
    ]
    for command in commands[:2]:
        argv = shlex.split(command.replace("data/", f"{tmp_path}/data/"))
        argv[argv.index("--samples") + 1] = "3"
        subprocess.run([sys.executable, *argv[1:], "--no-progress"], cwd=REPO, check=True)
    argv = shlex.split(commands[2].replace("data/synthetic_val", f"{tmp_path}/data/synthetic_val"))
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.shards={data['train']}", f"run_dir={run_dir}", "stages.sft.steps=2",
                 "train.sample.every=0", "validation.every=2", "validation.preview_every=2"]  # fmt: skip
    assert cli.main([str(REPO / argv[1]), *argv[2:], *overrides]) == 0
    values = validation_records(run_dir)
    assert list(values) == [0, 2]
    assert {"val/loss", "val/loss/edit", "val/loss/video"} == set(values[2])
    assert (run_dir / "samples/val_step_000002.png").exists()
