"""Shard indexes: every sample of a shard with its byte offset, its problem if any, and its facts.

An index is what lets every rank plan an epoch alone and agree with the others: sample counts
split the data evenly across ranks and workers, the facts (sizes, frame counts) give each
sample's token count so that all ranks make the same number of batches, and the offsets let a
resumed worker seek to a sample instead of reading the shard from its start.

Building one reads the whole shard but decodes no pixels (json and media headers only). Tools
write it beside a local shard as ``<shard>.index.json`` (``tools/make_shards.py``,
``tools/inspect_shards.py --write-index``), or into an index folder by shard file name
(``--index-dir``, ``data.index_dir``): the way for shards read by ``pipe:`` commands, which
otherwise every rank would read in full at start. The loader uses an index file when it is
current, and otherwise indexes the shard itself, in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imontage.data.decode import inspect_sample
from imontage.data.facts import SampleFacts
from imontage.data.problems import SAMPLE_REASONS, SHARD_REASONS, DataError
from imontage.data.shards import PIPE_PREFIX, RawSample, ShardProblem, is_local, iter_samples, open_shard
from imontage.untrusted import InputError, read_json

log = logging.getLogger(__name__)

# 2: facts of pooled text, image tokens and condition latents; 3: text embedding widths, member names
INDEX_VERSION = 3
INDEX_MAX_BYTES = 1 << 28  # an index file larger than this is not read (a shard of 10^5 samples: ~30 MB)
SIDECAR_SUFFIX = ".index.json"
_INDEX_FIELDS = frozenset({"version", "file_size", "file_mtime_ns", "problem", "message", "samples"})


@dataclass
class IndexEntry:
    key: str
    offset: int
    nbytes: int
    problem: str | None = None  # a reason of problems.SAMPLE_REASONS, known from the bytes alone
    message: str = ""  # the DataError message of the problem
    facts: SampleFacts | None = None  # None when the sample has a problem

    def to_json(self) -> list[Any]:
        return [
            self.key,
            self.offset,
            self.nbytes,
            self.problem,
            self.message,
            self.facts and self.facts.to_json(),
        ]

    @classmethod
    def from_json(cls, row: Any) -> IndexEntry:
        """A row as :meth:`to_json` wrote it; a ValueError saying what is not."""
        if not isinstance(row, list) or len(row) != 6:
            raise ValueError("expected [key, offset, nbytes, problem, message, facts]")
        key, offset, nbytes, problem, message, facts = row
        if not isinstance(key, str) or not isinstance(message, str):
            raise ValueError("the key and the message must be strings")
        if (
            not all(isinstance(n, int) and not isinstance(n, bool) for n in (offset, nbytes))
            or offset < 0
            or nbytes <= 0
        ):
            raise ValueError(f"offset {offset!r} and size {nbytes!r} must be whole numbers, the size above 0")
        if problem not in (None, *SAMPLE_REASONS):
            raise ValueError(f"problem {str(problem)[:40]!r} is not a sample problem")
        if (problem is None) == (facts is None):
            raise ValueError("a sample has either a problem or facts")
        return cls(
            key, offset, nbytes, problem, message, None if facts is None else SampleFacts.from_json(facts)
        )


@dataclass
class ShardIndex:
    url: str
    entries: list[IndexEntry] = field(default_factory=list)
    problem: str | None = None  # a reason of problems.SHARD_REASONS: samples after the last entry are lost
    message: str = ""
    file_size: int | None = None  # local shards: what the index was built from
    file_mtime_ns: int | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "file_size": self.file_size,
            "file_mtime_ns": self.file_mtime_ns,
            "problem": self.problem,
            "message": self.message,
            "samples": [entry.to_json() for entry in self.entries],
        }

    @classmethod
    def from_json(cls, url: str, data: Any) -> ShardIndex:
        """An index as :meth:`to_json` wrote it (of any version: the caller checks it); a ValueError
        saying what is not. Entries must lie one after the other in the shard (inside the file,
        for a local one)."""
        if not isinstance(data, dict) or set(data) != _INDEX_FIELDS:
            raise ValueError(f"expected an object of the fields {', '.join(sorted(_INDEX_FIELDS))}")
        size, mtime, samples = data["file_size"], data["file_mtime_ns"], data["samples"]
        if not all(
            value is None or (isinstance(value, int) and not isinstance(value, bool))
            for value in (size, mtime)
        ):
            raise ValueError("file_size and file_mtime_ns must be whole numbers or null")
        if data["problem"] not in (None, *SHARD_REASONS) or not isinstance(data["message"], str):
            raise ValueError(f"problem {str(data['problem'])[:40]!r} is not a shard problem")
        if not isinstance(samples, list):
            raise ValueError("samples must be a list")
        entries, end = [], 0
        for number, row in enumerate(samples):
            try:
                entry = IndexEntry.from_json(row)
                if entry.offset < end or (size is not None and entry.offset + entry.nbytes > size):
                    raise ValueError(
                        f"bytes {entry.offset}..{entry.offset + entry.nbytes} overlap the sample before or pass the file's end"
                    )
            except ValueError as error:
                raise ValueError(f"samples[{number}]: {error}") from None
            entries.append(entry)
            end = entry.offset + entry.nbytes
        return cls(url, entries, data["problem"], data["message"], size, mtime)

    def problems(self) -> Iterator[DataError]:
        """The shard's problems in stored order, its shard-level problem last."""
        for entry in self.entries:
            if entry.problem:
                yield DataError(entry.message, reason=entry.problem, shard=self.url, key=entry.key)
        if self.problem:
            yield DataError(self.message, reason=self.problem, shard=self.url)


def _entry(raw: RawSample) -> IndexEntry:
    entry = IndexEntry(raw.key, raw.offset, raw.nbytes)
    if raw.duplicate:
        error = DataError.of("duplicate_key", raw.url, raw.key, "the key appears earlier in the shard")
        entry.problem, entry.message = error.reason, str(error)
        return entry
    try:
        _, entry.facts = inspect_sample(raw)
    except DataError as error:
        entry.problem, entry.message = error.reason, str(error)
    return entry


def _file_stat(url: str) -> tuple[int | None, int | None]:
    if not is_local(url):
        return None, None
    try:
        stat = os.stat(url)
    except OSError:
        return None, None
    return stat.st_size, stat.st_mtime_ns


def scan_shard(url: str) -> ShardIndex:
    """Index a shard by reading it: the samples before a shard problem, then the problem."""
    size, mtime = _file_stat(url)
    index = ShardIndex(url, file_size=size, file_mtime_ns=mtime)
    try:
        with open_shard(url) as stream:
            for raw in iter_samples(stream, url):
                index.entries.append(_entry(raw))
    except ShardProblem as problem:
        error = DataError.of(problem.reason, url, None, problem.detail)
        index.problem, index.message = error.reason, str(error)
    return index


def shard_name(url: str) -> str:
    """The file name a shard is known by: a path's base name, or that of a command's last ``.tar`` argument."""
    if is_local(url):
        return os.path.basename(url)
    tars = [arg for arg in shlex.split(url[len(PIPE_PREFIX) :]) if ".tar" in arg]
    if not tars:
        raise ValueError(f"cannot tell the shard file of '{url}': no argument names a .tar")
    return tars[-1].rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def index_path(url: str, index_dir: str = "") -> str | None:
    """Where a shard's index lives: ``index_dir/<shard name>.index.json``, or beside a local shard."""
    if index_dir:
        return os.path.join(index_dir, shard_name(url) + SIDECAR_SUFFIX)
    return url + SIDECAR_SUFFIX if is_local(url) else None


def write_index(index: ShardIndex, index_dir: str = "") -> str:
    """Write the shard's index file atomically (see :func:`index_path`); returns its path."""
    path = index_path(index.url, index_dir)
    if path is None:
        raise ValueError(f"{index.url}: a shard read by a command needs an index_dir for its index")
    partial = f"{path}.partial.{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(index.to_json(), file, separators=(",", ":"))
    os.replace(partial, path)
    return path


def read_sidecar(url: str, index_dir: str = "") -> ShardIndex | None:
    """The shard's index file if there is one and it is current, else None (a stale one is logged).

    Current: written by this index version and, for a local shard, from a file of the shard's
    present size and mtime. A command's output cannot be checked ahead; reading it checks every
    key against the index instead, and decoding a sample checks its facts against its headers.
    A file that is not an index (an error page, JSON of another shape) is an
    :class:`~imontage.untrusted.InputError` naming it.
    """
    path = index_path(url, index_dir)
    if path is None or not os.path.isfile(path):
        return None
    data = read_json(Path(path), dict, INDEX_MAX_BYTES)
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"{path}: not a shard index (no version); remove it to index {url} again")
    if version != INDEX_VERSION:  # another layout, not checked against this one
        log.warning("%s is of index version %d, not %d: indexing %s again", path, version, INDEX_VERSION, url)
        return None
    try:
        index = ShardIndex.from_json(url, data)
    except ValueError as error:
        raise InputError(f"{path}: not a shard index of {url}: {error}") from None
    if is_local(url) and (index.file_size, index.file_mtime_ns) != _file_stat(url):
        log.warning("%s is out of date (the size or mtime of %s changed): indexing again", path, url)
        return None
    return index


def load_index(url: str, index_dir: str = "") -> ShardIndex:
    return read_sidecar(url, index_dir) or scan_shard(url)


def load_indexes(urls: Sequence[str], index_dir: str = "", progress: bool = False) -> list[ShardIndex]:
    """Indexes of ``urls`` in order: current index files, or scans (logged, since they read every byte)."""
    started, scanned = time.perf_counter(), 0
    indexes = []
    for url in tqdm(urls, desc="indexing shards", unit="shard", disable=not progress):
        index = read_sidecar(url, index_dir)
        if index is None:
            index, scanned = scan_shard(url), scanned + 1
        indexes.append(index)
    if scanned:
        log.info(
            "indexed %d of %d shards by reading them (%.1f s); write their indexes once with "
            "tools/inspect_shards.py --write-index [--index-dir] to skip this",
            scanned, len(urls), time.perf_counter() - started,
        )  # fmt: skip
    return indexes
