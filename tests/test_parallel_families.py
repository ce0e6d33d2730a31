"""parallelize_model on the pretrained families (most with LoRA adapters), 2 gloo ranks against one process.

Every preset without adapters runs each layout in tests/test_family_conformance.py; here Wan 2.1
(T2V with one timestep for every row, I2V), HunyuanVideo (I2V latent_concat, and iMontage's montage
layout with 5 inputs and 6 outputs) and HunyuanVideo 1.5 I2V, under TP=2, TP=2+SP or Ulysses=2, on
packed batches of samples of different sizes and text lengths (odd row counts, so the parallel
layouts pad each stream): the forward output, the input gradients and every parameter's gradient
match one process (gathered over TP; summed over CP, where each rank holds its tokens' share), and
the initial weights are the single-device weights, cut.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from distributed import run_ranks
from test_hunyuan_video import Case, montage_case, packed, tiny_config
from test_wan import Variant, imontage_config, make_case, pack, randomised

from imontage.models import build_model, packing_spec
from imontage.models.common import PackedBatch, pack_samples
from imontage.models.common.parallel_plan import JoinedInputSplit, TensorSplit
from imontage.models.hunyuan_video.family import PARALLEL_PLAN as HUNYUAN_VIDEO_PLAN
from imontage.models.hunyuan_video.model import build_hunyuan_video
from imontage.models.wan.family import PARALLEL_PLAN as WAN_PLAN
from imontage.models.wan.model import build_wan
from imontage.parallel.parallelize import (
    check_layout,
    family_plan,
    parallelize_model,
    tensor_split,
)

RTOL, ATOL = 1e-4, 2e-5
WAN_VARIANTS = {
    "t2v": Variant("t2v", text_len=0),  # each sample attends to its own, unpadded text
    "i2v": Variant("i2v", text_len=12, i2v=True),  # padded text, image tokens with their own k/v
    # Every row at t = 0, the padding's too: one modulation row, broadcast (a table under SP).
    "t2v_one_timestep": Variant("t2v", text_len=0),
}
INPUTS = ("tokens", "text_embeds", "image_embeds", "pooled_text", "channel_condition")


def reference_model(family: str, variant: str, lora: bool = False) -> Any:
    """The tiny model, random; with ``lora``, adapters (random B) on every linear of its blocks and
    every parameter left trainable, so that the base layers' gradients are compared too."""
    torch.manual_seed(0)
    if family == "wan":
        model = randomised(build_wan(imontage_config(WAN_VARIANTS[variant])), seed=1)
    elif family == "hunyuan_video_15":
        import test_hunyuan_video_15 as hv15

        model = hv15.randomised(build_model(hv15.tiny_config(variant)), seed=1)
    else:
        hunyuan = "t2v" if variant == "montage" else variant
        model = randomised(build_hunyuan_video(tiny_config(hunyuan, "montage")), seed=1)
    if lora:
        from test_lora import lora_config, randomise_adapters

        from imontage.models.lora import apply_lora

        apply_lora(model, lora_config(family, alpha=2.0))
        randomise_adapters(model)
        model.requires_grad_(True)
    return model


def uneven_batch(family: str, variant: str, model: Any) -> PackedBatch:
    """Wan, HunyuanVideo T2V/I2V: three samples of 4 + 18 + 3 = 25 visual rows (odd: SP and CP pad),
    with 3, 9 and 5 text tokens. HunyuanVideo montage: 5 condition and 6 target images of their own
    sizes and 4 text tokens beside one more video sample; all inputs requiring gradients."""
    gen = torch.Generator().manual_seed(3)
    shapes, text_lengths = [(1, 4, 4), (3, 4, 6), (1, 6, 2)], (3, 9, 5)
    if family == "wan":
        i2v = WAN_VARIANTS[variant].i2v
        cases = [
            make_case(gen, shape, text_len=n, i2v=i2v, per_token=True)
            for shape, n in zip(shapes, text_lengths, strict=True)
        ]
        batch = pack(cases, model)
        if variant == "t2v_one_timestep":
            batch = batch.replace(timesteps=torch.zeros_like(batch.timesteps))
    elif family == "hunyuan_video_15":  # 9 + 72 + 10 visual rows; 17 Qwen, 2 + 2 glyph, 5 + 5 image rows
        import test_hunyuan_video_15 as hv15

        cases = [
            hv15.Case(gen, *shape, text_len=n, glyph_len=2 * (k != 1), t=0.2 + 0.3 * k, image=k != 1)
            for k, (shape, n) in enumerate(zip([(1, 3, 3), (3, 4, 6), (1, 5, 2)], text_lengths, strict=True))
        ]
        batch = hv15.packed(cases, variant)
    elif variant == "montage":
        sample, _ = montage_case(gen, 5, 6)
        video = Case("t2v", gen, 3, 6, 2, text_len=9, t=0.7, guidance=4.0).sample()
        spec = packing_spec(tiny_config("t2v", "montage"))
        batch = pack_samples([dataclasses.replace(sample, guidance=2.0), video], spec)
        t = torch.rand(batch.tokens.shape[0], generator=gen)
        batch = batch.replace(timesteps=torch.where(batch.target_mask, t, 0.0))
    else:
        cases = [
            Case(variant, gen, *shape, text_len=n, t=0.2 + 0.3 * k, guidance=3.0 + k)
            for k, (shape, n) in enumerate(zip(shapes, text_lengths, strict=True))
        ]
        batch = packed(cases, "montage")
    changes = {
        name: getattr(batch, name).clone().requires_grad_(True)
        for name in INPUTS
        if getattr(batch, name) is not None
    }
    return batch.replace(**changes)


def forward_backward(model: Any, family: str, variant: str) -> dict:
    batch = uneven_batch(family, variant, model)
    out = model(batch)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * weights).sum().backward()
    inputs = {name: getattr(batch, name) for name in INPUTS}
    return {
        "out": out.detach(),
        "input_grads": {name: t.grad for name, t in inputs.items() if t is not None},
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
        "grads": {name: p.grad for name, p in model.named_parameters()},
    }


def parallel_run(
    rank: int,
    world_size: int,
    tensor: int,
    context: int,
    sequence: bool,
    family: str,
    variant: str,
    lora: bool,
) -> dict:
    from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

    init_process_groups(
        ParallelLayout(tensor, context, world_size // (tensor * context)), torch.device("cpu"), launch_env()
    )
    model = parallelize_model(reference_model(family, variant, lora), tensor, context, sequence)
    return forward_backward(model, family, variant)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Close elementwise, the absolute tolerance scaled by the tensor's largest magnitude (fp32
    reductions in another order differ by that much on elements near zero)."""
    atol = ATOL * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(
    ("family", "variant"),
    [("wan", "t2v"), ("hunyuan_video", "t2v"), ("hunyuan_video", "montage"), ("hunyuan_video_15", "i2v")],
)
def test_uneven_batches_pad_every_stream(family: str, variant: str) -> None:
    batch = uneven_batch(family, variant, reference_model(family, variant))
    assert int((~batch.is_text).sum()) % 2 == 1 and batch.num_samples >= 2
    if family.startswith("hunyuan_video"):  # its text rows are a stream of their own
        assert int(batch.is_text.sum()) % 2 == 1


# Each case is two processes for a few seconds on 2 cores, so the suite keeps to these; every
# preset without adapters runs TP=2, TP=2+SP and Ulysses=2 in tests/test_family_conformance.py.
# Wan T2V at TP+SP for unpadded text and one timestep for every row (the modulation a table). The
# others carry LoRA adapters on every linear of their blocks (column- and row-parallel, with and
# without SP, the joined proj_out, the cross-attention's whole inputs).
@pytest.mark.parametrize(
    ("family", "sequence_parallel", "variant", "lora"),
    [("wan", True, "t2v_one_timestep", False), ("wan", False, "i2v", True), ("wan", True, "i2v", True),
     ("hunyuan_video", True, "i2v_latent_concat", True), ("hunyuan_video_15", True, "i2v", True)],
    ids=["wan-tp2_sp-t2v-one-timestep", "wan-tp2-i2v-lora", "wan-tp2_sp-i2v-lora", "hunyuan-tp2_sp-i2v-lora",
         "hunyuan15-tp2_sp-i2v-lora"],
)  # fmt: skip
def test_tensor_parallel_matches_one_process(
    family: str, sequence_parallel: bool, variant: str, lora: bool
) -> None:
    ranks = run_ranks(parallel_run, 2, 2, 1, sequence_parallel, family, variant, lora)
    reference = reference_model(family, variant, lora)
    plan = family_plan(reference)
    expected = forward_backward(reference, family, variant)
    for rank, result in enumerate(ranks):
        assert_close(result["out"], expected["out"], f"rank {rank} output")
        for name, grad in expected["input_grads"].items():
            assert_close(result["input_grads"][name], grad, f"rank {rank} gradient of the batch's {name}")
    split_names = []
    for name, weight in expected["weights"].items():
        if expected["grads"][name] is None:  # reaches no output (HunyuanVideo 1.5's last text outputs)
            assert all(r["grads"][name] is None for r in ranks), name
            continue
        split = tensor_split(name, plan)
        if split is None:  # whole on every rank, with the whole gradient
            for rank, result in enumerate(ranks):
                assert torch.equal(result["weights"][name], weight), f"rank {rank} {name}"
                assert_close(result["grads"][name], expected["grads"][name], f"rank {rank} grad of {name}")
        else:
            split_names.append(name)
            assert torch.equal(split.unshard([r["weights"][name] for r in ranks]), weight), name
            grad = split.unshard([r["grads"][name] for r in ranks])
            assert_close(grad, expected["grads"][name], f"gathered grad of {name}")
    cut = {
        "t2v": "blocks.0.attn1.norm_q.weight",  # Wan's across-heads norms are cut
        "i2v": "blocks.1.attn2.add_v_proj.weight",
    }
    if family == "wan":
        assert cut["t2v"] in split_names and (variant != "i2v" or cut["i2v"] in split_names)
    else:
        assert "transformer_blocks.0.attn.add_q_proj.weight" in split_names
        assert family == "hunyuan_video_15" or "single_transformer_blocks.0.proj_out.weight" in split_names
    if lora:  # B of a column-parallel layer and A of a row-parallel one are cut; the others whole
        prefix = "blocks.0.attn2" if family == "wan" else "transformer_blocks.0.attn"
        assert {f"{prefix}.to_k.lora_B.weight", f"{prefix}.to_out.0.lora_A.weight"} <= set(split_names)
        assert (
            f"{prefix}.to_k.lora_A.weight" in expected["grads"]
            and f"{prefix}.to_k.lora_A.weight" not in split_names
        )


# Without adapters, every preset's Ulysses=2: tests/test_family_conformance.py.
@pytest.mark.parametrize(("family", "variant", "lora"), [("hunyuan_video", "montage", True)])
def test_ulysses_matches_one_process(family: str, variant: str, lora: bool) -> None:
    ranks = run_ranks(parallel_run, 2, 1, 2, False, family, variant, lora)
    expected = forward_backward(reference_model(family, variant, lora), family, variant)
    for rank, result in enumerate(ranks):
        assert_close(result["out"], expected["out"], f"rank {rank} output")
        for name, weight in expected["weights"].items():
            assert torch.equal(result["weights"][name], weight), f"rank {rank} {name}"
    # Each context-parallel rank holds its tokens' share of every gradient: the shares add up.
    for name, grad in expected["input_grads"].items():
        shares = ranks[0]["input_grads"][name] + ranks[1]["input_grads"][name]
        assert_close(shares, grad, f"gradient of the batch's {name}")
    for name, grad in expected["grads"].items():
        if grad is None:  # reaches no output (HunyuanVideo 1.5's last text outputs)
            assert ranks[0]["grads"][name] is None and ranks[1]["grads"][name] is None, name
            continue
        assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], grad, f"summed grad of {name}")
        if bool(grad.any()):  # (the text queries of a last block: 0 through the unused text outputs)
            assert not torch.equal(ranks[0]["grads"][name], grad), (
                f"{name}: rank 0 alone has the whole gradient"
            )


def test_splits_cut_heads_and_ffn() -> None:
    assert tensor_split("blocks.0.attn2.to_k.weight") == TensorSplit(0)
    assert tensor_split("blocks.0.attn1.to_out.0.weight") == TensorSplit(1)
    assert tensor_split("blocks.0.ffn.net.2.weight", WAN_PLAN) == TensorSplit(1)
    assert tensor_split("blocks.0.attn1.to_out.0.bias") is None  # added once, after the reduction
    assert tensor_split("blocks.0.scale_shift_table") is None and tensor_split("proj_out.weight") is None
    assert tensor_split("transformer_blocks.2.attn.add_k_proj.bias", HUNYUAN_VIDEO_PLAN) == TensorSplit(0)
    assert tensor_split("transformer_blocks.2.ff_context.net.2.weight") == TensorSplit(1)
    assert tensor_split("single_transformer_blocks.0.proj_out.weight") == JoinedInputSplit()
    assert tensor_split("single_transformer_blocks.0.norm.linear.weight") is None
    assert tensor_split("context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight") is None  # whole


def test_joined_input_split_keeps_each_ranks_heads_and_mlp_features() -> None:
    full = torch.arange(4 * 12.0).reshape(4, 12)  # d = 4 attention columns, then F = 8 MLP columns
    split = JoinedInputSplit()
    shards = [split.shard(full, rank, 2) for rank in range(2)]
    assert shards[1].tolist() == full[:, [2, 3, 8, 9, 10, 11]].tolist()
    assert torch.equal(split.unshard(shards), full)
    for cut, tensor in ((split, full), (TensorSplit(0, parts=3), torch.arange(12.0 * 2).reshape(12, 2))):
        placed = torch.zeros_like(tensor)  # the checkpoint reader puts each rank's slice back by place()
        for rank in range(2):
            cut.place(placed, cut.shard(tensor, rank, 2), rank, 2)
        assert torch.equal(placed, tensor), cut


@pytest.mark.parametrize(
    ("family", "tensor", "context", "message"),
    [("wan", 4, 1, "num_heads=2 is not divisible by tensor_parallel × context_parallel = 4 × 1"),
     ("wan", 2, 2, "num_heads=2 is not divisible by tensor_parallel × context_parallel = 2 × 2"),
     ("hunyuan_video", 1, 4, "num_heads=2 is not divisible by tensor_parallel × context_parallel = 1 × 4")],
)  # fmt: skip
def test_impossible_layouts_are_refused(family: str, tensor: int, context: int, message: str) -> None:
    variant = "t2v"
    with pytest.raises(ValueError, match=message):
        check_layout(reference_model(family, variant), tensor, context)
    with pytest.raises(ValueError, match=message):  # before any process group is asked for
        parallelize_model(reference_model(family, variant), tensor, context)


class Unplanned(torch.nn.Module):
    """A model of no registered family (work in progress, say): no record, so no parallel plan."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        self.gradient_checkpointing = False


def test_a_model_of_no_family_runs_alone_and_is_refused_in_parallel() -> None:
    model = parallelize_model(Unplanned(), 1, 1, activation_checkpointing=True)
    assert model.gradient_checkpointing
    with pytest.raises(
        ValueError,
        match=r"a Unplanned is not the model of any family \(dit, wan, hunyuan_video, hunyuan_video_15\)",
    ):
        parallelize_model(Unplanned(), 2, 1)
