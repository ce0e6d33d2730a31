"""The token layout of the pretrained families: which rows of a stream this rank holds.

The DiT runs one packed sequence through its blocks (:class:`~imontage.models.dit.model.TokenLayout`).
Wan and HunyuanVideo run *streams*: Wan its visual rows (the text is a cross-attention context),
HunyuanVideo its visual and its text rows, each with its own weights in the dual-stream blocks.
Each stream is a packed batch of its own rows (:func:`select_rows`); the layout shards each
stream separately. On one device every row is local and every method is the identity;
``imontage.parallel`` pads each stream to a multiple of its shard count with one extra masked
sequence, gives each context-parallel rank a contiguous shard of it (and each sequence-parallel
rank a shard of that inside the blocks), and gathers the output back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imontage.models.common.sequence import PackedBatch


class TokenLayout:
    """Where the tokens of a forward pass live: on one device, every rank holds all of them.

    ``imontage.parallel`` replaces it with a layout that pads the packed sequence, gives each rank
    its shard and gathers the output; the model calls these four methods and nothing else.
    """

    def shard_batch(self, batch: PackedBatch) -> PackedBatch:
        """This rank's tokens; ``cu_seqlens`` stays that of the whole packed sequence."""
        return batch

    def enter_blocks(self, x: torch.Tensor, modulation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, modulation

    def exit_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_output(self, out: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Every token's output, ``[N, ·]`` for the ``N`` tokens of ``batch``."""
        return out


def sequence_bounds(lengths: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``[B]`` sequence lengths -> ``cu_seqlens`` ``[B + 1]`` int32 and the same as Python ints."""
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return cu, tuple(cu.tolist())


def stream_batch(counts: torch.Tensor) -> PackedBatch:
    """A packed batch of ``counts[s]`` featureless rows per sample: the shape of a stream a model
    builds itself (rows that are no batch's, such as image tokens joining the text), for
    :meth:`SampleTokenLayout.shard_batch` to pad and cut like any other stream."""
    cu_seqlens, bounds = sequence_bounds(counts)
    n, device = bounds[-1], counts.device
    flags = torch.zeros(n, dtype=torch.bool, device=device)
    indices = torch.zeros(n, dtype=torch.int64, device=device)
    return PackedBatch(
        tokens=torch.zeros(n, 0, device=device),
        is_text=flags,
        text_ids=indices,
        text_index=indices,
        text_embeds=None,
        positions=torch.zeros(n, 4, dtype=torch.int32, device=device),
        cu_seqlens=cu_seqlens,
        target_mask=flags,
        timesteps=torch.zeros(n, device=device),
    )


def select_rows(batch: PackedBatch, rows: torch.Tensor, sample: torch.Tensor) -> PackedBatch:
    """The rows of ``batch`` where ``rows`` (``[N]`` bool) holds, as a packed batch of their own.

    ``sample``: each row's sample (``batch.sample_index()``); ``cu_seqlens`` counts the kept rows
    per sample, so a sample keeps its place even with no row kept.
    """
    cu_seqlens, _ = sequence_bounds(torch.bincount(sample[rows], minlength=batch.num_samples))
    return batch.replace(**batch.map_tokens(lambda tensor: tensor[rows]), cu_seqlens=cu_seqlens, spans=[])


class SampleTokenLayout(TokenLayout):
    """The token layout of a streamed model (module docstring); on one device, the identity."""

    context_size = 1  # context-parallel shards of each stream

    def local_sample_index(self, local: PackedBatch) -> torch.Tensor:
        """``[n]`` int64: the sample of each row of ``local`` (``shard_batch``'s output) this rank's
        attention queries hold (under sequence parallelism: after the column-parallel gather)."""
        return local.sample_index()

    def shard_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a per-row tensor ``[n, ...]`` of a stream, padded and sliced as
        :meth:`shard_batch` pads and slices that stream's batch (padding rows are zero)."""
        return rows

    def enter_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of :meth:`shard_rows` -> the rows the blocks' residual stream holds (under sequence
        parallelism a shard of them; the backward gathers the gradient)."""
        return rows

    def enter_table(self, table: torch.Tensor) -> torch.Tensor:
        """A tensor whole on every rank that the residual rows read from (a modulation table):
        under sequence parallelism each rank's rows read part of it, so the backward sums its
        gradient over the tensor-parallel group."""
        return table
