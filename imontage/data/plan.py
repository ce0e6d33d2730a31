"""Epoch plans: which samples each (rank, worker) reads in an epoch, and how many batches it makes.

The epoch's shard order (shuffled by seed and epoch) lays all samples end to end; the sequence
is cut into ``ranks x workers`` slices of equal length, rank-major, so each sample is read by
exactly one worker of one rank and a shard is split between at most a few neighbours. The
``N mod (ranks x workers)`` samples at the end are left out of that epoch (another shard order
leaves out others next epoch).

Batches per worker are the same number everywhere, fixed before reading: a worker whose share
holds ``T`` tokens (``n`` samples) makes at least ``max(T / max_tokens, n / batch_size)`` batches
whatever its packing, so the smallest such bound over all slices is a count every worker can
reach. Samples the skip budget allows to fail in decoding are taken out first, the largest ones,
so no worker runs short. A worker stops once it has made its count; what is left of its slice
is dropped for the epoch (``samples_dropped``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imontage.data.catalog import Catalog, PackingLimits

# Keys that make the random streams of one seed independent of each other.
SHARD_ORDER_STREAM, SHUFFLE_STREAM, MIXTURE_STREAM = 1, 2, 3


@dataclass(frozen=True)
class Piece:
    """Samples ``start <= i < stop`` of shard ``shard`` (an index into the catalog's shards)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Sharding:
    """Who reads what: ``world_size`` ranks of ``num_workers`` workers each."""

    seed: int
    stream: int  # the dataset's place in a mixture, so datasets do not share random streams
    shuffle: bool
    world_size: int
    num_workers: int

    @property
    def num_slices(self) -> int:
        return self.world_size * self.num_workers

    def slice_of(self, rank: int, worker: int) -> int:
        return rank * self.num_workers + worker


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    shard_order: tuple[int, ...]
    slice_length: int  # samples per slice (bad ones included)
    slices: tuple[tuple[Piece, ...], ...]  # per slice: its pieces in reading order
    batches_per_worker: int


def seeded_rng(*keys: int) -> np.random.Generator:
    """A generator seeded from integer keys: stable across processes, machines and Python runs."""
    return np.random.default_rng(np.random.SeedSequence([int(key) for key in keys]))


def shard_order(catalog: Catalog, sharding: Sharding, epoch: int) -> list[int]:
    count = len(catalog.shards)
    if not sharding.shuffle:
        return list(range(count))
    return [
        int(i)
        for i in seeded_rng(sharding.seed, sharding.stream, epoch, SHARD_ORDER_STREAM).permutation(count)
    ]


def cut_slices(lengths: list[int], order: list[int], num_slices: int) -> tuple[int, list[tuple[Piece, ...]]]:
    """Slice length and the pieces of each of ``num_slices`` equal slices of the shards laid end to end."""
    starts = np.cumsum([0] + [lengths[shard] for shard in order])  # [S + 1] first position of each shard
    length = int(starts[-1]) // num_slices
    slices = []
    for index in range(num_slices):
        low, high = index * length, (index + 1) * length
        pieces = []
        position = int(np.searchsorted(starts, low, side="right")) - 1
        while position < len(order) and starts[position] < high:
            start = max(low - int(starts[position]), 0)
            stop = min(high - int(starts[position]), lengths[order[position]])
            if stop > start:
                pieces.append(Piece(order[position], start, stop))
            position += 1
        slices.append(tuple(pieces))
    return length, slices


def _sum_without_largest(values: np.ndarray, count: int) -> int:
    """The sum of ``values`` but their ``count`` largest."""
    if count <= 0:
        return int(values.sum())
    if count >= len(values):
        return 0
    return int(np.partition(values, len(values) - count)[: len(values) - count].sum())


def guaranteed_batches(
    catalog: Catalog, pieces: tuple[Piece, ...], limits: PackingLimits, allowed_skips: int
) -> int:
    """Batches a worker reading ``pieces`` makes at least, even if ``allowed_skips`` samples fail to decode."""
    tokens = np.concatenate(
        [catalog.shards[p.shard].tokens[p.start : p.stop] for p in pieces] or [np.zeros(0, np.int64)]
    )
    samples = np.concatenate(
        [catalog.shards[p.shard].samples[p.start : p.stop] for p in pieces] or [np.zeros(0, np.int64)]
    )
    trainable = samples > 0
    may_fail = max(0, allowed_skips - int((~trainable).sum()))  # known-bad samples use up the budget first
    bounds = []
    if limits.max_tokens:
        bounds.append(_sum_without_largest(tokens[trainable], may_fail) // limits.max_tokens)
    if limits.max_samples:
        bounds.append(_sum_without_largest(samples[trainable], may_fail) // limits.max_samples)
    return max(bounds)


def allowed_skips(skip_budget: float, slice_length: int) -> int:
    """Sample skips a worker may make in an epoch before the run aborts."""
    return int(skip_budget * slice_length)


def plan_epoch(
    catalog: Catalog, sharding: Sharding, limits: PackingLimits, skip_budget: float, epoch: int
) -> EpochPlan:
    order = shard_order(catalog, sharding, epoch)
    length, slices = cut_slices([len(shard.index) for shard in catalog.shards], order, sharding.num_slices)
    if length == 0:
        raise ValueError(
            f"{catalog.num_samples} samples cannot be shared by {sharding.world_size} ranks x "
            f"{sharding.num_workers} workers: each needs at least one"
        )
    skips = allowed_skips(skip_budget, length)
    batches = min(guaranteed_batches(catalog, pieces, limits, skips) for pieces in slices)
    if batches == 0:
        raise ValueError(
            f"epoch {epoch}: a worker's share of {length} samples fills no whole batch of "
            f"max_tokens={limits.max_tokens}, batch_size={limits.max_samples} (data from {catalog.shards[0].url}, ...; "
            f"{catalog.num_trainable} of {catalog.num_samples} samples trainable): "
            "use fewer ranks or workers, or smaller batches"
        )
    return EpochPlan(epoch, tuple(order), length, tuple(slices), batches)
