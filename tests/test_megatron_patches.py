"""Each megatron_patches patch is needed: its 2-rank gloo test fails without it and passes with it."""

import pytest
import torch
from distributed import RankError, run_ranks

import megatron_patches
from megatron_patches import cpu_buffers

IN, HIDDEN, TOKENS = 8, 16, 6


def tp2_sequence_parallel_linears(rank: int, world_size: int, patched: bool) -> dict[str, torch.Tensor]:
    """Column- then Row-parallel linear with sequence parallelism: each rank holds TOKENS/2 tokens."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    if patched:
        megatron_patches.apply(["cpu_buffers"])
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    config = ModelParallelConfig(
        tensor_model_parallel_size=world_size, sequence_parallel=True, use_cpu_initialization=True
    )
    torch.manual_seed(0)  # the CPU initialisation draws the full weight, then keeps this rank's part
    init = torch.nn.init.xavier_uniform_
    column = tensor_parallel.ColumnParallelLinear(IN, HIDDEN, config=config, init_method=init, bias=True)
    row = tensor_parallel.RowParallelLinear(
        HIDDEN, IN, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
    )
    x = torch.randn(TOKENS, 1, IN, generator=torch.Generator().manual_seed(1))
    shard = x.chunk(world_size)[rank].clone().requires_grad_(True)  # [TOKENS/2, 1, IN]
    hidden, _ = column(shard)
    out, _ = row(hidden)
    out.square().sum().backward()
    return {
        "out": out.detach(),
        "grad": shard.grad,
        "w1": column.weight.detach(),
        "b1": column.bias.detach(),
        "w2": row.weight.detach(),
        "b2": row.bias.detach(),
        "x": x,
    }


def test_sequence_parallel_fails_on_cpu_without_cpu_buffers() -> None:
    with pytest.raises(RankError, match="CUDA"):
        run_ranks(tp2_sequence_parallel_linears, 2, False)


def test_sequence_parallel_matches_one_process_with_cpu_buffers() -> None:
    ranks = run_ranks(tp2_sequence_parallel_linears, 2, True)
    x = ranks[0]["x"].clone().requires_grad_(True)
    w1 = torch.cat([r["w1"] for r in ranks])  # column parallel: output rows split
    b1 = torch.cat([r["b1"] for r in ranks])
    w2 = torch.cat([r["w2"] for r in ranks], dim=1)  # row parallel: input columns split
    out = (x @ w1.T + b1) @ w2.T + ranks[0]["b2"]
    out.square().sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad)


def seeded_draws(rank: int, world_size: int, patched: bool) -> dict[str, torch.Tensor]:
    """Draws around a fork of the tensor-parallel RNG state after megatron's model-parallel seeding."""
    from megatron.core import parallel_state, tensor_parallel

    if patched:
        megatron_patches.apply(["cpu_rng"])
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    before = torch.rand(3)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    after = torch.rand(3)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside_again = torch.rand(3)
    return {"before": before, "inside": inside, "after": after, "inside_again": inside_again}


def test_model_parallel_seed_fails_on_cpu_without_cpu_rng() -> None:
    with pytest.raises(RankError, match="CUDA"):
        run_ranks(seeded_draws, 2, False)


def test_rng_tracker_forks_per_tensor_parallel_rank_with_cpu_rng() -> None:
    ranks = run_ranks(seeded_draws, 2, True)
    data_parallel = torch.Generator().manual_seed(1234)
    expected_outer = torch.rand(6, generator=data_parallel)
    for rank, draws in enumerate(ranks):
        # The fork does not disturb the data-parallel stream...
        assert torch.equal(torch.cat([draws["before"], draws["after"]]), expected_outer)
        # ...and inside it each tensor-parallel rank continues its own stream (seed + 2718 + rank).
        tensor_parallel = torch.rand(6, generator=torch.Generator().manual_seed(1234 + 2718 + rank))
        assert torch.equal(torch.cat([draws["inside"], draws["inside_again"]]), tensor_parallel)
    assert not torch.equal(ranks[0]["inside"], ranks[1]["inside"])


def test_apply_is_explicit_idempotent_and_reversible() -> None:
    from megatron.core.tensor_parallel import mappings

    assert megatron_patches.applied() == [] and mappings.torch is torch  # nothing on import
    try:
        assert megatron_patches.apply() == ["cpu_buffers", "cpu_rng"]
        proxy = mappings.torch
        assert isinstance(proxy, cpu_buffers.TorchWithCpuDevice)
        assert megatron_patches.apply() == ["cpu_buffers", "cpu_rng"]
        assert mappings.torch is proxy  # not wrapped twice
        assert mappings.torch.cuda.current_device() == torch.device("cpu")
        assert mappings.torch.float32 is torch.float32  # everything else is torch's own
    finally:
        megatron_patches.revert()
    assert mappings.torch is torch and megatron_patches.applied() == []


def test_unsupported_megatron_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("megatron_patches.guard.megatron_version", lambda: (0, 99, 0))
    with pytest.raises(RuntimeError, match="0.99.0 is not one the CPU patches support"):
        megatron_patches.apply()
    with pytest.raises(KeyError, match="unknown megatron patch"):
        megatron_patches.apply(["gpu_magic"])
