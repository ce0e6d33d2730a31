"""tools/plan.py's communication figures against the bytes counted in a real 2-rank step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_model_config
from distributed import run_ranks
from test_parallelize import forward_backward, reference_model, uneven_batch

from imontage.parallel.parallelize import parallelize_dit
from imontage.parallel.plan import ModelShape, bytes_by_op, communication_plan, count_collectives

LAYOUTS = {  # name: (tensor, context, sequence_parallel, activation_checkpointing)
    "tp2": (2, 1, False, False),
    "tp2_sp": (2, 1, True, False),
    "tp2_sp_recompute": (2, 1, True, True),
    "ulysses2": (1, 2, False, False),
}


def counted_step(
    rank: int, world_size: int, tensor: int, context: int, sequence: bool, recompute: bool
) -> dict:
    from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

    init_process_groups(ParallelLayout(tensor, context, 1), torch.device("cpu"), launch_env())
    model = parallelize_dit(reference_model("montage"), tensor, context, sequence, recompute)
    with count_collectives() as count:
        forward_backward(model, "montage")
    return {"bytes": dict(count.bytes), "calls": dict(count.calls)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plan_matches_the_bytes_a_real_step_exchanges(layout: str) -> None:
    tensor, context, sequence, recompute = LAYOUTS[layout]
    ranks = run_ranks(counted_step, 2, tensor, context, sequence, recompute)
    tokens = uneven_batch("montage").tokens.shape[0]
    plan = communication_plan(
        ModelShape.from_config(tiny_model_config()), tokens, tensor, context, sequence, recompute
    )
    expected = bytes_by_op(plan)
    for rank, counted in enumerate(ranks):
        assert counted["bytes"] == expected, f"rank {rank}: counted {counted['bytes']}, planned {expected}"
    assert sum(item.count for item in plan) == sum(ranks[0]["calls"].values())


def test_plan_pads_the_sequence_to_whole_shards() -> None:
    shape = ModelShape(hidden_size=32, num_heads=4, depth=1, patch_features=48)
    (gather,) = [c for c in communication_plan(shape, 9, context=2) if c.where == "outputs"]
    assert gather.numel == 10 * 48  # 9 tokens padded to 10 for two shards
    assert communication_plan(shape, 9) == []  # one rank: nothing to exchange


def test_plan_cli_prints_a_table_for_a_recipe_layout() -> None:
    result = subprocess.run(
        [sys.executable, "tools/plan.py", "--model", "dit_1b", "--tokens", "16384", "--parallel", "tp2_sp"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "block.qkv" in result.stdout and "reduce_scatter" in result.stdout
    assert "tensor_parallel=2" in result.stdout
