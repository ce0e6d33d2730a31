"""What every checkpoint conversion shares: tensors in safetensors files, and the model configs they belong to.

Tensors are located (:class:`TensorSource`: a file and a key) before any is read, and read one at
a time; a diffusers-style folder's are found through its index or its one weights file
(:func:`weight_sources`), and pickle files are refused by name, never opened. A model config read
from a file is checked key by key and size by size (:func:`model_config`) before the model it
describes is built on the meta device, within a budget set by the tensors offered
(:func:`tensor_budget`), to give the names and shapes every tensor is checked against
(:func:`expected_shapes`). :mod:`imontage.checkpoint.convert`, :mod:`~imontage.checkpoint.lora` and
:mod:`~imontage.checkpoint.diffusers` build on these; errors are :class:`ConversionError` naming
the file and, where known, the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from imontage.config.model_file import DIFFUSERS_CONFIG
from imontage.models import build_model
from imontage.models.lora import frozen_names, is_adapter, lora_enabled
from imontage.untrusted import ConversionError, field, read_json, refuse_pickle, string_map

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
# safetensors' dtype names -> torch's
DTYPE_NAMES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}  # fmt: skip
# A LoRA run's checkpoints leave its frozen base out; where no base folder is at hand to count its
# tensors, a model config read from the checkpoint may describe at most this many (HunyuanVideo
# I2V 13B has 1,260 tensors, Wan 2.1 I2V 14B 1,303: the largest of the families).
MAX_TENSORS_WITHOUT_BASE = 5_000


@dataclass
class TensorSource:
    """Where one tensor lives: a safetensors file and its name there."""

    file: Path
    key: str


def open_safetensors(path: Path) -> Any:
    """``safe_open`` of ``path``; a missing or unreadable file is a :class:`ConversionError` naming it."""
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error})") from error


def read_tensor(source: TensorSource) -> torch.Tensor:
    """The tensor ``source`` locates, read whole."""
    with open_safetensors(source.file) as handle:
        try:
            return handle.get_tensor(source.key)
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{source.file}: tensor '{source.key}' cannot be read ({error})") from error


def file_sources(path: Path) -> dict[str, TensorSource]:
    """Every tensor of one safetensors file, located (none read)."""
    with open_safetensors(path) as handle:
        return {key: TensorSource(path, key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)


def stream_sources(sources: Mapping[str, TensorSource]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every source in order, one read at a time."""
    for name, source in sources.items():
        yield name, read_tensor(source)


def sources_by_file(sources: Mapping[str, TensorSource]) -> dict[Path, list[str]]:
    """The names of ``sources`` grouped by the file holding them, in their order."""
    files: dict[Path, list[str]] = {}
    for name, source in sources.items():
        files.setdefault(source.file, []).append(name)
    return files


def tensor_headers(sources: Mapping[str, TensorSource]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shape and dtype name of every tensor, each shard opened once."""
    shapes, dtypes = {}, {}
    for file, names in sources_by_file(sources).items():
        with open_safetensors(file) as handle:
            held = set(handle.keys())
            for name in names:
                key = sources[name].key
                if key not in held:
                    raise ConversionError(f"{file}: tensor '{key}' missing (the index puts it in this shard)")
                piece = handle.get_slice(key)
                shapes[name], dtypes[name] = tuple(piece.get_shape()), piece.get_dtype()
                if dtypes[name] not in DTYPE_NAMES:
                    raise ConversionError(
                        f"{file}: tensor '{key}' has dtype {dtypes[name]}, which torch has no name for"
                    )
    return shapes, dtypes


def index_sources(index: Path) -> dict[str, TensorSource]:
    """The tensors a safetensors index (``*.safetensors.index.json``) puts in its folder's shards:
    each shard a plain ``.safetensors`` file name beside the index, checked to exist."""
    weight_map = string_map(field(read_json(index), "weight_map", dict, index), index, "weight_map")
    sources = {}
    for name, file in weight_map.items():
        if Path(file).name != file or file in (".", ".."):
            raise ConversionError(f"{index}: shard name {file!r} of tensor '{name}' is not a plain file name")
        refuse_pickle(index.parent / file, f" (named by {index} for tensor '{name}')")
        if not file.endswith(".safetensors"):
            raise ConversionError(f"{index}: shard '{file}' of tensor '{name}' is not a .safetensors file")
        if not (index.parent / file).is_file():
            raise ConversionError(
                f"{index.parent / file}: no such file (named by {index} for tensor '{name}')"
            )
        sources[name] = TensorSource(index.parent / file, name)
    return sources


def weight_sources(folder: Path, weights: str = DIFFUSERS_WEIGHTS) -> dict[str, TensorSource]:
    """Where every tensor of a diffusers-style folder lives: its index's shards, or the one weights
    file (``weights``: diffusers' name, or transformers' ``model.safetensors``)."""
    index = folder / f"{weights}.index.json"
    if index.is_file():
        return index_sources(index)
    if (folder / weights).is_file():
        return file_sources(folder / weights)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such folder")
    for file in sorted(folder.iterdir()):
        refuse_pickle(file, " and no safetensors weights beside it")
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise ConversionError(
        f"{folder / weights}: no such file, and no {index.name}"
        + (f" (found {', '.join(found)}: a variant? rename it to {weights})" if found else "")
    )


def finite(tensor: torch.Tensor, name: str, file: Path) -> torch.Tensor:
    """``tensor``, unless it is floating and holds NaN or Inf: weights a run would start from, and
    would turn every loss into NaN, are refused naming the tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ConversionError(f"{file}: tensor '{name}' holds {bad:,} NaN or Inf value(s)")
    return tensor


# ------------------------------------------------------------- model configs and their tensors


def tensor_budget(cfg: Any, offered: int) -> int:
    """The most parameters and buffers the model of ``cfg`` may register when built for a source
    that offers ``offered`` tensors: twice those (non-persistent buffers and wrapped layers also
    register), plus, for a LoRA run, its frozen base (which its checkpoints leave out): the
    tensors of its ``model.init_from_diffusers`` folder, or :data:`MAX_TENSORS_WITHOUT_BASE`."""
    base = 0
    if lora_enabled(cfg.lora):
        folder = Path(str(cfg.init_from_diffusers or ""))
        if str(folder) and (folder / DIFFUSERS_CONFIG).is_file():
            base = len(weight_sources(folder))
        else:
            base = MAX_TENSORS_WITHOUT_BASE
    return 2 * (offered + base) + 64


def _meta_model(cfg: Any, offered: int, where: str) -> torch.nn.Module:
    return build_model(cfg, device="meta", max_tensors=tensor_budget(cfg, offered), where=where)


def expected_shapes(
    cfg: Any, adapters: bool = True, *, offered: int, where: str
) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer of the model ``cfg`` describes, built on the meta device;
    ``adapters=False``: the base model's alone (what a diffusers folder holds), without LoRA's.

    ``offered``: how many tensors the source whose config this is holds (``where``): the build
    stops early when the config describes far more (:func:`tensor_budget`).
    """
    shapes = _meta_model(cfg, offered, where).state_dict().items()
    return {name: tuple(t.shape) for name, t in shapes if adapters or not is_adapter(name)}


def checkpoint_shapes(cfg: Any, *, offered: int, where: str) -> dict[str, tuple[int, ...]]:
    """What a training checkpoint of ``cfg`` holds: every tensor, less a frozen base (``model.lora``:
    adapters, listed trainable parameters and buffers only). ``offered``, ``where``: as
    :func:`expected_shapes`."""
    model = _meta_model(cfg, offered, where)
    frozen = frozen_names(model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in frozen}


def check_tensors(
    where: Path,
    sources: Mapping[str, TensorSource],
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
) -> None:
    """Every tensor of ``expected`` in ``sources`` (``where``: the file that lists them), none
    more, each of the expected shape."""
    missing = [name for name in expected if name not in sources]
    if missing:
        raise ConversionError(
            f"{where}: tensor '{missing[0]}' missing (and {len(missing) - 1} more) for this model"
        )
    for name, source in sources.items():
        if name not in expected:
            raise ConversionError(f"{source.file}: tensor '{name}' is not in the model (unexpected)")
        if tuple(shapes[name]) != tuple(expected[name]):
            raise ConversionError(
                f"{source.file}: tensor '{name}' has shape {tuple(shapes[name])}, the model's is {tuple(expected[name])}"
            )
