"""parallelize_model on Wan 2.1 (T2V and I2V), 2 gloo ranks against the single-process model.

TP=2, TP=2 with sequence parallelism, and Ulysses=2, on a packed batch of three samples of
different sizes and text lengths (an odd number of visual rows, so the parallel layouts pad): the
forward output, the input gradients and every parameter's gradient match one process (gathered
over TP; summed over CP, where each rank holds its tokens' share), and the initial weights are the
single-device weights, cut.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks
from test_wan import Variant, imontage_config, make_case, pack, randomised

from imontage.models.dit import PackedBatch
from imontage.models.wan import WanTransformer, build_wan
from imontage.parallel.parallelize import (
    WAN_PLAN,
    TensorSplit,
    check_layout,
    parallelize_model,
    tensor_split,
)

RTOL, ATOL = 1e-4, 2e-5
VARIANTS = {
    "t2v": Variant("t2v", text_len=0),  # each sample attends to its own, unpadded text
    "i2v": Variant("i2v", text_len=12, i2v=True),  # padded text, image tokens with their own k/v
}


def reference_model(variant: str) -> WanTransformer:
    torch.manual_seed(0)
    return randomised(build_wan(imontage_config(VARIANTS[variant])), seed=1)


def uneven_batch(variant: str, model: WanTransformer) -> PackedBatch:
    """Three samples: 4 + 18 + 3 = 25 visual rows (odd: SP and CP pad), 3, 9 and 5 text tokens."""
    gen = torch.Generator().manual_seed(3)
    shapes, text_lengths = [(1, 4, 4), (3, 4, 6), (1, 6, 2)], (3, 9, 5)
    i2v = VARIANTS[variant].i2v
    cases = [
        make_case(gen, shape, text_len=n, i2v=i2v, per_token=True)
        for shape, n in zip(shapes, text_lengths, strict=True)
    ]
    batch = pack(cases, model)
    assert batch.text_embeds is not None
    changes = {"tokens": batch.tokens.clone().requires_grad_(True)}
    changes["text_embeds"] = batch.text_embeds.clone().requires_grad_(True)
    if batch.image_embeds is not None:
        changes["image_embeds"] = batch.image_embeds.clone().requires_grad_(True)
    return batch.replace(**changes)


def forward_backward(model: WanTransformer, variant: str) -> dict:
    batch = uneven_batch(variant, model)
    out = model(batch)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * weights).sum().backward()
    inputs = {"tokens": batch.tokens, "text_embeds": batch.text_embeds, "image_embeds": batch.image_embeds}
    return {
        "out": out.detach(),
        "input_grads": {name: t.grad for name, t in inputs.items() if t is not None},
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
    }


def parallel_run(rank: int, world_size: int, tensor: int, context: int, sequence: bool, variant: str) -> dict:
    from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

    init_process_groups(
        ParallelLayout(tensor, context, world_size // (tensor * context)), torch.device("cpu"), launch_env()
    )
    model = parallelize_model(reference_model(variant), tensor, context, sequence)
    return forward_backward(model, variant)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def test_uneven_batch_has_an_odd_number_of_visual_rows() -> None:
    batch = uneven_batch("t2v", reference_model("t2v"))
    assert int((~batch.is_text).sum()) % 2 == 1 and batch.num_samples == 3


# I2V runs every path T2V does (plus image keys and padded text); T2V once more, at plain TP, for
# unpadded text. Each case is two processes for ~15 s on 2 cores, so the suite keeps to these.
@pytest.mark.parametrize(
    ("sequence_parallel", "variant"),
    [(False, "t2v"), (False, "i2v"), (True, "i2v")],
    ids=["tp2-t2v", "tp2-i2v", "tp2_sp-i2v"],
)
def test_tensor_parallel_matches_one_process(sequence_parallel: bool, variant: str) -> None:
    ranks = run_ranks(parallel_run, 2, 2, 1, sequence_parallel, variant)
    expected = forward_backward(reference_model(variant), variant)
    for rank, result in enumerate(ranks):
        assert_close(result["out"], expected["out"], f"rank {rank} output")
        for name, grad in expected["input_grads"].items():
            assert_close(result["input_grads"][name], grad, f"rank {rank} gradient of the batch's {name}")
    split_names = []
    for name, weight in expected["weights"].items():
        split = tensor_split(name, WAN_PLAN)
        if split is None:  # whole on every rank, with the whole gradient
            for rank, result in enumerate(ranks):
                assert torch.equal(result["weights"][name], weight), f"rank {rank} {name}"
                assert_close(result["grads"][name], expected["grads"][name], f"rank {rank} grad of {name}")
        else:
            split_names.append(name)
            assert torch.equal(split.unshard([r["weights"][name] for r in ranks]), weight), name
            grad = split.unshard([r["grads"][name] for r in ranks])
            assert_close(grad, expected["grads"][name], f"gathered grad of {name}")
    assert "blocks.0.attn1.norm_q.weight" in split_names  # the across-heads norms are cut
    if VARIANTS[variant].i2v:
        assert "blocks.1.attn2.add_v_proj.weight" in split_names


@pytest.mark.parametrize("variant", ["i2v"])
def test_ulysses_matches_one_process(variant: str) -> None:
    ranks = run_ranks(parallel_run, 2, 1, 2, False, variant)
    expected = forward_backward(reference_model(variant), variant)
    for rank, result in enumerate(ranks):
        assert_close(result["out"], expected["out"], f"rank {rank} output")
        for name, weight in expected["weights"].items():
            assert torch.equal(result["weights"][name], weight), f"rank {rank} {name}"
    # Each context-parallel rank holds its tokens' share of every gradient: the shares add up.
    for name, grad in expected["input_grads"].items():
        shares = ranks[0]["input_grads"][name] + ranks[1]["input_grads"][name]
        assert_close(shares, grad, f"gradient of the batch's {name}")
    for name, grad in expected["grads"].items():
        assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], grad, f"summed grad of {name}")
        assert not torch.equal(ranks[0]["grads"][name], grad), f"{name}: rank 0 alone has the whole gradient"


def test_wan_splits_cut_heads_and_ffn() -> None:
    assert tensor_split("blocks.0.attn2.to_k.weight") == TensorSplit(0)
    assert tensor_split("blocks.0.attn1.to_out.0.weight") == TensorSplit(1)
    assert tensor_split("blocks.0.ffn.net.2.weight") == TensorSplit(1)
    assert tensor_split("blocks.0.attn1.to_out.0.bias") is None  # added once, after the reduction
    assert tensor_split("blocks.0.scale_shift_table") is None and tensor_split("proj_out.weight") is None


@pytest.mark.parametrize(
    ("tensor", "context", "message"),
    [(4, 1, "num_heads=2 is not divisible by tensor_parallel × context_parallel = 4 × 1"),
     (2, 2, "num_heads=2 is not divisible by tensor_parallel × context_parallel = 2 × 2")],
)  # fmt: skip
def test_impossible_layouts_are_refused(tensor: int, context: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_layout(reference_model("t2v"), tensor, context)
    with pytest.raises(ValueError, match=message):  # before any process group is asked for
        parallelize_model(reference_model("i2v"), tensor, context)


class Unplanned(torch.nn.Module):
    """A family without a FamilyPlan (the others' work in progress, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        self.gradient_checkpointing = False


def test_a_family_without_a_plan_runs_alone_and_is_refused_in_parallel() -> None:
    model = parallelize_model(Unplanned(), 1, 1, activation_checkpointing=True)
    assert model.gradient_checkpointing
    with pytest.raises(
        ValueError, match="no parallel plan for a Unplanned: parallelize_model knows DiT, WanTransformer"
    ):
        parallelize_model(Unplanned(), 2, 1)
