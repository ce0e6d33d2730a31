"""Bad data: the reasons a shard or sample is skipped, the error that names it, and the counters.

Every problem has one reason from :data:`REASONS`. In the default mode a problem costs a counter
(per reason and per shard) and the sample is skipped; in ``strict`` mode it raises a
:class:`DataError` naming the shard and the key. The counters travel with the loader state, so a
resumed run keeps counting where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imontage.untrusted import InputError

# Shard-level problems: the shard's samples from that point on are unreachable.
SHARD_REASONS = (
    "not_a_tar",  # the first header is not a tar header (or the file is empty)
    "truncated_tar",  # the stream ends inside a member or without the end-of-archive marker
    "corrupt_tar",  # an invalid header after the first
    "read_error",  # the file cannot be opened, or a `pipe:` command fails
)
# Sample-level problems: one sample is skipped.
SAMPLE_REASONS = (
    "duplicate_key",  # a key already seen in the shard (the first sample with the key is kept)
    "bad_json",  # no json member, not UTF-8 json, or not the documented schema
    "missing_member",  # the json names a member the sample does not have
    "unsafe_member",  # a member that would need pickle to load (.pth, .pkl, .pyd, object arrays)
    "undecodable",  # an image, video or array that cannot be decoded
    "format_mismatch",  # bytes not of the format the extension names, or a codec not allowed
    "too_many_pixels",  # an image (or video frame) over data.bad_data.max_pixels
    "too_many_frames",  # a video over data.bad_data.max_video_frames, caught before decoding
    "non_finite",  # a latent, text embedding or other array member holding NaN or Inf
    "unpackable",  # does not fit the model: patch size, channels, layout or the token budget
)
REASONS = SHARD_REASONS + SAMPLE_REASONS


class DataError(InputError):
    """A bad shard or sample; the message names the shard, the key (for samples) and the reason.

    An :class:`~imontage.untrusted.InputError`: the tools and ``imontage-train`` print it as one
    line and exit with status 2. Constructible from the message alone, so that a DataLoader worker
    can re-raise it in the main process with its type.
    """

    def __init__(self, message: str, *, reason: str = "", shard: str = "", key: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.shard, self.key = reason, shard, key

    @classmethod
    def of(cls, reason: str, shard: str, key: str | None, detail: str) -> DataError:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-data reason '{reason}'")
        where = f"shard {shard}" if key is None else f"shard {shard}, sample '{key}'"
        return cls(f"{where}: {reason}: {detail}", reason=reason, shard=shard, key=key)


class SkipBudgetExceeded(DataError):
    """More samples were skipped than ``data.bad_data.skip_budget`` allows: the run stops."""


class DataExhausted(RuntimeError):
    """A worker's share of an epoch ran out before it made the epoch's batches."""


@dataclass
class DataStats:
    """Counters of one worker (or, summed, of a loader). JSON-serialisable through :meth:`to_dict`."""

    samples_read: int = 0  # raw samples read from shards, bad ones included
    samples_emitted: int = 0  # samples put into batches (a preference pair counts two)
    samples_dropped: int = 0  # trainable samples left over, undecoded, when a worker met its epoch quota
    batches: int = 0
    tokens: int = 0  # tokens in emitted batches
    token_budget: int = 0  # batches x max_tokens (0 without a token budget)
    bytes_read: int = 0  # tar bytes of the samples read
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> shard -> count

    def skip(self, reason: str, shard: str) -> None:
        per_shard = self.skipped.setdefault(reason, {})
        per_shard[shard] = per_shard.get(shard, 0) + 1

    @property
    def samples_skipped(self) -> int:
        """Sample-level skips (shard-level problems are not samples)."""
        return sum(sum(self.skipped.get(reason, {}).values()) for reason in SAMPLE_REASONS)

    def skipped_by_reason(self) -> dict[str, int]:
        return {reason: sum(shards.values()) for reason, shards in sorted(self.skipped.items())}

    @property
    def padding(self) -> float:
        """Unused fraction of the token budget over the emitted batches (0 without a budget)."""
        return 1.0 - self.tokens / self.token_budget if self.token_budget else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples_read": self.samples_read,
            "samples_emitted": self.samples_emitted,
            "samples_dropped": self.samples_dropped,
            "batches": self.batches,
            "tokens": self.tokens,
            "token_budget": self.token_budget,
            "bytes_read": self.bytes_read,
            "skipped": {reason: dict(shards) for reason, shards in self.skipped.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> DataStats:
        counts = {name: int(state[name]) for name in _COUNTERS}
        skipped = {
            reason: {shard: int(n) for shard, n in shards.items()}
            for reason, shards in state["skipped"].items()
        }
        return cls(**counts, skipped=skipped)

    @classmethod
    def total(cls, parts: Iterable[DataStats]) -> DataStats:
        out = cls()
        for part in parts:
            for name in _COUNTERS:
                setattr(out, name, getattr(out, name) + getattr(part, name))
            for reason, shards in part.skipped.items():
                for shard, count in shards.items():
                    out.skipped.setdefault(reason, {})
                    out.skipped[reason][shard] = out.skipped[reason].get(shard, 0) + count
        return out

    def scalars(self) -> dict[str, float]:
        """Flat numbers for TensorBoard: totals, padding and skips per reason."""
        values: dict[str, float] = {
            "samples_read": self.samples_read,
            "samples_emitted": self.samples_emitted,
            "samples_skipped": self.samples_skipped,
            "samples_dropped": self.samples_dropped,
            "bytes_read": self.bytes_read,
            "padding": self.padding,
        }
        values.update({f"skipped/{reason}": count for reason, count in self.skipped_by_reason().items()})
        return values

    def summary_lines(self) -> list[str]:
        """A human-readable report: what was read and emitted, and every skip by reason and shard."""
        lines = [
            f"samples read {self.samples_read}, emitted {self.samples_emitted} in {self.batches} batches, "
            f"skipped {self.samples_skipped}, dropped at epoch ends {self.samples_dropped}; "
            f"{self.bytes_read / 1e6:.1f} MB read"
        ]
        if self.token_budget:
            lines.append(
                f"tokens {self.tokens} of a budget of {self.token_budget}: padding {self.padding:.2%}"
            )
        for reason, shards in sorted(self.skipped.items()):
            lines.append(f"skipped {reason}: {sum(shards.values())}")
            lines.extend(f"    {count:6d}  {shard}" for shard, count in sorted(shards.items()))
        return lines


_COUNTERS = (
    "samples_read",
    "samples_emitted",
    "samples_dropped",
    "batches",
    "tokens",
    "token_budget",
    "bytes_read",
)
