"""Checkpoint conversions: training checkpoint -> one safetensors file -> diffusers-style folder, and back.

Formats:
- a training checkpoint: ``RUN_DIR/checkpoints/step_N/`` (see imontage/checkpoint/store.py), either
  single-device (``model``/``optimizer``/``ema``/``rng`` safetensors groups, also what
  :func:`reshard` writes) or DeepSpeed ZeRO-3 (engine shards of any TP/CP/DP layout, read by
  :mod:`imontage.checkpoint.zero3`);
- a consolidated file: one safetensors of the single-device model's tensors, with the model
  config, step and weight kind (``ema`` or ``live``) in its metadata;
- a diffusers-style folder: ``config.json`` and ``diffusion_pytorch_model.safetensors``, or
  numbered shards with ``diffusion_pytorch_model.safetensors.index.json`` for large models
  (``ImontageDiT`` here; the pretrained families' diffusers classes in
  :mod:`imontage.checkpoint.diffusers`).

Every conversion streams tensor by tensor and checks each tensor against the shapes the model
config implies; errors name the tensor and the file. Nothing is loaded with pickle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from imontage.checkpoint import store as ckpt
from imontage.checkpoint import zero3
from imontage.checkpoint.safetensors_io import StreamingSafetensorsWriter, tensor_bytes
from imontage.checkpoint.tensors import (
    DIFFUSERS_INDEX,
    DIFFUSERS_WEIGHTS,
    DTYPE_NAMES,
    TensorSource,
    checkpoint_shapes,
    expected_shapes,
    file_sources,
    finite,
    index_sources,
    open_safetensors,
    read_tensor,
    stream_sources,
    tensor_headers,
)
from imontage.config.model_file import DIFFUSERS_CONFIG, model_config
from imontage.models import build_model
from imontage.untrusted import ConversionError, field, parse_json, read_json

FORMAT = "imontage-consolidated/1"
CLASS_NAME = "ImontageDiT"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_state(checkpoint: Path) -> tuple[dict[str, Any], Any]:
    """A training checkpoint's ``state.json`` and its model config, the keys conversions read checked."""
    file = checkpoint / ckpt.STATE_FILE
    if not file.is_file():
        raise ConversionError(f"{file}: no such file (not a training checkpoint)")
    state = read_json(file)
    field(state, "step", int, file)
    return state, model_config(field(state, "model_config", dict, file), str(file))


def _check_layout(
    sources: Mapping[str, TensorSource], shapes: Mapping[str, tuple[int, ...]], where: str
) -> None:
    missing = sorted(set(shapes) - set(sources))
    extra = sorted(set(sources) - set(shapes))
    if missing:
        raise ConversionError(
            f"{where}: tensor '{missing[0]}' (and {len(missing) - 1} more) missing for this config"
        )
    if extra:
        raise ConversionError(
            f"{sources[extra[0]].file}: tensor '{extra[0]}' is not in the model of this config"
        )
    for name, source in sources.items():
        with open_safetensors(source.file) as handle:
            shape = tuple(handle.get_slice(source.key).get_shape())
        if shape != shapes[name]:
            raise ConversionError(
                f"{source.file}: tensor '{name}' has shape {shape}, the config implies {shapes[name]}"
            )


def _write(
    out: Path, sources: Mapping[str, TensorSource], dtype: torch.dtype | None, metadata: Mapping[str, str]
) -> Path:
    """Stream ``sources`` into one safetensors file (cast to ``dtype`` when given)."""
    layout = {}
    for name, source in sources.items():
        with open_safetensors(source.file) as handle:
            piece = handle.get_slice(source.key)
            stored = _safetensors_dtype(piece.get_dtype(), source)
            layout[name] = (
                tuple(piece.get_shape()),
                dtype if dtype is not None and stored.is_floating_point else stored,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    with StreamingSafetensorsWriter(out, layout, metadata) as writer:
        for name in tqdm(layout, desc=f"writing {out.name}", unit="tensor", leave=False):
            writer.write(name, read_tensor(sources[name]).to(layout[name][1]))
    return out


def _safetensors_dtype(name: str, source: TensorSource) -> torch.dtype:
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}  # fmt: skip
    if name not in names:
        raise ConversionError(
            f"{source.file}: tensor '{source.key}' has dtype {name}, which imontage does not use"
        )
    return names[name]


def _metadata(path: Path) -> dict[str, str]:
    with open_safetensors(path) as handle:
        return dict(handle.metadata() or {})


# ------------------------------------------------------------------------------------ consolidate
def consolidate(
    checkpoint: Path, out: Path, weights: str = "ema", dtype: str | None = None, verify: bool = True
) -> Path:
    """A training checkpoint (single-device or DeepSpeed ZeRO-3) -> one consolidated safetensors file.

    ``weights``: ``ema`` or ``live`` (the fp32 master weights under DeepSpeed); ``dtype``: cast
    floating tensors (``fp32``/``bf16``); ``verify``: check every file against the sha256 manifest first.
    """
    if weights not in ("ema", "live"):
        raise ConversionError(f"weights must be 'ema' or 'live', not '{weights}'")
    if verify:
        ckpt.verify_checkpoint(checkpoint)
    if zero3.is_zero3_checkpoint(checkpoint):
        return _consolidate_zero3(checkpoint, out, weights, dtype)
    state, cfg = read_state(checkpoint)
    sources = file_sources(checkpoint / "model.safetensors")
    if weights == "ema":
        sources.update(
            file_sources(ema_file(checkpoint))
        )  # EMA covers the parameters; buffers stay the model's
    shapes = checkpoint_shapes(cfg, offered=len(sources), where=str(checkpoint / ckpt.STATE_FILE))
    _check_layout(sources, shapes, str(checkpoint))
    return _write(
        out, sources, DTYPES[dtype] if dtype else None, _consolidated_metadata(cfg, state["step"], weights)
    )


def ema_file(checkpoint: Path) -> Path:
    """A single-device checkpoint's EMA weights (``--weights ema``), which a run without EMA lacks."""
    file = checkpoint / "ema.safetensors"
    if not file.is_file():
        raise ConversionError(f"{file}: no such file (this run kept no EMA; use --weights live)")
    return file


def _consolidated_metadata(cfg: Any, step: int, weights: str, **extra: str) -> dict[str, str]:
    return {
        "format": FORMAT,
        "model_config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
        "step": str(step),
        "weights": weights,
        **extra,
    }


def open_zero3(checkpoint: Path) -> tuple[zero3.Zero3Checkpoint, Any]:
    """A validated ZeRO-3 checkpoint reader and its model config."""
    _, cfg = read_state(checkpoint)
    try:
        offered = zero3.offered_tensors(checkpoint)
        shapes = checkpoint_shapes(cfg, offered=offered, where=str(checkpoint / ckpt.STATE_FILE))
        return zero3.Zero3Checkpoint(checkpoint, shapes), cfg
    except zero3.Zero3Error as error:
        raise ConversionError(str(error)) from None


def zero3_tensors(
    reader: zero3.Zero3Checkpoint, kind: str, dtype: torch.dtype = torch.float32, desc: str = ""
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, single-device tensor) for every tensor of the model, one at a time, with a progress bar.

    The tensors are assembled in one buffer of the largest one's size: each is valid until the
    next is asked for (copy it to keep it).
    """
    buffer = torch.empty(max(math.prod(shape) for shape in reader.expected.values()), dtype=dtype)
    try:
        for name in tqdm(
            reader.names(), desc=desc or f"{kind} of {reader.path.name}", unit="tensor", leave=False
        ):
            yield name, reader.tensor(name, kind, dtype, into=buffer)
    except zero3.Zero3Error as error:
        raise ConversionError(str(error)) from error
    finally:
        reader.release()


def _consolidate_zero3(checkpoint: Path, out: Path, weights: str, dtype: str | None) -> Path:
    reader, cfg = open_zero3(checkpoint)
    out_dtype = DTYPES[dtype] if dtype else torch.float32
    layout = {name: (shape, out_dtype) for name, shape in reader.expected.items()}
    metadata = _consolidated_metadata(
        cfg, reader.step, weights, source_layout=json.dumps(reader.layout.as_dict())
    )
    kind = "ema" if weights == "ema" else "fp32"
    _stream(
        out, layout, zero3_tensors(reader, kind, out_dtype, desc=f"consolidating {checkpoint.name}"), metadata
    )
    return out


def _stream(
    out: Path,
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str],
) -> Path:
    """Write ``tensors`` (in ``layout`` order) to one safetensors file, holding one at a time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with StreamingSafetensorsWriter(out, layout, metadata) as writer:
        for name, tensor in tensors:
            writer.write(name, tensor)
            del tensor
    return out


# ---------------------------------------------------------------------------------------- reshard
def reshard(
    checkpoint: Path,
    out_root: Path,
    tensor_parallel: int | None = None,
    context_parallel: int | None = None,
    data_parallel: int | None = None,
    verify: bool = True,
) -> Path:
    """A DeepSpeed ZeRO-3 checkpoint -> a layout-free training checkpoint under ``out_root``.

    The checkpoint written (``out_root/step_N``, ``latest`` pointed at it) has the single-device
    format :class:`~imontage.train.backends.LocalBackend` writes: the fp32 master weights
    (``model``), AdamW's moments and step per parameter (``optimizer``), the EMA (``ema``), and the
    RNG and data-loader states of every data-parallel rank (``rng`` and ``state.json``'s
    ``data_ranks``). Any layout with the same number of data-parallel ranks resumes from it: the
    local engine directly (one data rank), DeepSpeed by cutting each rank's TP slice and ZeRO
    partition as it loads (``DeepSpeedBackend.load``). The target layout, when given, is checked
    here (heads and MLP width divisible; the same number of data-parallel ranks).
    """
    if verify:
        ckpt.verify_checkpoint(checkpoint)
    if not zero3.is_zero3_checkpoint(checkpoint):
        raise ConversionError(
            f"{checkpoint}: not a DeepSpeed checkpoint (its {ckpt.STATE_FILE} has no 'layout'); "
            "a single-device checkpoint already resumes under any layout with one data-parallel rank"
        )
    reader, cfg = open_zero3(checkpoint)
    source = reader.layout
    _check_target_layout(checkpoint, cfg, source, tensor_parallel, context_parallel, data_parallel)
    names = reader.parameter_names()
    index = {name: i for i, name in enumerate(names)}
    step = reader.step
    staging = ckpt.make_staging(out_root, ckpt.checkpoint_name(step), os.getpid())
    try:
        model_layout = {name: (shape, torch.float32) for name, shape in reader.expected.items()}
        _stream(
            staging / "model.safetensors", model_layout, zero3_tensors(reader, "fp32", desc="weights"), {}
        )
        has_ema = (checkpoint / zero3.rank_tensors_name(0)).is_file() and _has_ema(checkpoint)
        if has_ema:
            ema_layout = {name: (reader.expected[name], torch.float32) for name in names}
            ema = ((n, t) for n, t in zero3_tensors(reader, "ema", desc="EMA") if n in index)
            _stream(staging / "ema.safetensors", ema_layout, ema, {})
        optimizer_meta = _write_optimizer(reader, names, staging / "optimizer.safetensors")
        data_ranks, rng = _data_rank_states(checkpoint, source)
        ckpt.write_tensors(staging / "rng.safetensors", rng)
        shared = {k: v for k, v in reader.state.items() if k not in ("layout", "world_size")}
        state = {
            **shared,
            **data_ranks[0],  # what the local engine (one data rank) restores
            "data_ranks": data_ranks,
            "optimizer": optimizer_meta,
            "resharded_from": {"checkpoint": str(checkpoint), "layout": source.as_dict()},
        }
        ckpt.write_json(staging / ckpt.STATE_FILE, state)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ckpt.publish(out_root, staging, step)


def _has_ema(checkpoint: Path) -> bool:
    with open_safetensors(checkpoint / zero3.rank_tensors_name(0)) as handle:
        return any(key.startswith("ema.") for key in handle.keys())  # noqa: SIM118


def _check_target_layout(
    checkpoint: Path,
    cfg: Any,
    source: zero3.Layout,
    tensor: int | None,
    context: int | None,
    data: int | None,
) -> None:
    tensor, context = tensor or 1, context or 1
    if cfg.num_heads % (tensor * context):
        raise ConversionError(
            f"{checkpoint}: model.num_heads={cfg.num_heads} does not split over tensor_parallel × "
            f"context_parallel = {tensor} × {context}"
        )
    if cfg.mlp_hidden_size % tensor:
        raise ConversionError(
            f"{checkpoint}: model.mlp_hidden_size={cfg.mlp_hidden_size} does not split over tensor_parallel={tensor}"
        )
    if data is not None and data != source.data:
        raise ConversionError(
            f"{checkpoint}: saved with data_parallel={source.data}; its data-loader and RNG states belong "
            f"to {source.data} data-parallel rank(s), so it resumes only with data_parallel={source.data}, "
            f"not {data} (the weights and optimizer state themselves convert to any layout)"
        )


def _write_optimizer(reader: zero3.Zero3Checkpoint, names: list[str], out: Path) -> dict[str, Any]:
    """AdamW's state per parameter, as ``LocalBackend`` saves it (``checkpoint.optimizer_state_to_tensors``)."""
    step = reader.optimizer_steps()
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    states = []
    for i, name in enumerate(names):
        layout[f"state/{i}/step"] = ((), torch.float32)
        layout[f"state/{i}/exp_avg"] = (reader.expected[name], torch.float32)
        layout[f"state/{i}/exp_avg_sq"] = (reader.expected[name], torch.float32)
        states.append(
            [i, {key: {"__tensor__": f"state/{i}/{key}"} for key in ("step", "exp_avg", "exp_avg_sq")}]
        )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        moments = {kind: zero3_tensors(reader, kind, desc=kind) for kind in ("exp_avg", "exp_avg_sq")}
        for i, name in enumerate(names):
            yield f"state/{i}/step", step
            for kind, source in moments.items():
                got, tensor = next(source)
                while got != name:  # buffers have no optimizer state
                    got, tensor = next(source)
                yield f"state/{i}/{kind}", tensor

    _stream(out, layout, tensors(), {})
    group = {**reader.optimizer_hyperparameters(), "params": list(range(len(names)))}
    if isinstance(group.get("betas"), list | tuple):
        group["betas"] = {"__tuple__": list(group["betas"])}
    return {"state": states, "param_groups": [group]}


def _data_rank_states(
    checkpoint: Path, layout: zero3.Layout
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Loader and RNG state of each data-parallel rank (kept by its TP rank 0, CP rank 0).

    RNG tensors of data rank 0 keep their names (what the local engine restores); those of rank
    ``d`` are also stored as ``data_rank_{d}/<name>``.
    """
    states, tensors = [], {}
    for data_rank in range(layout.data):
        rank = layout.global_rank(0, data_rank * layout.context)
        file = checkpoint / zero3.rank_state_name(rank)
        own = read_json(file)
        states.append({"loader": field(own, "loader", dict, file), "rng": field(own, "rng", dict, file)})
        file = checkpoint / zero3.rank_tensors_name(rank)
        with open_safetensors(file) as handle:
            for key in handle.keys():  # noqa: SIM118
                if not key.startswith("ema."):
                    value = handle.get_tensor(key)
                    tensors[f"data_rank_{data_rank}/{key}"] = value
                    if data_rank == 0:
                        tensors[key] = value.clone()
    return states, tensors


def read_consolidated(path: Path) -> tuple[Any, dict[str, str]]:
    """(model config, metadata) of a consolidated file."""
    metadata = _metadata(path)
    if metadata.get("format") != FORMAT:
        raise ConversionError(
            f"{path}: not a consolidated imontage checkpoint (format {metadata.get('format')!r})"
        )
    if "model_config" not in metadata:
        raise ConversionError(f"{path}: metadata key 'model_config' missing")
    return model_config(
        parse_json(metadata["model_config"], f"{path}: metadata key 'model_config'"), str(path)
    ), metadata


def load_consolidated(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """A single-device DiT with the weights of a consolidated file."""
    cfg, _ = read_consolidated(path)
    sources = file_sources(path)
    _check_layout(sources, expected_shapes(cfg, offered=len(sources), where=str(path)), str(path))
    model = build_model(cfg, device=device)
    model.load_state_dict({name: read_tensor(source) for name, source in sources.items()})
    return model, cfg


def checkpoint_weights(path: Path, cfg: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, single-device tensor) of every parameter of the model ``cfg`` describes, one at a time.

    ``path`` is a safetensors file with single-device names (what ``consolidate`` and ``import``
    write) or a training checkpoint directory: DeepSpeed's (read partition by partition) or a
    single-device one (its ``model.safetensors``); :func:`imontage.checkpoint.diffusers.model_weights`
    also reads a pretrained family's diffusers folder. Names and shapes are checked against ``cfg``
    before any tensor is read; live weights, not the EMA. Each tensor is the caller's to keep.
    """
    if path.is_dir() and zero3.is_zero3_checkpoint(path):
        try:
            shapes = expected_shapes(cfg, offered=zero3.offered_tensors(path), where=str(path))
            reader = zero3.Zero3Checkpoint(path, shapes)
        except zero3.Zero3Error as error:
            raise ConversionError(str(error)) from None
        for name, tensor in zero3_tensors(reader, "fp32", desc=f"weights of {path.name}"):
            yield name, finite(tensor, name, path).clone()
        return
    file = path / f"model{ckpt.TENSORS_SUFFIX}" if path.is_dir() else path  # the "model" tensor group
    sources = file_sources(file)
    _check_layout(sources, expected_shapes(cfg, offered=len(sources), where=str(file)), str(file))
    for name, source in sources.items():
        yield name, finite(read_tensor(source), name, file)


# ------------------------------------------------------------------------------- any source
WEIGHT_KINDS = ("ema", "live")
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name: (shape, dtype)


@dataclass
class SourceWeights:
    """The model tensors of a source, streamed in ``layout``'s order, and what it says of them."""

    cfg: Any  # its model config
    layout: Layout  # as stored in the source
    tensors: Iterator[tuple[str, torch.Tensor]]
    metadata: dict[str, str]  # a consolidated file's metadata; empty for a training checkpoint


def source_weights(source: Path, weights: str, verify: bool) -> SourceWeights:
    """The model tensors of a consolidated file or a training checkpoint of any layout, streamed
    (``weights``: ``ema`` or ``live``; ``verify``: check a checkpoint against its manifest first)."""
    if weights not in WEIGHT_KINDS:
        raise ConversionError(f"weights must be 'ema' or 'live', not '{weights}'")
    if source.is_file():
        cfg, metadata = read_consolidated(source)
        sources = file_sources(source)
        return SourceWeights(cfg, stored_layout(sources), stream_sources(sources), metadata)
    if verify:
        ckpt.verify_checkpoint(source)
    if zero3.is_zero3_checkpoint(source):
        reader, cfg = open_zero3(source)
        kind = "ema" if weights == "ema" else "fp32"
        layout = {name: (shape, torch.float32) for name, shape in reader.expected.items()}
        return SourceWeights(cfg, layout, zero3_tensors(reader, kind, desc=f"{kind} of {source.name}"), {})
    _, cfg = read_state(source)
    sources = file_sources(source / "model.safetensors")
    if weights == "ema":
        sources.update(file_sources(ema_file(source)))
    return SourceWeights(cfg, stored_layout(sources), stream_sources(sources), {})


def stored_layout(sources: Mapping[str, TensorSource]) -> Layout:
    """Shape and torch dtype of every tensor of ``sources``, as stored (headers only)."""
    shapes, dtypes = tensor_headers(sources)
    return {name: (shapes[name], DTYPE_NAMES[dtypes[name]]) for name in sources}


# ------------------------------------------------------------------------------- export / import
def export_diffusers(consolidated: Path, out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """A consolidated file -> a diffusers-style folder (sharded with an index above ``max_shard_bytes``)."""
    cfg, metadata = read_consolidated(consolidated)
    sources = file_sources(consolidated)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = list(_shard_names(sources, max_shard_bytes))
    keep = {k: v for k, v in metadata.items() if k != "format"}
    if len(shards) == 1:
        _write(out_dir / DIFFUSERS_WEIGHTS, sources, None, keep)
    else:
        weight_map = {}
        for number, names in enumerate(shards, start=1):
            file = f"diffusion_pytorch_model-{number:05d}-of-{len(shards):05d}.safetensors"
            _write(out_dir / file, {name: sources[name] for name in names}, None, keep)
            weight_map.update(dict.fromkeys(names, file))
        total = sum(_source_bytes(source) for source in sources.values())
        index = {"metadata": {"total_size": total, **keep}, "weight_map": weight_map}
        (out_dir / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = {"_class_name": CLASS_NAME, **OmegaConf.to_container(cfg, resolve=True)}  # type: ignore[dict-item]
    (out_dir / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _source_bytes(source: TensorSource) -> int:
    with open_safetensors(source.file) as handle:
        piece = handle.get_slice(source.key)
        return tensor_bytes(tuple(piece.get_shape()), _safetensors_dtype(piece.get_dtype(), source))


def _shard_names(sources: Mapping[str, TensorSource], max_bytes: int) -> Iterator[list[str]]:
    shard: list[str] = []
    size = 0
    for name, source in sources.items():
        nbytes = _source_bytes(source)
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append(name)
        size += nbytes
    yield shard


def diffusers_sources(folder: Path) -> dict[str, TensorSource]:
    """Where every tensor of a diffusers-style folder lives: its index's shards, or the one weights file."""
    index = folder / DIFFUSERS_INDEX
    if index.is_file():
        return index_sources(index)
    return file_sources(folder / DIFFUSERS_WEIGHTS)


def import_diffusers(folder: Path, out: Path) -> Path:
    """A diffusers-style folder written by :func:`export_diffusers` -> a consolidated file."""
    config_file = folder / DIFFUSERS_CONFIG
    if not config_file.is_file():
        raise ConversionError(f"{config_file}: no such file")
    values = read_json(config_file)
    if values.pop("_class_name", None) != CLASS_NAME:
        raise ConversionError(f"{config_file}: _class_name is not {CLASS_NAME}")
    cfg = model_config(values, str(config_file))
    sources = diffusers_sources(folder)
    _check_layout(sources, expected_shapes(cfg, offered=len(sources), where=str(config_file)), str(folder))
    first = next(iter(sources.values())).file
    metadata = {k: v for k, v in _metadata(first).items() if k in ("step", "weights")}
    metadata.update(format=FORMAT, model_config=json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    return _write(out, sources, None, metadata)


# ------------------------------------------------------------------------------------- inspect
def inspect(path: Path) -> dict[str, Any]:
    """What a checkpoint holds: kind, step, config, tensors (name, shape, dtype) and parameter count.

    For a DeepSpeed checkpoint the tensors are those of the single-device model it consolidates
    to, and ``layout`` is its parallel layout.
    """
    if zero3.is_zero3_checkpoint(path):
        reader, cfg = open_zero3(path)
        tensors = [(name, shape, "F32") for name, shape in reader.expected.items()]
        return {
            "kind": "DeepSpeed ZeRO-3 checkpoint",
            "step": reader.step,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "tensors": tensors,
            "parameters": sum(int(torch.Size(shape).numel()) for _, shape, _ in tensors),
            "layout": reader.layout.as_dict(),
        }
    if (path / ckpt.MANIFEST).is_file():
        state, cfg = read_state(path)
        kind, config, step = "training checkpoint", OmegaConf.to_container(cfg), state["step"]
        sources = file_sources(path / "model.safetensors")
    elif (path / DIFFUSERS_CONFIG).is_file():
        config = {k: v for k, v in read_json(path / DIFFUSERS_CONFIG).items() if k != "_class_name"}
        sources = diffusers_sources(path)
        kind, step = "diffusers folder", _metadata(next(iter(sources.values())).file).get("step")
    else:
        cfg, metadata = read_consolidated(path)
        kind, config, step = (
            f"consolidated ({metadata.get('weights')})",
            OmegaConf.to_container(cfg),
            metadata["step"],
        )
        sources = file_sources(path)
    tensors = []
    for name, source in sources.items():
        with open_safetensors(source.file) as handle:
            piece = handle.get_slice(source.key)
            tensors.append((name, tuple(piece.get_shape()), piece.get_dtype()))
    parameters = sum(int(torch.Size(shape).numel()) for _, shape, _ in tensors)
    return {"kind": kind, "step": step, "config": config, "tensors": tensors, "parameters": parameters,
            "layout": None}  # fmt: skip


def verify(path: Path) -> str:
    """Every file against the sha256 manifest; a DeepSpeed checkpoint's shards also against its config."""
    ckpt.verify_checkpoint(path)
    if zero3.is_zero3_checkpoint(path):
        reader, _ = open_zero3(path)  # every shard present, every parameter's shape as the config implies
        return f"every file matches its sha256 in {ckpt.MANIFEST}; shards complete for layout {reader.layout.as_dict()}"
    return f"every file matches its sha256 in {ckpt.MANIFEST}"
