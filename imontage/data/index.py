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
from typing import Any

from tqdm import tqdm

from imontage.data.decode import SampleFacts, inspect_sample
from imontage.data.problems import DataError
from imontage.data.shards import PIPE_PREFIX, RawSample, ShardProblem, is_local, iter_samples, open_shard

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: facts of pooled text, image tokens and condition latents
SIDECAR_SUFFIX = ".index.json"


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
    def from_json(cls, row: list[Any]) -> IndexEntry:
        key, offset, nbytes, problem, message, facts = row
        return cls(key, offset, nbytes, problem, message, facts and SampleFacts.from_json(facts))


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
    def from_json(cls, url: str, data: dict[str, Any]) -> ShardIndex:
        entries = [IndexEntry.from_json(row) for row in data["samples"]]
        return cls(url, entries, data["problem"], data["message"], data["file_size"], data["file_mtime_ns"])

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
    key against the index instead.
    """
    path = index_path(url, index_dir)
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    stale = data.get("version") != INDEX_VERSION
    if is_local(url):
        stale = stale or (data["file_size"], data["file_mtime_ns"]) != _file_stat(url)
    if stale:
        log.warning("%s is out of date (version, size or mtime of %s changed): indexing again", path, url)
        return None
    return ShardIndex.from_json(url, data)


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
