"""One worker's endless stream of packed batches, and the state that resumes it exactly.

Per epoch a worker reads its slice of the epoch plan (shard pieces, seeking to a piece's first
sample in a local shard), passes the raw samples through a seeded shuffle buffer and packs them
by the token counts the catalog knows, and stops once it has made the plan's number of batches.
Only the samples of a batch it makes are decoded, when it makes it: the samples still buffered
when the epoch's count is met are dropped undecoded. Every batch carries the worker's state as
of just after it was made:

- ``epoch``, ``batches`` made in it, ``skips`` in it (for the skip budget);
- ``cursor``: the next position of the slice to read (the shard cursor and offset, through the plan);
- ``shuffle``: positions held by the shuffle buffer, in buffer order, and its RNG state;
- ``packing``: positions held by the packer, in buffer order;
- ``stats``: the worker's counters.

Buffers are saved as positions, not bytes: restoring reads the slice again from the oldest held
position up to the cursor, keeps the held samples and goes on.
That window is about a shuffle buffer long, so a restore costs seconds, not an epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from imontage.data.catalog import Catalog, PackingLimits
from imontage.data.decode import DecodedItem, DecodeOptions, decode_item
from imontage.data.packing import TokenPacker
from imontage.data.plan import (
    SHUFFLE_STREAM,
    EpochPlan,
    Piece,
    Sharding,
    allowed_skips,
    plan_epoch,
    seeded_rng,
)
from imontage.data.problems import SAMPLE_REASONS, DataError, DataExhausted, DataStats, SkipBudgetExceeded
from imontage.data.shards import RawSample, ShardProblem, is_local, iter_samples, open_shard
from imontage.models.common.sequence import PackedBatch, PackingSpec, pack_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSettings:
    """Everything about a dataset's streams that a recipe sets, besides decoding."""

    sharding: Sharding
    limits: PackingLimits
    shuffle_buffer: int
    pack_buffer: int
    skip_budget: float  # the effective one: 0 in strict mode
    strict: bool


@dataclass
class WorkerBatch:
    """What a worker hands to the main process: a batch, what is in it, and its state after it."""

    batch: PackedBatch
    worker: int
    epoch: int
    keys: list[tuple[str, str]]  # (shard, key) of each item, in batch order
    tasks: list[str]
    state: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# reading a slice


def _read_piece(catalog: Catalog, piece: Piece) -> Iterator[RawSample]:
    """The samples of one piece; a local shard is entered by seeking to the piece's first sample."""
    shard = catalog.shards[piece.shard]
    entries = shard.index.entries
    seek = is_local(shard.url)
    offset = entries[piece.start].offset if seek else 0
    skip = 0 if seek else piece.start  # a stream cannot seek: read past the samples before the piece
    try:
        with open_shard(shard.url, offset) as stream:
            samples = iter_samples(stream, shard.url, start=offset)
            for count, raw in enumerate(samples):
                if count < skip:
                    continue
                expected = entries[piece.start + count - skip].key
                if raw.key != expected:
                    raise DataError.of(
                        "corrupt_tar", shard.url, raw.key,
                        f"expected sample '{expected}' here: the shard changed since it was indexed",
                    )  # fmt: skip
                yield raw
                if count + 1 == skip + len(piece):
                    return
    except ShardProblem as problem:  # the index read this far: the shard changed under us
        raise DataError.of(
            problem.reason, shard.url, None, f"{problem.detail} (the shard changed since it was indexed)"
        ) from None
    raise DataError.of(
        "truncated_tar", shard.url, None, "fewer samples than indexed: the shard changed since it was indexed"
    )


@dataclass
class SliceSample:
    position: int  # in the worker's slice of the epoch
    shard: int  # index into the catalog's shards
    shard_position: int
    raw: RawSample


def read_slice(catalog: Catalog, pieces: tuple[Piece, ...], start: int) -> Generator[SliceSample, None, None]:
    """The samples of a slice from slice position ``start`` on."""
    offset = 0  # slice position of the current piece's first sample
    for piece in pieces:
        if offset + len(piece) > start:
            skip = max(0, start - offset)
            first = piece.start + skip
            for count, raw in enumerate(_read_piece(catalog, Piece(piece.shard, first, piece.stop))):
                yield SliceSample(offset + skip + count, piece.shard, first + count, raw)
        offset += len(piece)


# ---------------------------------------------------------------------------------------------
# shuffle buffer


class ShuffleBuffer:
    """Hold ``size`` samples; each new one sends out a uniformly drawn held one. Drains the same way."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.held: list[SliceSample] = []

    def push(self, sample: SliceSample) -> SliceSample | None:
        self.held.append(sample)
        return self.pop() if len(self.held) >= max(self.size, 1) else None

    def pop(self) -> SliceSample | None:
        if not self.held:
            return None
        index = int(self.rng.integers(len(self.held))) if len(self.held) > 1 else 0
        self.held[index], self.held[-1] = self.held[-1], self.held[index]
        return self.held.pop()

    def positions(self) -> list[int]:
        return [sample.position for sample in self.held]


# ---------------------------------------------------------------------------------------------
# the worker's stream


class WorkerStream:
    """The endless batch stream of worker ``worker`` of rank ``rank``, epoch after epoch.

    Given the ``state`` a :class:`WorkerBatch` carried, it continues right after that batch.
    """

    def __init__(
        self,
        catalog: Catalog,
        options: DecodeOptions,
        spec: PackingSpec,
        settings: StreamSettings,
        rank: int,
        worker: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.catalog, self.options, self.spec, self.settings = catalog, options, spec, settings
        self.rank, self.worker = rank, worker
        self.slice_index = settings.sharding.slice_of(rank, worker)
        self.resume_state = state
        self.epoch = int(state["epoch"]) if state else 0
        self.stats = DataStats.from_dict(state["stats"]) if state else DataStats()
        self._start_epoch()

    # --------------------------------------------------------------------------- epoch state
    def _start_epoch(self) -> None:
        settings = self.settings
        self.plan: EpochPlan = plan_epoch(
            self.catalog, settings.sharding, settings.limits, settings.skip_budget, self.epoch
        )
        self.pieces = self.plan.slices[self.slice_index]
        self.allowed_skips = allowed_skips(settings.skip_budget, self.plan.slice_length)  # 0 when strict
        self.cursor = self.batches = self.skips = 0
        sharding = settings.sharding
        rng = seeded_rng(sharding.seed, sharding.stream, self.epoch, SHUFFLE_STREAM, self.slice_index)
        self.shuffle = ShuffleBuffer(settings.shuffle_buffer, rng)
        self.packer: TokenPacker[SliceSample] = TokenPacker(
            settings.limits.max_tokens, settings.limits.max_samples, settings.pack_buffer
        )
        # Items of a batch that a failed decode of another item left unmade: kept for the next.
        self.decoded: dict[int, DecodedItem] = {}  # slice position -> its decoded item

    @property
    def epoch_done(self) -> bool:
        return self.batches == self.plan.batches_per_worker

    def state(self) -> dict[str, Any]:
        """JSON-serialisable: where the stream stands, with its buffers as slice positions."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "skips": self.skips,
            "cursor": self.cursor,
            "shuffle": self.shuffle.positions(),
            "shuffle_rng": self.shuffle.rng.bit_generator.state,
            "packing": self.packer.positions(),
            "stats": self.stats.to_dict(),
        }

    # -------------------------------------------------------------------------------- stream
    def __iter__(self) -> Iterator[WorkerBatch]:
        while True:
            yield from self._epoch_batches()
            self._finish_epoch()
            self.epoch += 1
            self._start_epoch()

    def _epoch_batches(self) -> Iterator[WorkerBatch]:
        if self.resume_state is not None:
            samples = self._restore(self.resume_state)
            self.resume_state = None
        else:
            if self.slice_index == 0:  # one worker of one rank reports the epoch's broken shards
                self._report_shard_problems()
            samples = read_slice(self.catalog, self.pieces, 0)
        try:
            yield from self._read_and_pack(samples)
        finally:
            samples.close()  # the open shard, when the quota was met before the slice's end

    def _read_and_pack(self, samples: Iterator[SliceSample]) -> Iterator[WorkerBatch]:
        for sample in samples:
            if self.epoch_done:  # a state saved with the epoch's last batch
                return
            self.cursor = sample.position + 1
            self.stats.samples_read += 1
            self.stats.bytes_read += sample.raw.nbytes
            reject = self.catalog.shards[sample.shard].rejects.get(sample.shard_position)
            if reject is not None:
                self._skip(reject)
                continue
            shuffled = self.shuffle.push(sample)
            if shuffled is not None:
                yield from self._pack(shuffled)
            if self.epoch_done:
                return
        while not self.epoch_done and (shuffled := self.shuffle.pop()) is not None:
            yield from self._pack(shuffled)
        while not self.epoch_done and len(self.packer):
            batch = self._emit()
            if batch is not None:
                yield batch
        if not self.epoch_done:
            raise DataExhausted(
                f"rank {self.rank} worker {self.worker}, epoch {self.epoch}: its share of "
                f"{self.plan.slice_length} samples ran out after {self.batches} of the "
                f"{self.plan.batches_per_worker} batches the plan counted on; skipped: {self.stats.skipped_by_reason()}"
            )

    def _hold(self, sample: SliceSample) -> None:
        shard = self.catalog.shards[sample.shard]
        tokens, samples = shard.tokens[sample.shard_position], shard.samples[sample.shard_position]
        self.packer.add(sample.position, int(tokens), int(samples), sample)

    def _pack(self, sample: SliceSample) -> Iterator[WorkerBatch]:
        self._hold(sample)
        while not self.epoch_done and self.packer.ready():
            batch = self._emit()
            if batch is not None:
                yield batch

    def _decode(self, sample: SliceSample) -> DecodedItem | None:
        shard = self.catalog.shards[sample.shard]
        facts = shard.index.entries[sample.shard_position].facts
        tokens = int(shard.tokens[sample.shard_position])
        try:
            return decode_item(sample.raw, self.options, self.spec, facts, tokens, self.epoch)
        except DataError as error:
            self._skip(error)
            return None

    def _emit(self) -> WorkerBatch | None:
        """The packer's next batch, decoding its items now; None when one of them fails to decode.

        A failed item is skipped and leaves the buffer; the others stay, and the packer chooses
        again from what it then holds.
        """
        chosen = self.packer.select()
        failed = []
        for index in chosen:
            entry = self.packer.buffer[index]
            if entry.position not in self.decoded:
                item = self._decode(entry.item)
                if item is None:
                    failed.append(index)
                else:
                    self.decoded[entry.position] = item
        if failed:
            self.packer.take(failed)
            return None
        items = [self.decoded.pop(entry.position) for entry in self.packer.take(chosen)]
        samples = [sample for item in items for sample in item.samples]
        batch = pack_samples(samples, self.spec)
        self.batches += 1
        self.stats.batches += 1
        self.stats.samples_emitted += len(samples)
        self.stats.tokens += batch.tokens.shape[0]
        self.stats.token_budget += self.settings.limits.max_tokens
        keys = [(item.url, item.key) for item in items]
        tasks = [item.task for item in items]
        return WorkerBatch(batch, self.worker, self.epoch, keys, tasks, self.state())

    def _finish_epoch(self) -> None:
        unread = 0
        position = 0
        for piece in self.pieces:  # trainable samples of the slice never read
            first = max(piece.start, piece.start + self.cursor - position)
            unread += int((self.catalog.shards[piece.shard].samples[first : piece.stop] > 0).sum())
            position += len(piece)
        self.stats.samples_dropped += unread + len(self.shuffle.held) + len(self.packer)

    # ---------------------------------------------------------------------------- bad data
    def _skip(self, error: DataError) -> None:
        if self.settings.strict:
            raise error
        self.stats.skip(error.reason, error.shard)
        log.warning("skipped: %s", error)
        if error.reason not in SAMPLE_REASONS:
            return
        self.skips += 1
        if self.skips > self.allowed_skips:
            raise SkipBudgetExceeded(
                f"rank {self.rank} worker {self.worker}, epoch {self.epoch}: {self.skips} of the "
                f"{self.plan.slice_length} samples of its share skipped, over data.bad_data.skip_budget="
                f"{self.settings.skip_budget} (at most {self.allowed_skips}); skipped so far by reason: "
                f"{self.stats.skipped_by_reason()}; the last: {error}",
                reason=error.reason, shard=error.shard, key=error.key,
            )  # fmt: skip

    def _report_shard_problems(self) -> None:
        for shard in self.plan.shard_order:
            index = self.catalog.shards[shard].index
            if index.problem:
                self._skip(DataError(index.message, reason=index.problem, shard=index.url))

    # ------------------------------------------------------------------------------ restore
    def _restore(self, state: dict[str, Any]) -> Generator[SliceSample, None, None]:
        """Refill the buffers of ``state`` from the slice; returns the reader, at the saved cursor."""
        cursor, shuffled, packed = int(state["cursor"]), list(state["shuffle"]), list(state["packing"])
        held = set(shuffled) | set(packed)
        start = min(held | {cursor})
        samples = read_slice(self.catalog, self.pieces, start)
        found = {}
        for _ in range(cursor - start):
            sample = next(samples)
            if sample.position in held:
                found[sample.position] = sample
        self.shuffle.held = [found[position] for position in shuffled]
        self.shuffle.rng.bit_generator.state = state["shuffle_rng"]
        for position in packed:
            self._hold(found[position])
        self.cursor, self.batches, self.skips = cursor, int(state["batches"]), int(state["skips"])
        return samples
