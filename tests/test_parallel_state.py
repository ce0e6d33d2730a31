"""Launch environments, layout validation, and megatron-core groups in TP, CP, DP order."""

import os
import stat
from pathlib import Path

import pytest
import torch
from distributed import run_ranks

from imontage.parallel.state import (
    LaunchEnv,
    ParallelLayout,
    export_launch_env,
    init_process_groups,
    launch_env,
)


def test_torchrun_environment() -> None:
    env = launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    )
    assert env == LaunchEnv(3, 8, 1, "n0", 1234, "torchrun")


def test_slurm_environment_takes_the_first_host_from_scontrol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scontrol = tmp_path / "scontrol"  # SLURM's own expansion of the node list, faked for this test
    scontrol.write_text('#!/bin/sh\n[ "$3" = "gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[07-08]",
               "SLURM_JOB_ID": "123456"}  # fmt: skip
    assert launch_env(environ) == LaunchEnv(5, 16, 5, "gpu07", 20000 + 123456 % 20000, "slurm")


def test_slurm_launch_is_exported_as_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed refuses to start without LOCAL_RANK, which srun does not set."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "stale")  # recorded, so the test's own values are undone afterwards
    export_launch_env(LaunchEnv(5, 16, 1, "gpu07", 23456, "slurm"))
    assert launch_env() == LaunchEnv(5, 16, 1, "gpu07", 23456, "torchrun")


def test_single_process_and_bad_values() -> None:
    assert launch_env({}).launcher == "single" and launch_env({}).world_size == 1
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_layouts_that_cannot_work_are_refused() -> None:
    assert ParallelLayout.for_world(8, tensor=2, context=2, num_heads=8) == ParallelLayout(2, 2, 2)
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        ParallelLayout.for_world(6, tensor=4, context=1, num_heads=8)
    with pytest.raises(ValueError, match="model.num_heads=6 is not divisible"):
        ParallelLayout.for_world(8, tensor=2, context=2, num_heads=6)


def group_ranks(rank: int, world_size: int, tensor: int, context: int) -> dict[str, list[int]]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    layout = ParallelLayout.for_world(world_size, tensor, context, num_heads=4)
    env = LaunchEnv(rank, world_size, 0, "127.0.0.1", 0, "torchrun")  # the group already exists
    init_process_groups(layout, torch.device("cpu"), env)
    return {
        "tp": dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()),
        "cp": dist.get_process_group_ranks(parallel_state.get_context_parallel_group()),
        "dp": dist.get_process_group_ranks(parallel_state.get_data_parallel_group()),
    }


@pytest.mark.parametrize(("tensor", "context", "rank0", "rank1"), [
    # TP fastest, then CP, then DP: with 2 ranks the one dimension of size 2 holds both.
    (2, 1, {"tp": [0, 1], "cp": [0], "dp": [0]}, {"tp": [0, 1], "cp": [1], "dp": [1]}),
    (1, 2, {"tp": [0], "cp": [0, 1], "dp": [0]}, {"tp": [1], "cp": [0, 1], "dp": [1]}),
    (1, 1, {"tp": [0], "cp": [0], "dp": [0, 1]}, {"tp": [1], "cp": [1], "dp": [0, 1]}),
])  # fmt: skip
def test_megatron_groups_follow_the_layout(tensor: int, context: int, rank0: dict, rank1: dict) -> None:
    assert run_ranks(group_ranks, 2, tensor, context) == [rank0, rank1]
