"""DeepSpeed ZeRO-3 checkpoints of imontage, read one single-device tensor at a time.

A checkpoint ``step_N/`` written by :class:`~imontage.train.backends.DeepSpeedBackend` holds, for
every TP rank ``r`` and every rank ``z`` of the ZeRO group (the DP×CP ranks):

- ``zero_pp_rank_{z}_mp_rank_{r:02d}_model_states.pt``: ``param_shapes``, one ordered
  ``{name: TP-local shape}`` per ZeRO sub-group (the order the flat partitions are laid out in);
- ``zero_pp_rank_{z}_mp_rank_{r:02d}_optim_states.pt``: per sub-group, the flat fp32 master
  partition (``fp32_flat_groups``) and the AdamW moments over it (``exp_avg``, ``exp_avg_sq``,
  ``step``);
- ``rank_{g:05d}.safetensors`` with ``g = r + TP·z``: ``ema.<name>``, the EMA of what the rank
  holds of the parameter (:func:`imontage.train.ema.held_tensor`).

ZeRO-3 cuts every TP-local parameter of ``n`` elements into ``Z`` partitions of
``p = ceil(n / Z)`` elements, the last one padded with zeros
(``deepspeed/runtime/zero/partition_parameters.py``: ``_partition_param``;
``deepspeed/utils/zero_to_fp32.py``: ``zero3_partitioned_param_info``). A sub-group's flat
partition on rank ``z`` is the concatenation of its parameters' partitions ``z``. The EMA of a
parameter is either that partition, or the whole TP-local tensor for the small parameters ZeRO
keeps resident on every rank (``ds_persist``); the two are told apart by shape (a partition is
1-D with ``p`` elements; the whole tensor has the parameter's shape), so no extra metadata is
needed. TP-split parameters are put back together as
:class:`~imontage.models.common.parallel_plan.FamilyPlan` of its family cuts them; the others are the same on
every TP rank and come from TP rank 0.

Memory: DeepSpeed's ``.pt`` files are opened with ``torch.load(mmap=True, weights_only=True)``:
unpickling reads only their structure. A partition's values are then read from the file by byte
range (where the mapping puts it, from ``/proc/self/maps``) straight into the tensor being
assembled, or through a buffer of :data:`CHUNK_BYTES` for a column slice or a cast, so no page of
the mapping is touched. Where that offset is not known (not Linux) the values are copied through
the mapping a chunk at a time and each chunk's pages are handed back (``madvise(MADV_DONTNEED)``).
The EMA is read from the rank safetensors files by byte range too. The peak is one assembled
tensor plus one chunk.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imontage.checkpoint import store as ckpt
from imontage.models.common.parallel_plan import TensorSplit
from imontage.parallel.parallelize import tensor_split
from imontage.untrusted import InputError, field, parse_json, read_json

KINDS = ("fp32", "exp_avg", "exp_avg_sq", "ema")
CHUNK_BYTES = 4 * 2**20  # values read through a buffer (a cast, a column slice) at a time


class Zero3Error(InputError):
    """A ZeRO-3 checkpoint that cannot be read; the message names the file and, where known, the tensor."""


@dataclass(frozen=True)
class Layout:
    """How a DeepSpeed run was laid out (``state.json``'s ``layout``)."""

    tensor: int
    context: int
    data: int
    zero_stage: int

    @classmethod
    def from_state(cls, values: Mapping[str, Any], where: str) -> Layout:
        try:
            return cls(
                int(values["tensor_parallel"]),
                int(values["context_parallel"]),
                int(values["data_parallel"]),
                int(values["zero_stage"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise Zero3Error(f"{where}: 'layout' is not a parallel layout ({error!r})") from error

    @property
    def zero_world(self) -> int:
        """Ranks ZeRO shards over: the data- and context-parallel ranks of one TP rank."""
        return self.data * self.context

    def global_rank(self, tensor_rank: int, zero_rank: int) -> int:
        """Ranks are ordered TP fastest; a ZeRO group is the ranks of one TP rank, in order."""
        return tensor_rank + self.tensor * zero_rank

    def as_dict(self) -> dict[str, int]:
        return {"tensor_parallel": self.tensor, "context_parallel": self.context,
                "data_parallel": self.data, "zero_stage": self.zero_stage}  # fmt: skip


def is_zero3_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint directory of imontage (its ``state.json`` has a ``layout``)."""
    state = path / ckpt.STATE_FILE
    if not state.is_file():
        return False
    try:
        return "layout" in read_json(state)
    except InputError:
        return False  # not JSON: the single-device readers say what is wrong with it


def partition_numel(numel: int, world: int) -> int:
    """Elements of one ZeRO-3 partition of an ``numel``-element parameter over ``world`` ranks."""
    return math.ceil(numel / world)


def zero_partition(local: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 partition of ``local`` (flat; the last one zero-padded), a new tensor."""
    size = partition_numel(local.numel(), world)
    flat = local.reshape(-1)
    part = flat[rank * size : (rank + 1) * size]
    if part.numel() == size:
        return part.clone()
    return torch.cat([part, part.new_zeros(size - part.numel())])


def tensor_parallel_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """TP rank ``rank``'s slice of the single-device tensor ``name`` (the whole tensor if not split)."""
    split = tensor_split(name)
    return full if split is None or size == 1 else split.shard(full, rank, size)


# ------------------------------------------------------------------------- DeepSpeed's .pt files
class _LossScaler:
    """Stands in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler``: only its attributes are read."""


def _zero_stage(value: int) -> int:
    """Stands in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (an int enum)."""
    return int(value)


# The only non-tensor globals DeepSpeed 0.19's ZeRO-3 files hold, mapped to plain stand-ins, so
# that torch's weights-only unpickler reads them without importing (or trusting) DeepSpeed.
SAFE_GLOBALS: list[Any] = [
    (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
]


def load_pt(path: Path, mmap: bool = True) -> dict[str, Any]:
    """One of DeepSpeed's files, weights only (no code runs), memory-mapped by default."""
    if not path.is_file():
        raise Zero3Error(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # a truncated zip, an unknown global: name the file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Zero3Error(f"{path}: not a readable DeepSpeed checkpoint file ({first})") from error
    if not isinstance(loaded, dict):
        raise Zero3Error(f"{path}: holds a {type(loaded).__name__}, not a DeepSpeed state dict")
    return loaded


def offered_tensors(path: Path) -> int:
    """How many tensors a ZeRO-3 checkpoint holds (TP rank 0's parameters and the buffers it
    names), read before any model is built to compare them with."""
    states = load_pt(path / model_states_name(0, 0))
    groups, buffers = states.get("param_shapes"), states.get("buffer_names", [])
    if not isinstance(groups, list) or not all(isinstance(group, Mapping) for group in groups):
        raise Zero3Error(
            f"{path / model_states_name(0, 0)}: no 'param_shapes' (not a ZeRO-3 model-states file)"
        )
    return sum(len(group) for group in groups) + (len(buffers) if isinstance(buffers, list) else 0)


def model_states_name(zero_rank: int, tensor_rank: int) -> str:
    return f"zero_pp_rank_{zero_rank}_mp_rank_{tensor_rank:02d}_model_states.pt"


def optim_states_name(zero_rank: int, tensor_rank: int, bf16: bool = False) -> str:
    """DeepSpeed prefixes the optimiser files of a bf16 run with ``bf16_``."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{zero_rank}_mp_rank_{tensor_rank:02d}_optim_states.pt"


def rank_tensors_name(rank: int) -> str:
    return f"rank_{rank:05d}{ckpt.TENSORS_SUFFIX}"


def rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}.json"


@dataclass(frozen=True)
class Placement:
    """Where one TP-local parameter sits in the flat ZeRO partitions of its TP rank."""

    sub_group: int
    offset: int  # into the sub-group's flat partition, the same on every ZeRO rank
    shape: tuple[int, ...]  # TP-local

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _OpenFiles:
    """DeepSpeed files loaded memory-mapped, kept until :meth:`release`, and where their mappings lie."""

    def __init__(self) -> None:
        self.files: dict[Path, dict[str, Any]] = {}
        self.mappings: dict[Path, list[tuple[int, int, int]]] = {}

    def get(self, path: Path) -> dict[str, Any]:
        if path not in self.files:
            self.files[path] = load_pt(path)
            self.mappings[path] = _file_mappings(path)
        return self.files[path]

    def file_offset(self, path: Path, values: torch.Tensor) -> int | None:
        """Byte offset of ``values`` (a tensor of the loaded ``path``) in that file; None if unknown."""
        pointer = values.data_ptr()
        nbytes = values.numel() * values.element_size()
        for start, end, offset in self.mappings.get(path, []):
            if start <= pointer and pointer + nbytes <= end:
                where = pointer - start + offset
                return where if where + nbytes <= path.stat().st_size else None
        return None

    def release(self) -> None:
        self.files.clear()
        self.mappings.clear()


def _file_mappings(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every mapping of ``path`` in this process (Linux; else none)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    target = os.path.realpath(path)
    found = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end, int(fields[2], 16)))
    return found


def _read_into(handle: Any, where: int, values: torch.Tensor, path: Path) -> None:
    """Fill ``values`` (contiguous) with the bytes of ``handle`` from ``where``."""
    view = values.view(torch.uint8).numpy().data  # the tensor's own bytes
    handle.seek(where)
    got = 0
    while got < len(view):
        n = handle.readinto(view[got:])
        if not n:
            raise Zero3Error(f"{path}: ends at byte {where + got}, inside a tensor (truncated?)")
        got += n


_MADV_DONTNEED = 4  # Linux
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def drop_mapped_pages(values: torch.Tensor) -> None:
    """Hand back the pages wholly inside ``values``, a view of a read-only file mapping (no-op off Linux).

    Only for tensors of a ``torch.load(mmap=True)`` result: their pages are clean file pages,
    which the kernel reads again from the file if they are touched later. On anonymous memory
    this would zero the values, so it is never called on anything else.
    """
    if _LIBC is None or not values.numel():
        return
    page = mmap.PAGESIZE
    start = values.data_ptr()
    end = start + values.numel() * values.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class _RankTensors:
    """A rank's safetensors file, read by byte range (no mapping: only the bytes asked for are held)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.size = path.stat().st_size
            with path.open("rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if length > self.size - 8:  # checked before the header is read
                    raise Zero3Error(f"{path}: its header claims {length} bytes, the file has {self.size}")
                header = parse_json(file.read(length), path)
        except (OSError, struct.error) as error:
            raise Zero3Error(f"{path}: not a readable safetensors file ({error})") from error
        if not isinstance(header, dict):
            raise Zero3Error(f"{path}: not a safetensors file (its header is not a JSON object)")
        self.data_start = 8 + length
        header.pop("__metadata__", None)
        self.header: dict[str, Any] = header
        try:
            declared = self.data_start + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
            for key in header:
                self.shape(key)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise Zero3Error(f"{path}: not a safetensors header ({type(error).__name__}: {error})") from None
        if declared != self.size:
            raise Zero3Error(
                f"{path}: its header declares {declared} bytes, the file has {self.size} (truncated?)"
            )

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.header:
            raise Zero3Error(
                f"{self.path}: tensor '{key}' missing (this run kept no EMA? use --weights live)"
            )
        return tuple(int(n) for n in self.header[key]["shape"])

    def locate(self, key: str) -> tuple[torch.dtype, int]:
        """(dtype, byte offset in the file) of the tensor ``key``."""
        entry = self.header[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise Zero3Error(f"{self.path}: tensor '{key}' has dtype {entry['dtype']}, not a floating type")
        begin, end = (self.data_start + int(o) for o in entry["data_offsets"])
        if end - begin != torch.empty((), dtype=dtype).element_size() * math.prod(self.shape(key)):
            raise Zero3Error(f"{self.path}: tensor '{key}' has {end - begin} bytes, not those of its shape")
        return dtype, begin


@dataclass
class _Span:
    """``count`` flat values of a TP-local tensor from flat position ``start``, and where they are read.

    By byte range from ``file`` at ``where``; or, where that offset is unknown, copied from
    ``mapped`` (a view of ``file``'s mapping), whose pages are handed back once copied.
    """

    start: int
    count: int
    dtype: torch.dtype
    file: Path
    where: int | None
    mapped: torch.Tensor | None = None

    def read(self, offset: int, out: torch.Tensor) -> None:
        """``out`` (contiguous, ``self.dtype``) <- values ``offset .. offset + out.numel()``."""
        if self.where is None:
            assert self.mapped is not None
            values = self.mapped[offset : offset + out.numel()]
            out.copy_(values)
            drop_mapped_pages(values)
            return
        with self.file.open("rb", buffering=0) as handle:
            _read_into(handle, self.where + offset * out.element_size(), out, self.file)


def _fill(dest: torch.Tensor, span: _Span, start: int) -> None:
    """``dest.flatten()[start : start + span.count]`` = the span's values, for the part inside ``dest``.

    Straight into ``dest`` where it is contiguous with the span's dtype; otherwise through a
    buffer of at most :data:`CHUNK_BYTES` (a column slice, or a cast).
    """
    lo, hi = max(start, 0), min(start + span.count, dest.numel())
    if lo >= hi:
        return
    if dest.is_contiguous() and dest.dtype == span.dtype and span.where is not None:
        span.read(lo - start, dest.view(-1)[lo:hi])
        return
    step = max(1, CHUNK_BYTES // torch.empty((), dtype=span.dtype).element_size())
    buffer = torch.empty(min(step, hi - lo), dtype=span.dtype)
    for first in range(lo, hi, step):
        values = buffer[: min(step, hi - first)]
        span.read(first - start, values)
        _copy_flat(dest, values, first)


class Zero3Checkpoint:
    """A DeepSpeed ZeRO-3 checkpoint of imontage, as single-device tensors (module docstring).

    Construction validates the directory (layout, files present, shapes against the model
    config); :meth:`tensor` assembles one single-device tensor of one kind.
    """

    def __init__(self, path: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
        self.path = path
        state_file = path / ckpt.STATE_FILE
        if not state_file.is_file():
            raise Zero3Error(f"{state_file}: no such file")
        self.state = read_json(state_file)
        field(self.state, "step", int, state_file)
        self.layout = Layout.from_state(field(self.state, "layout", dict, state_file), str(state_file))
        if self.layout.zero_stage != 3:
            raise Zero3Error(
                f"{state_file}: ZeRO stage {self.layout.zero_stage}; only ZeRO-3 checkpoints are read here"
            )
        world = self.layout.tensor * self.layout.zero_world
        if self.state.get("world_size", world) != world:
            raise Zero3Error(
                f"{state_file}: world_size {self.state.get('world_size')} does not match layout {self.layout}"
            )
        for rank in range(world):
            for name in (rank_tensors_name(rank), rank_state_name(rank)):
                if not (path / name).is_file():
                    raise Zero3Error(f"{path / name}: no such file (rank {rank} of {world})")
        self.bf16 = (path / optim_states_name(0, 0, bf16=True)).is_file()  # train.precision=bf16
        for tensor_rank in range(self.layout.tensor):
            for zero_rank in range(self.layout.zero_world):
                for name in (
                    model_states_name(zero_rank, tensor_rank),
                    optim_states_name(zero_rank, tensor_rank, self.bf16),
                ):
                    if not (path / name).is_file():
                        raise Zero3Error(
                            f"{path / name}: no such file (TP rank {tensor_rank}, ZeRO rank {zero_rank} "
                            f"of layout {self.layout.as_dict()})"
                        )
        self.expected = dict(expected)
        self.placements = [self._placements(r) for r in range(self.layout.tensor)]
        self._check_shapes()
        self._group_numel = [
            {
                group: sum(
                    partition_numel(p.numel, self.layout.zero_world)
                    for p in placements.values()
                    if p.sub_group == group
                )
                for group in {p.sub_group for p in placements.values()}
            }
            for placements in self.placements
        ]
        self.largest_bytes = max(4 * math.prod(shape) for shape in self.expected.values())
        self._files = _OpenFiles()
        self._rank_tensors: dict[int, _RankTensors] = {}
        self._state_index: list[dict[int, int]] = [{} for _ in range(self.layout.tensor)]

    # ----------------------------------------------------------------------------- validation
    def _placements(self, tensor_rank: int) -> dict[str, Placement]:
        file = self.path / model_states_name(0, tensor_rank)
        states = load_pt(file)
        if states.get("frozen_param_shapes"):
            name = next(iter(states["frozen_param_shapes"]))
            raise Zero3Error(f"{file}: frozen parameter '{name}': frozen parameters are not supported")
        groups = states.get("param_shapes")
        if not isinstance(groups, list) or not groups:
            raise Zero3Error(f"{file}: no 'param_shapes' (not a ZeRO-3 model-states file)")
        placements = {}
        for sub_group, shapes in enumerate(groups):
            offset = 0
            for name, shape in shapes.items():
                placement = Placement(sub_group, offset, tuple(int(s) for s in shape))
                placements[name] = placement
                offset += partition_numel(placement.numel, self.layout.zero_world)
        self.buffer_names = list(states.get("buffer_names", []))
        return placements

    def _check_shapes(self) -> None:
        first = self.path / model_states_name(0, 0)
        names = set(self.placements[0])
        missing = [name for name in self.expected if name not in names and name not in self.buffer_names]
        if missing:
            raise Zero3Error(
                f"{first}: tensor '{missing[0]}' (and {len(missing) - 1} more) of the model config is missing"
            )
        extra = sorted(names - set(self.expected))
        if extra:
            raise Zero3Error(f"{first}: tensor '{extra[0]}' is not in the model of this config")
        for tensor_rank, placements in enumerate(self.placements):
            file = self.path / model_states_name(0, tensor_rank)
            if set(placements) != names:
                odd = sorted(set(placements) ^ names)[0]
                raise Zero3Error(f"{file}: tensor '{odd}' differs from TP rank 0's parameters")
            for name, placement in placements.items():
                full = self.expected[name]
                split = tensor_split(name)
                local = _local_shape(full, split, self.layout.tensor)
                if placement.shape != local:
                    raise Zero3Error(
                        f"{file}: tensor '{name}' has TP-local shape {placement.shape}; the config implies "
                        f"{full}, i.e. {local} on each of {self.layout.tensor} TP rank(s)"
                    )

    # ------------------------------------------------------------------------------- reading
    @property
    def step(self) -> int:
        return int(self.state["step"])

    def names(self) -> list[str]:
        """Every tensor of the single-device model, in its ``state_dict`` order."""
        return list(self.expected)

    def parameter_names(self) -> list[str]:
        return [name for name in self.expected if name in self.placements[0]]

    def tensor(
        self,
        name: str,
        kind: str = "fp32",
        dtype: torch.dtype = torch.float32,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The single-device tensor ``name``: fp32 master weights, an AdamW moment or the EMA.

        With ``into`` (a flat ``dtype`` tensor of at least as many elements) the parameter is
        assembled in its memory, a view of which is returned: reusing one buffer saves the
        page faults of a fresh allocation per tensor.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if name not in self.placements[0]:
            return self._buffer(name).to(dtype)
        full = self.expected[name]
        numel = math.prod(full)
        if into is not None and into.dtype == dtype and into.numel() >= numel:
            out = into[:numel].view(full)
        else:
            out = torch.empty(full, dtype=dtype)
        split = tensor_split(name)
        for tensor_rank in range(self.layout.tensor if split is not None else 1):
            placement = self.placements[tensor_rank][name]
            joined = split is not None and split.interleaved and self.layout.tensor > 1
            # A cut whose pieces interleave within each row (JoinedInputSplit) is assembled TP-local first.
            local = torch.empty(placement.shape, dtype=dtype) if joined else None
            destinations = (
                [(0, local)]
                if local is not None
                else _destinations(out, split, tensor_rank, self.layout.tensor)
            )
            for span in self._spans(name, tensor_rank, placement, kind):
                for lo, dest in destinations:
                    _fill(dest, span, span.start - lo)
            if local is not None and split is not None:
                split.place(out, local, tensor_rank, self.layout.tensor)
        return out

    def _spans(self, name: str, tensor_rank: int, placement: Placement, kind: str) -> list[_Span]:
        """Where the values of the TP-local tensor are: one span per ZeRO rank, covering it once."""
        world = self.layout.zero_world
        size = partition_numel(placement.numel, world)
        spans = []
        for zero_rank in range(world):
            start = zero_rank * size
            valid = max(0, min(size, placement.numel - start))
            if kind == "ema":
                ema, key = self._ema(name, tensor_rank, zero_rank, placement, size)
                dtype, begin = ema.locate(key)
                # Where the two shapes coincide (one ZeRO rank, or one element) both readings agree.
                if ema.shape(key) == placement.shape:  # whole on every rank: a ZeRO-3 persistent parameter
                    return [_Span(0, placement.numel, dtype, ema.path, begin)]
                spans.append(_Span(start, valid, dtype, ema.path, begin))
            else:
                file = self.path / optim_states_name(zero_rank, tensor_rank, self.bf16)
                flat = self._flat(tensor_rank, zero_rank, placement, kind).narrow(0, placement.offset, valid)
                where = self._files.file_offset(file, flat)
                spans.append(
                    _Span(start, valid, flat.dtype, file, where, None if where is not None else flat)
                )
        return spans

    def _flat(self, tensor_rank: int, zero_rank: int, placement: Placement, kind: str) -> torch.Tensor:
        file = self.path / optim_states_name(zero_rank, tensor_rank, self.bf16)
        states = self._files.get(file)
        optimizer = states.get("optimizer_state_dict")
        if not isinstance(optimizer, dict) or "fp32_flat_groups" not in optimizer:
            raise Zero3Error(f"{file}: no 'fp32_flat_groups' (not a ZeRO-3 optimizer-states file)")
        if int(optimizer.get("partition_count", -1)) != self.layout.zero_world:
            raise Zero3Error(
                f"{file}: written by {optimizer.get('partition_count')} ZeRO ranks, the layout says "
                f"{self.layout.zero_world}"
            )
        groups = optimizer["fp32_flat_groups"]
        if placement.sub_group >= len(groups):
            raise Zero3Error(
                f"{file}: has {len(groups)} flat groups, sub-group {placement.sub_group} is missing"
            )
        if kind == "fp32":
            flat = groups[placement.sub_group]
        else:
            inner = optimizer.get("optimizer_state_dict", {})
            index = self._state_key(file, inner, placement.sub_group)
            flat = inner["state"][index].get(kind) if index in inner.get("state", {}) else None
            if flat is None:
                raise Zero3Error(f"{file}: no optimizer state '{kind}' for flat group {placement.sub_group}")
        expected = self._group_numel[tensor_rank][placement.sub_group]
        if flat.numel() != expected:
            raise Zero3Error(
                f"{file}: flat group {placement.sub_group} ({kind}) has {flat.numel()} elements, "
                f"the parameter shapes imply {expected}"
            )
        return flat

    @staticmethod
    def _state_key(file: Path, inner: Mapping[str, Any], sub_group: int) -> int:
        """The torch optimizer's state index of a sub-group's flat partition (one param group)."""
        groups = inner.get("param_groups", [])
        if len(groups) != 1:
            raise Zero3Error(f"{file}: {len(groups)} optimizer param groups; imontage writes one")
        params = groups[0]["params"]
        if sub_group >= len(params):
            raise Zero3Error(f"{file}: optimizer has no state for flat group {sub_group}")
        return int(params[sub_group])

    def _ema(
        self, name: str, tensor_rank: int, zero_rank: int, placement: Placement, size: int
    ) -> tuple[_RankTensors, str]:
        """The rank file holding the EMA of ``name`` on (tensor_rank, zero_rank), and its key there."""
        rank = self.layout.global_rank(tensor_rank, zero_rank)
        if rank not in self._rank_tensors:
            self._rank_tensors[rank] = _RankTensors(self.path / rank_tensors_name(rank))
        ema, key = self._rank_tensors[rank], f"ema.{name}"
        shape = ema.shape(key)
        if shape != placement.shape and shape != (size,):
            raise Zero3Error(
                f"{ema.path}: tensor '{key}' has shape {shape}; expected the ZeRO partition ({size},) "
                f"or the whole TP-local {placement.shape}"
            )
        return ema, key

    def _buffer(self, name: str) -> torch.Tensor:
        file = self.path / model_states_name(0, 0)
        module = load_pt(file).get("module", {})
        if name not in module:
            raise Zero3Error(f"{file}: buffer '{name}' missing")
        return module[name].clone()

    def optimizer_steps(self) -> torch.Tensor:
        """AdamW's step count (the same for every flat group), from ZeRO rank 0 of TP rank 0."""
        file = self.path / optim_states_name(0, 0, self.bf16)
        inner = load_pt(file)["optimizer_state_dict"].get("optimizer_state_dict", {})
        index = self._state_key(file, inner, 0)
        step = inner.get("state", {}).get(index, {}).get("step")
        if step is None:  # DeepSpeed's FusedAdam (CUDA) counts per param group
            step = inner["param_groups"][0].get("step")
        if step is None:
            raise Zero3Error(f"{file}: the optimizer has no step count (saved before its first step?)")
        return torch.as_tensor(step, dtype=torch.float32).clone()

    def optimizer_hyperparameters(self) -> dict[str, Any]:
        """The AdamW param group of ZeRO rank 0 (lr, betas, eps, weight decay...), without its params."""
        file = self.path / optim_states_name(0, 0, self.bf16)
        inner = load_pt(file)["optimizer_state_dict"].get("optimizer_state_dict", {})
        group = dict(inner["param_groups"][0])
        group.pop("params", None)
        return group

    def release(self) -> None:
        """Unmap every DeepSpeed file still open."""
        self._files.release()
        self._rank_tensors.clear()


def _local_shape(full: tuple[int, ...], split: TensorSplit | None, tensor: int) -> tuple[int, ...]:
    if split is None or tensor == 1:
        return full
    shape = list(full)
    shape[split.dim] //= tensor
    return tuple(shape)


def _destinations(
    out: torch.Tensor, split: TensorSplit | None, rank: int, size: int
) -> list[tuple[int, torch.Tensor]]:
    """(flat start in the TP-local tensor, view of ``out``) for each part TP rank ``rank`` holds."""
    if split is None or size == 1:
        return [(0, out)]
    parts = []
    part_len = out.shape[split.dim] // split.parts
    local_len = part_len // size
    for part in range(split.parts):
        view = out.narrow(split.dim, part * part_len + rank * local_len, local_len)
        if split.parts > 1 and split.dim != 0:
            raise Zero3Error(
                f"a {split} cut is not contiguous in the TP-local tensor"
            )  # not used by imontage
        parts.append((part * view.numel(), view))
    return parts


def _copy_flat(dest: torch.Tensor, piece: torch.Tensor, start: int) -> None:
    """``dest.flatten()[start : start + len(piece)] = piece``, for the part that falls inside ``dest``.

    ``dest`` may be a column slice (non-contiguous rows of a 2-D tensor); ``start`` may be negative
    (the piece begins before this view) and the piece may run past its end.
    """
    total = dest.numel()
    lo, hi = max(start, 0), min(start + piece.numel(), total)
    if lo >= hi:
        return
    src = piece[lo - start : hi - start]
    if dest.is_contiguous():
        dest.view(-1)[lo:hi].copy_(src)
        return
    if dest.dim() != 2:
        raise Zero3Error(f"cannot write a flat range into a non-contiguous {dest.dim()}-D view")
    cols = dest.shape[1]
    row, col = divmod(lo, cols)
    if col:  # the head: the end of a partial row
        n = min(cols - col, hi - lo)
        dest[row, col : col + n].copy_(src[:n])
        src, lo, row = src[n:], lo + n, row + 1
    full_rows = (hi - lo) // cols
    if full_rows:
        dest[row : row + full_rows].copy_(src[: full_rows * cols].view(full_rows, cols))
        src, row = src[full_rows * cols :], row + full_rows
    if src.numel():  # the tail: the start of a partial row
        dest[row, : src.numel()].copy_(src)
