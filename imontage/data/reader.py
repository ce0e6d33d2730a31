"""The plain shard reader: WebDataset tars -> decoded samples -> packed batches, resumable exactly.

Everything the trainer needs sits behind :func:`build_loader`, so a production pipeline can take
its place later. The sample stream is a pure function of (shards, seed, epoch): each epoch
shuffles the shard order, reads the shards in turn and passes their samples through a seeded
shuffle buffer. Batches are consecutive runs of ``batch_size`` samples of the endless stream of
epochs, so a batch may span two epochs and every batch is full. Resuming replays the stream of
the saved epoch up to the saved offset from raw tar bytes, decoding only samples it yields.

Single process, no DataLoader workers, and every rank reads every shard: splitting shards or
samples across data-parallel ranks is left to the production pipeline.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
from collections.abc import Iterator
from typing import Any

import braceexpand
import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from imontage.config.schema import DataConfig
from imontage.models.dit.sequence import PackedBatch, PackingSpec, Sample, Segment, pack_samples

RawSample = dict[str, Any]  # webdataset's grouping: "__key__", "__url__", then member name -> bytes
_GLOB_CHARS = frozenset("*?[")
_LIST_COMMA = re.compile(r",(?![^{]*\})")  # a comma not inside braces, where `{a,b}` alternatives live
_DECODED_KINDS = ("image", "video")


# ---------------------------------------------------------------------------------------------
# shard lists


def _split_top_level(spec: str) -> list[str]:
    """Split at commas outside braces, so ``a-{0..3}.tar,b/*.tar`` is two items."""
    return [item.strip() for item in _LIST_COMMA.split(spec) if item.strip()]


def _expand_item(item: str) -> list[str]:
    """The files one spec item names: its brace expansions, each a glob or a path that must exist."""
    paths: list[str] = []
    for pattern in braceexpand.braceexpand(os.path.expanduser(item)):
        if _GLOB_CHARS & set(pattern):
            paths.extend(sorted(glob.glob(pattern)))
        elif os.path.isfile(pattern):
            paths.append(pattern)
        elif pattern != item:
            # A range with holes would silently train on part of the data.
            raise FileNotFoundError(f"shard spec item '{item}': {pattern} does not exist")
    if not paths:
        raise FileNotFoundError(f"shard spec item '{item}' matches no file")
    return paths


def expand_shards(spec: str) -> list[str]:
    """Shard paths of a comma-separated list of globs, brace ranges and paths.

    Each item's matches come sorted (a brace range in range order, zero padding kept); items keep
    their order and a path named twice is read once, where it first appears.
    """
    items = _split_top_level(spec)
    if not items:
        raise ValueError(f"shard spec '{spec}' names no shards")
    return list(dict.fromkeys(path for item in items for path in _expand_item(item)))


# ---------------------------------------------------------------------------------------------
# decoding


def _member(raw: RawSample, name: str, where: str) -> bytes:
    if name not in raw:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise ValueError(f"{where}: member '{name}' is missing (members: {', '.join(members)})")
    return raw[name]


def _decode_png(data: bytes, where: str) -> torch.Tensor:
    """``[3, H, W]`` float32 in [-1, 1] from encoded image bytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.array(image.convert("RGB"))  # [H, W, 3] uint8, writable for torch
    except Exception as error:  # PIL raises several types for broken data
        raise ValueError(f"{where}: cannot decode image ({error})") from error
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0


def _decode_frames(raw: RawSample, members: list[str], where: str) -> torch.Tensor:
    """``[3, T, H, W]`` from one image member per frame."""
    frames = [_decode_png(_member(raw, name, where), f"{where}, member '{name}'") for name in members]
    sizes = {tuple(frame.shape) for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"{where}: frames {members} differ in size {sorted(sizes)}")
    return torch.stack(frames, dim=1)


def _segment_members(entry: dict[str, Any], where: str) -> list[str]:
    kind = entry.get("kind")
    if kind not in _DECODED_KINDS:
        raise ValueError(
            f"{where}: segment kind '{kind}' is not read by the plain reader (it reads {', '.join(_DECODED_KINDS)})"
        )
    members = [entry["member"]] if kind == "image" else entry.get("frames")
    if not members or not all(isinstance(name, str) for name in members):
        field = "member" if kind == "image" else "frames"
        raise ValueError(f"{where}: {kind} segment needs '{field}' naming its image members, got {entry}")
    return members


def _decode_segment(raw: RawSample, entry: dict[str, Any], where: str) -> Segment:
    members = _segment_members(entry, where)
    data = _decode_frames(raw, members, where)  # [3, T, H, W]
    anchor = entry.get("anchor")
    if anchor is not None and (not isinstance(anchor, int) or isinstance(anchor, bool)):
        raise ValueError(f"{where}: anchor must be an integer frame index, got {anchor!r}")
    try:
        return Segment(entry["kind"], role=entry.get("role", "condition"), data=data, anchor=anchor)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def _parse_record(raw: RawSample, where: str) -> dict[str, Any]:
    try:
        record = json.loads(_member(raw, "json", where).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where}, member 'json': not UTF-8 json ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("segments"), list):
        raise ValueError(f"{where}, member 'json': expected an object with a 'segments' list")
    return record


def decode_sample(raw: dict[str, bytes], key: str, url: str) -> Sample:
    """A :class:`Sample` from one sample's tar members: its text first, then its segments in order.

    Images become ``[3, 1, H, W]`` and videos ``[3, T, H, W]`` float32 RGB in [-1, 1].
    """
    where = f"shard {url}, sample '{key}'"
    record = _parse_record(raw, where)
    text = record.get("text") or ""
    if not isinstance(text, str):
        raise ValueError(f"{where}, member 'json': 'text' must be a string, got {text!r}")
    segments = [Segment("text", text=text)] if text else []
    for index, entry in enumerate(record["segments"]):
        try:
            segments.append(_decode_segment(raw, entry, f"{where}, segment {index}"))
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{where}, member 'json': malformed segment {index} ({error!r})") from error
    return Sample(segments, key=key, task=str(record.get("task", "")))


# ---------------------------------------------------------------------------------------------
# the sample stream


def read_shard(url: str) -> Iterator[RawSample]:
    """Raw samples of one tar in stored order: members grouped by key, nothing decoded."""
    with open(url, "rb") as stream:
        files = tar_file_expander([{"url": url, "stream": stream}])
        # lcase=False: member names must match the json's spelling exactly.
        yield from group_by_keys(files, lcase=False)


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """Stable across processes and Python runs, unlike ``hash((seed, epoch))``."""
    return random.Random(seed * 1_000_003 + epoch)


def buffer_shuffle(samples: Iterator[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """Yield a random sample of a full buffer of ``size`` for each one read; drain shuffled at the end."""
    buffer: list[RawSample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def epoch_samples(shards: list[str], seed: int, epoch: int, buffer_size: int) -> Iterator[RawSample]:
    """One epoch of raw samples; ``buffer_size == 0`` reads shards and samples in stored order."""
    if buffer_size == 0:
        return (sample for url in shards for sample in read_shard(url))
    rng = epoch_rng(seed, epoch)
    order = list(shards)
    rng.shuffle(order)
    return buffer_shuffle((sample for url in order for sample in read_shard(url)), buffer_size, rng)


# ---------------------------------------------------------------------------------------------
# the loader


class ShardLoader:
    """Endless iterator of :class:`PackedBatch` of ``batch_size`` samples, resumable exactly.

    Position in the stream: ``epoch`` and ``offset``, the number of that epoch's samples already
    consumed. It moves to ``(epoch + 1, 0)`` as soon as an epoch's last sample is consumed, so a
    saved state never makes the resumed loader replay a finished epoch.
    """

    def __init__(
        self, shards: list[str], spec: PackingSpec, batch_size: int, buffer_size: int, seed: int
    ) -> None:
        if not shards:
            raise ValueError("the loader needs at least one shard")
        if batch_size < 1 or buffer_size < 0:
            raise ValueError(
                f"need batch_size >= 1 and shuffle_buffer >= 0, got {batch_size} and {buffer_size}"
            )
        self.shards = list(shards)
        self.spec = spec
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.seed = seed
        self.epoch = 0
        self.offset = 0  # samples of `epoch` consumed
        self.samples_seen = 0
        self._stream: Iterator[tuple[RawSample, bool]] | None = None

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> PackedBatch:
        samples = [self._decode(self._next_raw()) for _ in range(self.batch_size)]
        return pack_samples(samples, self.spec)

    def _decode(self, raw: RawSample) -> Sample:
        return decode_sample(raw, raw["__key__"], raw["__url__"])

    def _next_raw(self) -> RawSample:
        if self._stream is None:
            self._stream = self._raw_stream(self.epoch, self.offset)
        raw, last_of_epoch = next(self._stream)
        self.samples_seen += 1
        self.epoch, self.offset = (self.epoch + 1, 0) if last_of_epoch else (self.epoch, self.offset + 1)
        return raw

    def _raw_stream(self, epoch: int, skip: int) -> Iterator[tuple[RawSample, bool]]:
        """(raw sample, whether it ends its epoch) from ``skip`` samples into ``epoch``, endlessly."""
        while True:
            flagged = _flag_last(epoch_samples(self.shards, self.seed, epoch, self.buffer_size))
            yielded = False
            for position, item in enumerate(flagged):
                if position >= skip:
                    yielded = True
                    yield item
            if not yielded:
                raise ValueError(
                    f"epoch {epoch} has no samples past offset {skip} in {len(self.shards)} shards "
                    f"({self.shards[0]}, ...): the shards are empty or changed since the state was saved"
                )
            epoch, skip = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream; the shard count guards against changed data."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
            "samples_seen": self.samples_seen,
            "num_shards": len(self.shards),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved ``state`` would have."""
        if state["seed"] != self.seed or state["num_shards"] != len(self.shards):
            raise ValueError(
                f"loader state was saved with seed {state['seed']} over {state['num_shards']} shards; "
                f"this loader has seed {self.seed} over {len(self.shards)} shards"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.samples_seen = int(state["samples_seen"])
        self._stream = None  # rebuilt lazily from (epoch, offset) by the next batch


def _flag_last(items: Iterator[RawSample]) -> Iterator[tuple[RawSample, bool]]:
    """Each item with whether it is the last one; reads one item ahead."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def build_loader(data_cfg: DataConfig | Any, spec: PackingSpec) -> ShardLoader:
    """The training data loader of a recipe's ``data`` section (:class:`DataConfig`)."""
    return ShardLoader(
        expand_shards(str(data_cfg.shards)),
        spec,
        batch_size=int(data_cfg.batch_size),
        buffer_size=int(data_cfg.shuffle_buffer),
        seed=int(data_cfg.seed),
    )


def preview_samples(data_cfg: Any, count: int) -> list[Sample]:
    """The first ``count`` samples of the shards in stored order: a fixed set to sample from."""
    samples: list[Sample] = []
    for url in expand_shards(str(data_cfg.shards)):
        for raw in read_shard(url):
            if len(samples) == count:
                return samples
            samples.append(decode_sample(raw, raw["__key__"], url))
    return samples


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """An image file as a ``[3, 1, H, W]`` segment in [-1, 1]."""
    with open(path, "rb") as file:
        return _decode_png(file.read(), str(path)).unsqueeze(1)
