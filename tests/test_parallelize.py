"""parallelize_dit on 2 gloo ranks against the single-process model built from the same seed.

TP=2 (with and without sequence parallelism) and Ulysses=2: the forward output, the gradient of
the input tokens and every parameter's gradient match one process within float32 tolerance, and
the initial weights are the single-device weights, cut.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config
from distributed import run_ranks

from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.models.dit.model import DiT
from imontage.parallel.parallelize import TensorSplit, check_layout, parallelize_dit, tensor_split

TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


def reference_model(layout: str) -> DiT:
    """Random weights everywhere (adaLN-zero would make the blocks identities and hide mistakes)."""
    torch.manual_seed(0)
    model = DiT(tiny_model_config(positions={"layout": layout}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def uneven_batch(layout: str):
    """Three samples of odd total length: images and a clip, conditions and targets, text."""
    g = torch.Generator().manual_seed(2)

    def seg(kind: str, role: str, t: int, h: int, w: int) -> Segment:
        return Segment(kind, role, torch.randn(3, t, h, w, generator=g))

    samples = [
        Sample([Segment("text", text="make it blue!"), seg("image", "condition", 1, 8, 8), seg("image", "target", 1, 8, 12)]),
        Sample([Segment("text", text="clip"), seg("video", "target", 3, 8, 8)]),
        Sample([seg("image", "condition", 1, 4, 8), seg("image", "condition", 1, 8, 4), seg("image", "target", 1, 8, 8)]),
    ]  # fmt: skip
    batch = pack_samples(samples, packing_spec(tiny_model_config(positions={"layout": layout})))
    timesteps = torch.rand(batch.tokens.shape[0], generator=g) * batch.target_mask
    return batch.replace(timesteps=timesteps, tokens=batch.tokens.clone().requires_grad_(True))


def output_weights(rows: int) -> torch.Tensor:
    return torch.randn(rows, 48, generator=torch.Generator().manual_seed(3))


def forward_backward(model: DiT, layout: str) -> dict:
    batch = uneven_batch(layout)
    out = model(batch)
    (out * output_weights(out.shape[0])).sum().backward()
    return {
        "out": out.detach(),
        "input_grad": batch.tokens.grad,
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
    }


def parallel_run(rank: int, world_size: int, tensor: int, context: int, sequence: bool, layout: str) -> dict:
    from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

    init_process_groups(
        ParallelLayout(tensor, context, world_size // (tensor * context)), torch.device("cpu"), launch_env()
    )
    model = parallelize_dit(reference_model(layout), tensor, context, sequence)
    return forward_backward(model, layout)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE, msg=lambda m: f"{what}: {m}")


def test_uneven_batch_does_not_split_evenly() -> None:
    assert uneven_batch("montage").tokens.shape[0] % 2 == 1


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_matches_one_process(sequence_parallel: bool) -> None:
    ranks = run_ranks(parallel_run, 2, 2, 1, sequence_parallel, "montage")
    expected = forward_backward(reference_model("montage"), "montage")
    for rank, result in enumerate(ranks):
        assert_close(result["out"], expected["out"], f"rank {rank} output")
        assert_close(result["input_grad"], expected["input_grad"], f"rank {rank} input gradient")
    for name, weight in expected["weights"].items():
        split = tensor_split(name)
        if split is None:  # whole on every rank
            for rank, result in enumerate(ranks):
                assert torch.equal(result["weights"][name], weight), f"rank {rank} {name}"
                assert_close(result["grads"][name], expected["grads"][name], f"rank {rank} grad of {name}")
        else:
            assert torch.equal(split.unshard([r["weights"][name] for r in ranks]), weight), name
            grad = split.unshard([r["grads"][name] for r in ranks])
            assert_close(grad, expected["grads"][name], f"gathered grad of {name}")
    assert any(tensor_split(name) for name in expected["weights"])  # something was split


@pytest.mark.parametrize("layout", ["montage", "editverse4d"])
def test_ulysses_matches_one_process_on_uneven_sequences(layout: str) -> None:
    ranks = run_ranks(parallel_run, 2, 1, 2, False, layout)
    expected = forward_backward(reference_model(layout), layout)
    for rank, result in enumerate(ranks):
        assert_close(result["out"], expected["out"], f"rank {rank} output")
        for name, weight in expected["weights"].items():
            assert torch.equal(result["weights"][name], weight), f"rank {rank} {name}"
    # Each context-parallel rank holds its tokens' share of every gradient: the shares add up.
    assert_close(ranks[0]["input_grad"] + ranks[1]["input_grad"], expected["input_grad"], "input gradient")
    for name, grad in expected["grads"].items():
        assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], grad, f"summed grad of {name}")
        assert not torch.equal(ranks[0]["grads"][name], grad), f"{name}: rank 0 alone has the whole gradient"


def test_qkv_split_keeps_each_ranks_heads_of_q_k_and_v() -> None:
    full = torch.arange(3 * 4 * 2).reshape(3 * 4 * 2, 1)  # rows (q|k|v, head, head_dim): 4 heads of 2
    split = tensor_split("blocks.0.qkv.weight")
    assert split == TensorSplit(0, parts=3)
    rank1 = split.shard(full, 1, 2)
    assert rank1.flatten().tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]  # heads 2, 3 of q, k, v
    assert torch.equal(split.unshard([split.shard(full, r, 2) for r in range(2)]), full)
    assert tensor_split("blocks.0.proj.bias") is None and tensor_split("patch_embed.weight") is None


@pytest.mark.parametrize(
    ("tensor", "context", "message"),
    [(3, 1, "num_heads=4 is not divisible by tensor_parallel × context_parallel = 3 × 1"),
     (2, 4, "num_heads=4 is not divisible by tensor_parallel × context_parallel = 2 × 4")],
)  # fmt: skip
def test_impossible_layouts_are_refused(tensor: int, context: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_layout(DiT(tiny_model_config()), tensor, context)


def test_mlp_that_does_not_split_is_refused() -> None:
    with pytest.raises(ValueError, match="mlp_hidden_size=66 is not divisible by tensor_parallel=4"):
        check_layout(DiT(tiny_model_config(mlp_hidden_size=66, num_heads=4)), 4, 1)


def test_sequence_parallel_without_tensor_parallel_is_refused() -> None:
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_parallel > 1"):
        parallelize_dit(DiT(tiny_model_config()), 1, 1, sequence_parallel=True)
