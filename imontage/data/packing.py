"""Packing samples into micro-batches under a token budget, from their token counts alone.

The packer keeps a buffer of items with their token and sample counts (known from the catalog
before anything is decoded). When it is full it makes one batch: the oldest item first (so
nothing waits forever), then, largest first, every other item that still fits the token budget
and the sample cap. From a buffer of a few dozen mixed images and videos this fills the budget
to within a few percent. Without a token budget a batch is the oldest items that fit the sample
cap, in order. Choices depend only on the buffer's order and sizes: deterministic. What an item
is (a raw sample waiting to be decoded, in the loader) is up to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass
class Buffered(Generic[Item]):
    position: int  # where the item sits in its worker's slice: the handle a saved state keeps
    tokens: int
    num_samples: int  # training samples the item makes (2 for a preference pair)
    item: Item


class TokenPacker(Generic[Item]):
    def __init__(self, max_tokens: int, max_samples: int, buffer_size: int) -> None:
        if not max_tokens and not max_samples:
            raise ValueError("packing needs a token budget, a sample cap, or both")
        self.max_tokens = max_tokens
        self.max_samples = max_samples
        self.buffer_size = buffer_size
        self.buffer: list[Buffered[Item]] = []

    def __len__(self) -> int:
        return len(self.buffer)

    def add(self, position: int, tokens: int, num_samples: int, item: Item) -> None:
        self.buffer.append(Buffered(position, tokens, num_samples, item))

    def positions(self) -> list[int]:
        return [entry.position for entry in self.buffer]

    def ready(self) -> bool:
        """Whether the buffer is full enough to make a batch without waiting for more items."""
        if self.max_tokens:
            return len(self.buffer) >= self.buffer_size
        return sum(entry.num_samples for entry in self.buffer) >= self.max_samples

    def _fits(self, entry: Buffered[Item], tokens: int, samples: int) -> bool:
        within_budget = not self.max_tokens or tokens + entry.tokens <= self.max_tokens
        within_cap = not self.max_samples or samples + entry.num_samples <= self.max_samples
        return within_budget and within_cap

    def select(self) -> list[int]:
        """Buffer indices of the next batch, in buffer order; the buffer must not be empty."""
        first = self.buffer[0]
        chosen, tokens, samples = [0], first.tokens, first.num_samples
        candidates = range(1, len(self.buffer))
        if self.max_tokens:  # largest first; a stable sort keeps the older of equal sizes first
            candidates = sorted(candidates, key=lambda i: -self.buffer[i].tokens)  # type: ignore[assignment]
        for index in candidates:
            entry = self.buffer[index]
            if self._fits(entry, tokens, samples):
                chosen.append(index)
                tokens, samples = tokens + entry.tokens, samples + entry.num_samples
            if (self.max_tokens and tokens == self.max_tokens) or samples == self.max_samples:
                break
        return sorted(chosen)

    def take(self, indices: Sequence[int]) -> list[Buffered[Item]]:
        """The entries at buffer ``indices``, removed from the buffer, in buffer order."""
        kept = set(indices)
        taken = [entry for index, entry in enumerate(self.buffer) if index in kept]
        self.buffer = [entry for index, entry in enumerate(self.buffer) if index not in kept]
        return taken

    def pop_batch(self) -> list[Buffered[Item]]:
        """The next batch's entries, removed from the buffer; the buffer must not be empty."""
        return self.take(self.select())
