"""The Trainer meeting faults on 2 ZeRO-3 ranks: a NaN on one rank, and a stop signal."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from conftest import REPO, PoisonedObjective
from distributed import run_ranks

from imontage.config import load_recipe
from imontage.train.ema import held_tensor
from imontage.train.logger import read_metrics

RECIPE = REPO / "configs/recipes/quickstart.yaml"
NAN_STEP = 5


def overrides(run_dir: Path, shards: str, *extra: str) -> list[str]:
    return [
        "parallel=zero3_dp2", f"data.shards={shards}", "parallel.device=cpu", f"run_dir={run_dir}", "stages.sft.steps=7",
        "train.progress=false", "train.checkpoint.every=0", "train.sample.every=0", "data.max_tokens=768", *extra,
    ]  # fmt: skip


def snapshot(trainer) -> dict[str, torch.Tensor]:
    """This rank's weights (its ZeRO-3 partitions) and optimiser state, copied."""
    module = trainer.backend.engine.module
    state = {f"param.{name}": held_tensor(p).clone() for name, p in module.named_parameters()}
    for index, values in enumerate(trainer.backend.inner_optimizer.state.values()):
        state.update({f"optim.{index}.{key}": torch.as_tensor(v).clone() for key, v in values.items()})
    return state


def nan_on_rank_1(rank: int, world_size: int, run_dir: str, shards: str, mode: str) -> dict:
    from imontage.train.trainer import Trainer

    trainer = Trainer(load_recipe(RECIPE, overrides(Path(run_dir), shards, f"train.faults.nonfinite={mode}")))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    after_step = trainer.after_step

    def recording(metrics: dict[str, float]) -> None:
        after_step(metrics)
        snapshots[trainer.step] = snapshot(trainer)

    trainer.after_step = recording  # type: ignore[method-assign]
    for stage in trainer.stages:
        stage.objective = PoisonedObjective(
            stage.objective, lambda: rank == 1 and trainer.step + 1 == NAN_STEP
        )
    try:
        trainer.fit()
    except Exception as error:  # fail mode: report what was saved before the fault
        return {
            "error": f"{type(error).__name__}: {error}",
            "snapshots": snapshots,
            "latest": snapshot(trainer),
        }
    return {"snapshots": snapshots, "skipped": trainer.guard.skipped_total}


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path, synthetic_shards: str) -> None:
    ranks = run_ranks(nan_on_rank_1, 2, str(tmp_path / "skip"), synthetic_shards, "skip", timeout=300)
    for rank, result in enumerate(ranks):
        before, at, after = (result["snapshots"][s] for s in (NAN_STEP - 1, NAN_STEP, NAN_STEP + 1))
        for name, value in before.items():
            assert torch.equal(at[name], value), f"rank {rank}: {name} changed on the skipped step"
        assert any(not torch.equal(after[name], value) for name, value in at.items())  # training went on
        assert result["skipped"] == 1
    metrics = read_metrics(tmp_path / "skip")
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 0, 0, 1, 1, 1]
    assert metrics[-1]["loss"] == metrics[-1]["loss"]  # finite again after the skip


def test_fail_mode_stops_every_rank_before_the_optimiser_step(tmp_path: Path, synthetic_shards: str) -> None:
    ranks = run_ranks(nan_on_rank_1, 2, str(tmp_path / "fail"), synthetic_shards, "fail", timeout=300)
    for rank, result in enumerate(ranks):
        assert "NumericalFault" in result["error"] and f"step {NAN_STEP}" in result["error"], result["error"]
        assert max(result["snapshots"]) == NAN_STEP - 1
        for name, value in result["snapshots"][NAN_STEP - 1].items():
            assert torch.equal(result["latest"][name], value), f"rank {rank}: {name} changed"


def signal_at_step_3(rank: int, world_size: int, run_dir: str, shards: str) -> dict:
    from imontage.train.trainer import RunStopped, Trainer

    trainer = Trainer(load_recipe(RECIPE, overrides(Path(run_dir), shards)))
    after_step = trainer.after_step

    def signalled(metrics: dict[str, float]) -> None:
        after_step(metrics)
        if rank == 1 and trainer.step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # what `scancel --signal=USR2` delivers

    trainer.after_step = signalled  # type: ignore[method-assign]
    try:
        trainer.fit()
    except RunStopped as stop:
        return {"step": trainer.step, "exit_code": stop.exit_code, "message": str(stop)}
    return {"step": trainer.step, "exit_code": 0}


def test_a_stop_signal_on_one_rank_stops_every_rank_after_a_checkpoint(
    tmp_path: Path, synthetic_shards: str
) -> None:
    from imontage.checkpoint import store as ckpt
    from imontage.train.resilience import ExitCode

    run_dir = tmp_path / "run"
    ranks = run_ranks(signal_at_step_3, 2, str(run_dir), synthetic_shards, timeout=300)
    assert [r["step"] for r in ranks] == [3, 3]
    assert {r["exit_code"] for r in ranks} == {int(ExitCode.STOPPED)}  # not under SLURM: nothing to requeue
    assert "SIGUSR2 received here" in ranks[1]["message"]
    assert ckpt.find_resume_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints/step_000003"
