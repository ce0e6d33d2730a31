"""A dataset as one recipe sees it: its shard indexes plus, per sample, its token count or why it is skipped.

Built once per loader from the indexes (no pixels decoded). Every rank builds the same catalog,
which is what lets them plan epochs alone and still agree on the number of batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from imontage.data.decode import DecodeOptions, plan_item
from imontage.data.index import IndexEntry, ShardIndex, load_indexes
from imontage.data.problems import DataError
from imontage.models.common.sequence import PackingSpec


@dataclass(frozen=True)
class PackingLimits:
    max_tokens: int  # token budget of a micro-batch; 0: none
    max_samples: int  # samples in a micro-batch at most; 0: no cap


@dataclass
class ShardCatalog:
    index: ShardIndex
    tokens: np.ndarray  # [n] int64: tokens of each item as trained; 0 when it is skipped
    samples: np.ndarray  # [n] int64: training samples of each item (2 for a pair); 0 when skipped
    rejects: dict[int, DataError]  # position in the shard -> why the sample is skipped

    @property
    def url(self) -> str:
        return self.index.url


def _verdict(
    entry: IndexEntry, url: str, options: DecodeOptions, spec: PackingSpec, limits: PackingLimits
) -> tuple[int, int]:
    """(tokens, samples) of a sample the recipe can train; a DataError otherwise."""
    if entry.problem:
        raise DataError(entry.message, reason=entry.problem, shard=url, key=entry.key)
    assert entry.facts is not None
    plan = plan_item(entry.facts, options, spec, url, entry.key)
    if limits.max_tokens and plan.tokens > limits.max_tokens:
        raise DataError.of(
            "unpackable", url, entry.key, f"{plan.tokens} tokens, over data.max_tokens={limits.max_tokens}"
        )
    if limits.max_samples and plan.num_samples > limits.max_samples:
        detail = f"a pair of {plan.num_samples} samples, over data.batch_size={limits.max_samples}"
        raise DataError.of("unpackable", url, entry.key, detail)
    return plan.tokens, plan.num_samples


def catalog_shard(
    index: ShardIndex, options: DecodeOptions, spec: PackingSpec, limits: PackingLimits
) -> ShardCatalog:
    tokens = np.zeros(len(index), dtype=np.int64)
    samples = np.zeros(len(index), dtype=np.int64)
    rejects: dict[int, DataError] = {}
    for position, entry in enumerate(index.entries):
        try:
            tokens[position], samples[position] = _verdict(entry, index.url, options, spec, limits)
        except DataError as error:
            rejects[position] = error
    return ShardCatalog(index, tokens, samples, rejects)


class Catalog:
    """The shards of one dataset, in spec order, with every sample's verdict under the recipe."""

    def __init__(self, shards: list[ShardCatalog]) -> None:
        if not shards:
            raise ValueError("a dataset needs at least one shard")
        self.shards = shards

    @classmethod
    def build(
        cls,
        urls: Sequence[str],
        options: DecodeOptions,
        spec: PackingSpec,
        limits: PackingLimits,
        index_dir: str = "",
    ) -> Catalog:
        return cls([catalog_shard(index, options, spec, limits) for index in load_indexes(urls, index_dir)])

    @property
    def num_samples(self) -> int:
        return sum(len(shard.index) for shard in self.shards)

    @property
    def num_trainable(self) -> int:
        return sum(int((shard.samples > 0).sum()) for shard in self.shards)

    def problems(self) -> Iterator[DataError]:
        """Every problem known before decoding, shard by shard in spec order."""
        for shard in self.shards:
            yield from (shard.rejects[position] for position in sorted(shard.rejects))
            if shard.index.problem:
                yield DataError(shard.index.message, reason=shard.index.problem, shard=shard.url)
