"""Shards: specs to URLs, opening a shard (file or ``pipe:`` command), and its samples as raw bytes.

A shard is an uncompressed tar; a sample is the run of consecutive members sharing a key
(WebDataset's convention: ``dir/000123.0.png`` has key ``dir/000123`` and member name ``0.png``).
The tar reader here is a small one of our own rather than :mod:`tarfile`'s stream mode, which
ends silently on a truncated archive: this one reports the byte where the data stops, and gives
each sample's byte offset so that a reader can seek straight to it.
"""

from __future__ import annotations

import glob
import io
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, cast

import braceexpand

from imontage.untrusted import InputError

PIPE_PREFIX = "pipe:"
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_GLOB_CHARS = frozenset("*?[")
_LIST_COMMA = re.compile(r",(?![^{]*\})")  # a comma not inside braces, where `{a,b}` alternatives live
_KEY_AND_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # "dir/000123.0.png" -> ("dir/000123", "0.png")
_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1 << 24  # member data is read in pieces of this many bytes at most
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class ShardProblem(Exception):
    """A shard that cannot be read (further): ``reason`` is one of problems.SHARD_REASONS."""

    def __init__(self, reason: str, detail: str, member: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
        self.member = member  # the file member whose data was cut off, when its header was read


# ---------------------------------------------------------------------------------------------
# shard specs


def _split_top_level(spec: str) -> list[str]:
    """Split at commas outside braces, so ``a-{0..3}.tar,b/*.tar`` is two items."""
    return [item.strip() for item in _LIST_COMMA.split(spec) if item.strip()]


class ShardSpecError(InputError, FileNotFoundError):
    """A shard spec (``data.shards``) that names no file, or a range with holes."""


def _expand_item(item: str) -> list[str]:
    """The shards one spec item names: brace expansions, each a glob, a path that must exist, or a command."""
    if item.startswith(PIPE_PREFIX):
        return list(braceexpand.braceexpand(item))  # commands are not checked until they run
    paths: list[str] = []
    for pattern in braceexpand.braceexpand(os.path.expanduser(item)):
        if _GLOB_CHARS & set(pattern):
            paths.extend(sorted(glob.glob(pattern)))
        elif os.path.isfile(pattern):
            paths.append(pattern)
        elif pattern != item:
            # A range with holes would silently train on part of the data.
            raise ShardSpecError(f"shard spec item '{item}': {pattern} does not exist")
    if not paths:
        raise ShardSpecError(f"shard spec item '{item}' matches no file")
    return paths


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of a comma-separated list of globs, brace ranges, paths and ``pipe:`` commands.

    Each item's matches come sorted (a brace range in range order, zero padding kept); items keep
    their order and a shard named twice is read once, where it first appears. ``pipe:cmd args``
    runs ``cmd`` with its arguments split like a shell would split them, but without a shell, and
    reads the tar from its standard output.
    """
    items = _split_top_level(spec)
    if not items:
        raise ValueError(f"shard spec '{spec}' names no shards")
    return list(dict.fromkeys(url for item in items for url in _expand_item(item)))


def is_local(url: str) -> bool:
    return not url.startswith(PIPE_PREFIX)


# ---------------------------------------------------------------------------------------------
# opening


@contextmanager
def open_shard(url: str, offset: int = 0) -> Iterator[BinaryIO]:
    """A binary stream of the shard positioned at ``offset`` (a file seeks; a command skips bytes).

    When reading a command's output fails (a failed download shows up as an empty or short tar)
    and the command exited non-zero, the problem becomes a ``read_error`` quoting its standard
    error. A command still running when the reader is done (it needed part of the shard) is killed.
    """
    if is_local(url):
        try:
            file = open(url, "rb")  # noqa: SIM115 - closed below, after the caller is done
        except OSError as error:
            raise ShardProblem("read_error", str(error)) from error
        with file:
            file.seek(offset)
            yield file
        return
    with _run_command(url[len(PIPE_PREFIX) :]) as stream:
        _skip(stream, offset)
        yield stream


@contextmanager
def _run_command(command: str) -> Iterator[BinaryIO]:
    args = shlex.split(command)
    if not args:
        raise ShardProblem("read_error", "empty pipe: command")
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty command cannot block on it
        try:
            process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors)
        except OSError as error:
            raise ShardProblem("read_error", f"cannot run {args[0]}: {error}") from error
        assert process.stdout is not None
        try:
            yield cast(BinaryIO, process.stdout)
        except ShardProblem as problem:
            returncode = _exit_status(process)
            if returncode not in (None, 0):
                errors.seek(0)
                lines = errors.read()[-500:].decode("utf-8", "replace").splitlines()
                message = "; ".join(line.strip() for line in lines if line.strip())  # one line
                detail = f"'{command}' exited with status {returncode}: {message}"
                raise ShardProblem("read_error", detail) from problem
            raise
        finally:
            process.stdout.close()
            if process.poll() is None:
                process.kill()
            process.wait()


def _exit_status(process: subprocess.Popen[bytes]) -> int | None:
    """The exit status of a command whose output ended, or None if it does not exit promptly."""
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


def _skip(stream: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise ShardProblem("truncated_tar", f"the stream ends before byte {count}")
        count -= len(chunk)


# ---------------------------------------------------------------------------------------------
# tar members


@dataclass(frozen=True)
class TarMember:
    name: str
    data: bytes
    offset: int  # byte offset of the member's first header (long-name headers included)
    end: int  # byte offset just past its padded data


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only where the stream ends. Read in chunks: a header may claim
    any size, and one ``read(size)`` allocates all of it before the stream can say it is shorter."""
    if size <= _READ_CHUNK:
        return stream.read(size)
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(min(left, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_member_data(stream: BinaryIO, info: tarfile.TarInfo, size: int, offset: int) -> bytes:
    data = _read_exactly(stream, size)
    if len(data) != size:
        member = info.name if info.type in _FILE_TYPES else None
        detail = f"the data stops at byte {offset + len(data)}, inside member '{info.name}'"
        raise ShardProblem("truncated_tar", detail, member)
    return data


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax extended header (at byte ``offset``); ``corrupt_tar`` when
    a record's length or form is not that (a length that does not move on would loop forever)."""
    records, position = {}, 0
    while position < len(data):
        length_text, space, _ = data[position : position + 21].partition(b" ")
        length = int(length_text) if space and length_text.isdigit() else 0
        record = data[position : position + length]
        key, equals, value = record[len(length_text) + 1 : -1].partition(b"=")
        if length <= len(length_text) + 1 or len(record) != length or not equals or record[-1:] != b"\n":
            raise ShardProblem("corrupt_tar", f"invalid pax extended header at byte {offset}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _pax_size(pax: dict[str, str], info: tarfile.TarInfo, offset: int) -> int:
    """The member's data size: the pax ``size`` record's, else its header's."""
    text = pax.get("size")
    if text is None:
        if info.size < 0:  # base-256 sizes can be negative
            raise ShardProblem("corrupt_tar", f"negative member size in the tar header at byte {offset}")
        return info.size
    if not (text.isascii() and text.isdigit()):
        raise ShardProblem(
            "corrupt_tar", f"pax size '{text[:40]}' of the member at byte {offset} is not a number"
        )
    return int(text)


def _header(block: bytes, offset: int) -> tarfile.TarInfo:
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as error:
        if offset == 0:
            hint = " (gzip-compressed: shards must be uncompressed tars)" if block[:2] == _GZIP_MAGIC else ""
            raise ShardProblem("not_a_tar", f"no tar header at byte 0{hint}") from error
        raise ShardProblem("corrupt_tar", f"invalid tar header at byte {offset} ({error})") from error


def iter_tar(stream: BinaryIO, start: int = 0) -> Iterator[TarMember]:
    """The regular files of a tar stream positioned at byte ``start``, with their offsets.

    Ends at the end-of-archive marker; a stream that stops before it raises ``truncated_tar``.
    pax and GNU long names are honoured; directories, links and global headers are passed over.
    """
    offset, member_start = start, start
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        block = stream.read(BLOCK)
        if len(block) < BLOCK:
            if offset == 0:
                raise ShardProblem(
                    "not_a_tar", "the file is empty" if not block else "shorter than a tar header"
                )
            raise ShardProblem(
                "truncated_tar",
                f"the data stops at byte {offset + len(block)}, before the end-of-archive marker",
            )
        if block == _ZERO_BLOCK:
            return
        info = _header(block, offset)
        size = _pax_size(pax, info, offset)
        padded = -(-size // BLOCK) * BLOCK
        data = _read_member_data(stream, info, padded, offset + BLOCK)[:size]
        header_at, offset = offset, offset + BLOCK + padded
        if info.type == tarfile.XHDTYPE:
            pax = _pax_records(data, header_at)
            continue
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = pax.get("path", long_name or info.name)
        if info.type in _FILE_TYPES:
            yield TarMember(name, data, member_start, offset)
        long_name, pax, member_start = None, {}, offset


# ---------------------------------------------------------------------------------------------
# samples


@dataclass
class RawSample:
    """One sample's members, undecoded. ``members`` maps a member name ("json", "0.png") to bytes."""

    key: str
    url: str
    members: dict[str, bytes]
    offset: int  # byte offset of its first member in the shard
    nbytes: int  # tar bytes it spans, headers included
    duplicate: bool = False  # its key was already seen since the reader started


def split_name(path: str) -> tuple[str, str] | None:
    """(key, member name) of a tar path; None for a path without a member suffix."""
    match = _KEY_AND_NAME.match(path)
    return (match.group(1), match.group(2)) if match else None


def iter_samples(stream: BinaryIO, url: str, start: int = 0) -> Iterator[RawSample]:
    """Consecutive members sharing a key, as samples. A key met again is flagged ``duplicate``.

    A sample cut off by a truncated archive is not yielded (nor one whose end cannot be told):
    the :class:`ShardProblem` follows the last complete sample.
    """
    seen: set[str] = set()
    current: RawSample | None = None
    try:
        for member in iter_tar(stream, start):
            parts = split_name(member.name)
            if parts is None:
                continue
            key, name = parts
            if current is not None and (key != current.key or name in current.members):
                yield current  # a repeated member name starts a new sample with the same key
                current = None
            if current is None:
                current = RawSample(key, url, {}, member.offset, 0, duplicate=key in seen)
                seen.add(key)
            current.members[name] = member.data
            current.nbytes = member.end - current.offset
    except ShardProblem as problem:
        # The sample being read is complete only if the cut-off member starts the next one.
        cut = split_name(problem.member) if problem.member else None
        if current is not None and cut is not None and cut[0] != current.key:
            yield current
        raise
    if current is not None:
        yield current


def read_shard(url: str) -> Iterator[RawSample]:
    """Every sample of one shard in stored order; a shard problem raises :class:`ShardProblem`."""
    with open_shard(url) as stream:
        yield from iter_samples(stream, url)


# ---------------------------------------------------------------------------------------------
# writing


def tar_member_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header with fixed times and owners: archives are a function of their contents only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes a deterministic tar that appears under ``path`` only once :meth:`commit` is called."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.partial = self.path + ".partial"
        self.tar = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.samples = 0

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """``key.name`` for each member, in sorted name order."""
        for name in sorted(members):
            data = members[name]
            self.tar.addfile(tar_member_info(f"{key}.{name}", len(data)), io.BytesIO(data))
        self.samples += 1

    @property
    def size(self) -> int:
        """Bytes written so far (the end-of-archive blocks not included)."""
        return self.tar.offset

    def commit(self) -> None:
        self.tar.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.tar.close()
        if os.path.exists(self.partial):
            os.unlink(self.partial)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()
