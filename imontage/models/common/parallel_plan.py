"""How a family's model is cut for tensor, sequence and Ulysses parallelism, as data.

Each family's record (:class:`imontage.models.common.family.ModelFamily`) holds a :class:`FamilyPlan`: for
each list of blocks, which weights are cut how (:class:`TensorSplit`), which modules hold the heads
and the self-attention, and which whole parameters see part of the work. The plans are
declarative: :mod:`imontage.parallel.parallelize` reads them and does the cutting, so a family
needs no parallel code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class TensorSplit:
    """How a weight is cut over TP ranks: along ``dim``, in ``parts`` equal parts cut separately.

    ``qkv`` holds q, k and v one after the other (``parts=3``): each is cut into TP slices, and
    rank r keeps slice r of each, so its columns are its own heads of q, k and v.
    """

    dim: int
    parts: int = 1
    # Whether a rank's pieces interleave within each row (JoinedInputSplit): its slice is not a
    # run of whole columns, so a factor of another width cannot be cut by it.
    interleaved: ClassVar[bool] = False

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """Rank ``rank``'s slice of the single-device tensor ``full``."""
        if full.shape[self.dim] % (self.parts * size):
            raise ValueError(
                f"dimension {self.dim} of size {full.shape[self.dim]} does not split into "
                f"{self.parts} part(s) × {size} tensor-parallel ranks"
            )
        slices = [part.chunk(size, self.dim)[rank] for part in full.chunk(self.parts, self.dim)]
        return torch.cat(slices, self.dim)

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The single-device tensor from every rank's slice, in rank order."""
        parts = [shard.chunk(self.parts, self.dim) for shard in shards]  # [rank][part]
        return torch.cat([torch.cat([p[i] for p in parts], self.dim) for i in range(self.parts)], self.dim)

    def pieces(self, full: torch.Size | tuple[int, ...], rank: int, size: int) -> list[tuple[int, int]]:
        """(start, length) along ``dim`` of ``full`` of each piece rank ``rank`` keeps, in its order."""
        part, local = full[self.dim] // self.parts, full[self.dim] // (self.parts * size)
        return [(p * part + rank * local, local) for p in range(self.parts)]

    def place(self, out: torch.Tensor, local: torch.Tensor, rank: int, size: int) -> None:
        """Write rank ``rank``'s slice ``local`` into its place in the single-device tensor ``out``."""
        at = 0
        for start, length in self.pieces(out.shape, rank, size):
            out.narrow(self.dim, start, length).copy_(local.narrow(self.dim, at, length))
            at += length


@dataclass(frozen=True)
class JoinedInputSplit(TensorSplit):
    """A row-parallel weight whose input joins two column-parallel outputs: ``[attention | MLP]``.

    HunyuanVideo's single-stream ``proj_out`` ``[d, d + F]`` reads the attention output (``d``
    features, as wide as its rows) beside the MLP's (``F``): rank r keeps its slice of each, so its
    columns meet its own heads and its own MLP features.
    """

    dim: int = 1
    interleaved: ClassVar[bool] = True

    def pieces(self, full: torch.Size | tuple[int, ...], rank: int, size: int) -> list[tuple[int, int]]:
        width, mlp = full[0], full[1] - full[0]
        if width % size or mlp % size:
            raise ValueError(
                f"attention width {width} and MLP width {mlp} must each split over {size} TP ranks"
            )
        return [(rank * width // size, width // size), (width + rank * mlp // size, mlp // size)]

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        return torch.cat(
            [full.narrow(1, start, n) for start, n in self.pieces(full.shape, rank, size)], dim=1
        )

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        width = shards[0].shape[0] // len(shards)  # each rank's attention columns
        return torch.cat(
            [torch.cat([s[:, :width] for s in shards], 1), torch.cat([s[:, width:] for s in shards], 1)], 1
        )


ROWS, COLUMNS = TensorSplit(0), TensorSplit(1)


def linears(splits: dict[str, TensorSplit], cut: TensorSplit, *paths: str) -> dict[str, TensorSplit]:
    """``splits`` with each linear of ``paths`` cut by ``cut`` (a row cut takes the bias too)."""
    for path in paths:
        splits[f"{path}.weight"] = cut
        if cut.dim == 0:
            splits[f"{path}.bias"] = cut
    return splits


@dataclass(frozen=True)
class BlockPlan:
    """What parallelization needs to know of one kind of block; every name is inside the block.

    ``splits``: how each cut weight is cut (a ``Linear`` cut along dim 0 becomes column parallel,
    along dim 1 row parallel; an ``RMSNorm`` weight cut becomes a :class:`HeadShardedRMSNorm`).
    """

    splits: dict[str, TensorSplit]
    heads: str  # the module whose ``num_heads`` counts the heads ("": the block itself)
    head_modules: tuple[str, ...]  # modules whose ``num_heads`` becomes the rank's share under TP
    mlp: str  # the first MLP linear: its ``out_features`` is the MLP width
    self_attentions: tuple[str, ...]  # modules whose ``core_attention`` Ulysses wraps
    # Column-parallel linears whose input is whole on every rank (Wan's text and image context):
    # never sequence-sharded, so never all-gathered.
    whole_inputs: tuple[str, ...] = ()
    head_partial: tuple[str, ...] = ()  # whole parameters that see only the rank's heads
    token_partial: tuple[str, ...] = ()  # whole parameters that see only the rank's tokens under SP


@dataclass(frozen=True)
class FamilyPlan:
    """A family's blocks by the name of the ``ModuleList`` holding them, each with its plan."""

    blocks: dict[str, BlockPlan]
