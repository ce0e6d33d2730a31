"""imontage's own collectives, each a named autograd Function with its backward documented.

Ulysses (context parallelism, CP) shards a packed sequence of N tokens into CP contiguous
shards. Around attention, an all-to-all trades the sequence shard for a head shard: every rank
then holds all N tokens for H/CP heads, attends over the whole packed sequence (block-diagonal
by the global ``cu_seqlens``), and a second all-to-all trades back. Per-token work (norms, MLP,
RoPE with each rank's own positions) runs on the sequence shard.

Shapes: a sequence shard is ``[N/CP, H, D]``, a head shard ``[N, H/CP, D]`` (leading dims between
the token and head dims ride along). Rank r holds
tokens ``[r·N/CP, (r+1)·N/CP)`` and heads ``[r·H/CP, (r+1)·H/CP)``.

Tensor parallelism uses megatron-core's mappings, plus :class:`SumOverRanks` for a partial sum
that every rank then uses on its own part (an RMSNorm across heads split over TP ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from imontage.models.common.sequence import SAMPLE_FIELDS, PackedBatch


def _size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def _rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group)


def sequence_to_heads(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``[N/CP, *m, H, D]`` sequence shard -> ``[N, *m, H/CP, D]`` head shard (one all-to-all).

    ``*m``: leading dimensions carried along (q, k and v stacked as ``[N/CP, 3, H, D]`` travel
    in one exchange).
    """
    size = _size(group)
    if size == 1:
        return x
    tokens, *middle, heads, dim = x.shape
    if heads % size:
        raise ValueError(f"{heads} heads do not split over a context-parallel group of {size}")
    # send[j]: this rank's tokens, rank j's heads: [CP, N/CP, M, H/CP, D]
    send = x.reshape(tokens, -1, size, heads // size, dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)  # received[j]: rank j's tokens, this rank's heads
    dist.all_to_all_single(received, send, group=group)
    return received.reshape(size * tokens, *middle, heads // size, dim)


def heads_to_sequence(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``[N, *m, H/CP, D]`` head shard -> ``[N/CP, *m, H, D]`` sequence shard (the inverse all-to-all)."""
    size = _size(group)
    if size == 1:
        return x
    total, *middle, heads, dim = x.shape
    send = x.reshape(size, total // size, -1, heads, dim).contiguous()  # send[j]: rank j's tokens
    received = torch.empty_like(send)  # received[j]: this rank's tokens, rank j's heads
    dist.all_to_all_single(received, send, group=group)
    # [CP, N/CP, M, H/CP, D] -> [N/CP, M, CP, H/CP, D]: heads in rank order
    return received.permute(1, 2, 0, 3, 4).reshape(total // size, *middle, size * heads, dim)


def scatter_sequence(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """This rank's contiguous shard of the first dimension of ``x`` (N must divide by CP)."""
    size = _size(group)
    if x.shape[0] % size:
        raise ValueError(f"{x.shape[0]} tokens do not split over {size} ranks; pad with shard_packed_batch")
    return x.chunk(size)[_rank(group)].contiguous()


def gather_sequence(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """The shards of every rank, concatenated along the first dimension (one all-gather)."""
    size = _size(group)
    if size == 1:
        return x
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


class SequenceToHeads(torch.autograd.Function):
    """Forward: sequence shard -> head shard. Backward: the gradient goes back head -> sequence."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return heads_to_sequence(grad, ctx.group), None


class HeadsToSequence(torch.autograd.Function):
    """Forward: head shard -> sequence shard. Backward: the gradient goes back sequence -> head."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return heads_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return sequence_to_heads(grad, ctx.group), None


class ScatterToSequenceShards(torch.autograd.Function):
    """Forward: keep this rank's token shard. Backward: all-gather the shards' gradients.

    Used where every rank holds the same full activation (after the embeddings): each rank's
    gradient covers only its shard, and the gather assembles the full gradient everywhere.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gather_sequence(grad, ctx.group), None


class GatherFromSequenceShards(torch.autograd.Function):
    """Forward: all-gather the token shards. Backward: keep this rank's shard of the gradient.

    The full output is used identically on every rank (the final layer and loss run on it), so
    each rank's gradient for its own shard is the gradient of its slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return scatter_sequence(grad, ctx.group), None


def pad_packed_batch(batch: PackedBatch, multiple: int) -> PackedBatch:
    """Append padding tokens so the token count divides by ``multiple``.

    The padding forms one extra sequence in ``cu_seqlens``: attention keeps it apart from every
    sample, and it is neither text nor a target, so it never reaches the loss.
    """
    total = batch.tokens.shape[0]
    pad = -total % multiple
    if pad == 0:
        return batch

    cu_seqlens = torch.cat([batch.cu_seqlens, batch.cu_seqlens.new_tensor([total + pad])])
    # The padding sequence is one more sample: per-sample fields get a zero row for it.
    per_sample = {
        name: padded_rows(getattr(batch, name), 1)
        for name in SAMPLE_FIELDS
        if getattr(batch, name) is not None
    }
    return batch.replace(
        **batch.map_tokens(lambda rows: padded_rows(rows, pad)), **per_sample, cu_seqlens=cu_seqlens
    )


def padded_rows(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """``tensor`` with ``count`` zero rows appended."""
    return torch.cat([tensor, tensor.new_zeros((count, *tensor.shape[1:]))])


class SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: all-reduce (sum) the gradients too.

    For a partial sum each rank computes over its own part (the sum of squares of its heads, for an
    RMSNorm across all heads under tensor parallelism) whose total every rank then uses for *its own*
    part of the work: the total's gradient is the sum of every rank's. (megatron-core's
    ``reduce_from_tensor_model_parallel_region`` passes the gradient through unchanged, which is
    right only when every rank goes on with the same computation.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
