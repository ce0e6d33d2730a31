"""Ulysses all-to-alls and sequence scatter/gather on 2 gloo ranks, against one process."""

import torch
from conftest import tiny_model_config
from distributed import run_ranks

from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.models.common.attention import varlen_attention
from imontage.parallel.collectives import (
    GatherFromSequenceShards,
    HeadsToSequence,
    ScatterToSequenceShards,
    SequenceToHeads,
    pad_packed_batch,
)

HEADS, DIM = 4, 8


def full_inputs(tokens: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(tokens, HEADS, DIM, generator=g) for _ in range(4))  # q, k, v, output weight


def all_to_all_round_trip(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    x_full, _, _, weight = full_inputs(6)
    x = x_full.chunk(world_size)[rank].clone().requires_grad_(True)  # [3, H, D]
    heads = SequenceToHeads.apply(x, None)  # [6, H/2, D]
    back = HeadsToSequence.apply(heads, None)
    (heads * weight.chunk(world_size, dim=1)[rank]).sum().backward()
    return {"heads": heads.detach(), "back": back.detach(), "x": x.detach(), "grad": x.grad}


def test_sequence_to_heads_and_back() -> None:
    ranks = run_ranks(all_to_all_round_trip, 2)
    x_full, _, _, weight = full_inputs(6)
    for rank, result in enumerate(ranks):
        assert torch.equal(result["heads"], x_full[:, rank * 2 : (rank + 1) * 2])  # all tokens, own heads
        assert torch.equal(result["back"], result["x"])
        # The loss sums every rank's head shard times its weight: d/dx is the weight, on this rank's tokens.
        assert torch.equal(result["grad"], weight.chunk(2)[rank])


def ulysses_attention(rank: int, world_size: int, cu_seqlens: list[int]) -> dict[str, torch.Tensor]:
    total = cu_seqlens[-1]
    padded_total = total + (-total % world_size)
    bounds = torch.tensor(cu_seqlens + ([padded_total] if padded_total > total else []), dtype=torch.int32)
    q, k, v, weight = (
        torch.cat([t, t.new_zeros(padded_total - total, HEADS, DIM)]) for t in full_inputs(total)
    )
    local = [t.chunk(world_size)[rank].clone().requires_grad_(True) for t in (q, k, v)]  # [N/2, H, D]
    heads = [SequenceToHeads.apply(t, None) for t in local]  # [N, H/2, D]
    out = HeadsToSequence.apply(varlen_attention(*heads, bounds, int(bounds.diff().max())), None)
    (out * weight.chunk(world_size)[rank]).sum().backward()
    return {"out": out.detach(), **{f"grad_{n}": t.grad for n, t in zip("qkv", local, strict=True)}}


def test_ulysses_attention_matches_one_process_on_uneven_packed_sequences() -> None:
    cu_seqlens = [0, 3, 4, 9]  # 9 tokens: the two ranks need one padding token
    ranks = run_ranks(ulysses_attention, 2, cu_seqlens)
    q, k, v, weight = full_inputs(9)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = varlen_attention(q, k, v, torch.tensor(cu_seqlens, dtype=torch.int32), 5)
    (out * weight).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks])[:9], out.detach())
    for name, reference in (("q", q), ("k", k), ("v", v)):
        torch.testing.assert_close(torch.cat([r[f"grad_{name}"] for r in ranks])[:9], reference.grad)


def scatter_then_gather(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    x_full, _, _, weight = full_inputs(6)
    x = x_full.clone().requires_grad_(True)  # every rank holds the same full activation
    shard = ScatterToSequenceShards.apply(x, None)
    gathered = GatherFromSequenceShards.apply(shard * 2.0, None)
    (gathered * weight).sum().backward()
    return {"shard": shard.detach(), "gathered": gathered.detach(), "grad": x.grad}


def test_scatter_and_gather_sequence_shards() -> None:
    ranks = run_ranks(scatter_then_gather, 2)
    x_full, _, _, weight = full_inputs(6)
    for rank, result in enumerate(ranks):
        assert torch.equal(result["shard"], x_full.chunk(2)[rank])
        assert torch.equal(result["gathered"], 2.0 * x_full)
        assert torch.equal(result["grad"], 2.0 * weight)  # the full gradient, on every rank


def test_padding_is_its_own_sequence_and_never_a_target() -> None:
    spec = packing_spec(tiny_model_config())
    g = torch.Generator().manual_seed(0)
    sample = Sample(
        [Segment("text", text="abc"), Segment("image", "target", torch.randn(3, 1, 8, 4, generator=g))]
    )
    batch = pack_samples([sample], spec)  # 3 text + 2 image tokens
    padded = pad_packed_batch(batch, 4)
    assert padded.tokens.shape[0] == 8 and padded.cu_seqlens.tolist() == [0, 5, 8]
    assert padded.target_mask[5:].sum() == 0 and padded.is_text[5:].sum() == 0
    assert pad_packed_batch(batch, 5) is batch
