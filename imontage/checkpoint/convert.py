"""Checkpoint conversions: training checkpoint -> one safetensors file -> diffusers-style folder, and back.

Formats:
- a training checkpoint: ``RUN_DIR/checkpoints/step_N/`` (see imontage/train/checkpoint.py);
- a consolidated file: one safetensors of the single-device model's tensors, with the model
  config, step and weight kind (``ema`` or ``live``) in its metadata;
- a diffusers-style folder: ``config.json`` and ``diffusion_pytorch_model.safetensors``, or
  numbered shards with ``diffusion_pytorch_model.safetensors.index.json`` for large models.

Every conversion streams tensor by tensor and checks each tensor against the shapes the model
config implies; errors name the tensor and the file. Nothing is loaded with pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from imontage.checkpoint.safetensors_io import StreamingSafetensorsWriter, tensor_bytes
from imontage.config.schema import ModelConfig
from imontage.models.dit import build_dit
from imontage.train import checkpoint as ckpt

FORMAT = "imontage-consolidated/1"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
CLASS_NAME = "ImontageDiT"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and, where known, the tensor."""


@dataclass
class TensorSource:
    """Where one tensor lives: a safetensors file and its name there."""

    file: Path
    key: str


def model_config(values: Mapping[str, Any], where: str) -> Any:
    """A validated ModelConfig node from plain values (an unknown key is an error naming ``where``)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(values))
    except Exception as error:
        raise ConversionError(f"{where}: not a model config: {error}") from error


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer of the model ``cfg`` describes, built on the meta device."""
    return {name: tuple(t.shape) for name, t in build_dit(cfg, device="meta").state_dict().items()}


def _open(path: Path) -> Any:
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error})") from error


def _read(source: TensorSource) -> torch.Tensor:
    with _open(source.file) as handle:
        try:
            return handle.get_tensor(source.key)
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{source.file}: tensor '{source.key}' cannot be read ({error})") from error


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
        with _open(source.file) as handle:
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
        with _open(source.file) as handle:
            piece = handle.get_slice(source.key)
            stored = _safetensors_dtype(piece.get_dtype(), source)
            layout[name] = (
                tuple(piece.get_shape()),
                dtype if dtype is not None and stored.is_floating_point else stored,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    with StreamingSafetensorsWriter(out, layout, metadata) as writer:
        for name in tqdm(layout, desc=f"writing {out.name}", unit="tensor", leave=False):
            writer.write(name, _read(sources[name]).to(layout[name][1]))
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


def _file_sources(path: Path) -> dict[str, TensorSource]:
    with _open(path) as handle:
        return {key: TensorSource(path, key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)


def _metadata(path: Path) -> dict[str, str]:
    with _open(path) as handle:
        return dict(handle.metadata() or {})


# ------------------------------------------------------------------------------------ consolidate
def consolidate(checkpoint: Path, out: Path, weights: str = "ema", dtype: str | None = None) -> Path:
    """A single-device training checkpoint -> one consolidated safetensors file (EMA or live weights)."""
    if weights not in ("ema", "live"):
        raise ConversionError(f"weights must be 'ema' or 'live', not '{weights}'")
    ckpt.verify_checkpoint(checkpoint)
    state = json.loads((checkpoint / ckpt.STATE_FILE).read_text())
    cfg = model_config(state["model_config"], str(checkpoint / ckpt.STATE_FILE))
    shapes = expected_shapes(cfg)
    sources = _file_sources(checkpoint / "model.safetensors")
    if weights == "ema":
        ema_file = checkpoint / "ema.safetensors"
        if not ema_file.is_file():
            raise ConversionError(f"{ema_file}: no such file (this run kept no EMA; use weights=live)")
        sources.update(_file_sources(ema_file))  # EMA covers the parameters; buffers stay the model's
    _check_layout(sources, shapes, str(checkpoint))
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
        "step": str(state["step"]),
        "weights": weights,
    }
    return _write(out, sources, DTYPES[dtype] if dtype else None, metadata)


def read_consolidated(path: Path) -> tuple[Any, dict[str, str]]:
    """(model config, metadata) of a consolidated file."""
    metadata = _metadata(path)
    if metadata.get("format") != FORMAT:
        raise ConversionError(
            f"{path}: not a consolidated imontage checkpoint (format {metadata.get('format')!r})"
        )
    return model_config(json.loads(metadata["model_config"]), str(path)), metadata


def load_consolidated(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """A single-device DiT with the weights of a consolidated file."""
    cfg, _ = read_consolidated(path)
    sources = _file_sources(path)
    _check_layout(sources, expected_shapes(cfg), str(path))
    model = build_dit(cfg, device=device)
    model.load_state_dict({name: _read(source) for name, source in sources.items()})
    return model, cfg


# ------------------------------------------------------------------------------- export / import
def export_diffusers(consolidated: Path, out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """A consolidated file -> a diffusers-style folder (sharded with an index above ``max_shard_bytes``)."""
    cfg, metadata = read_consolidated(consolidated)
    sources = _file_sources(consolidated)
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
    with _open(source.file) as handle:
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
    index = folder / DIFFUSERS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        sources = {}
        for name, file in weight_map.items():
            if Path(file).name != file:
                raise ConversionError(f"{index}: shard name '{file}' is not a plain file name")
            if not (folder / file).is_file():
                raise ConversionError(f"{folder / file}: no such file (named by {index} for tensor '{name}')")
            sources[name] = TensorSource(folder / file, name)
        return sources
    return _file_sources(folder / DIFFUSERS_WEIGHTS)


def import_diffusers(folder: Path, out: Path) -> Path:
    """A diffusers-style folder written by :func:`export_diffusers` -> a consolidated file."""
    config_file = folder / DIFFUSERS_CONFIG
    if not config_file.is_file():
        raise ConversionError(f"{config_file}: no such file")
    values = json.loads(config_file.read_text())
    if values.pop("_class_name", None) != CLASS_NAME:
        raise ConversionError(f"{config_file}: _class_name is not {CLASS_NAME}")
    cfg = model_config(values, str(config_file))
    sources = diffusers_sources(folder)
    _check_layout(sources, expected_shapes(cfg), str(folder))
    first = next(iter(sources.values())).file
    metadata = {k: v for k, v in _metadata(first).items() if k in ("step", "weights")}
    metadata.update(format=FORMAT, model_config=json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    return _write(out, sources, None, metadata)


# ------------------------------------------------------------------------------------- inspect
def inspect(path: Path) -> dict[str, Any]:
    """What a checkpoint holds: kind, step, config, tensors (name, shape, dtype) and parameter count."""
    if (path / ckpt.MANIFEST).is_file():
        state = json.loads((path / ckpt.STATE_FILE).read_text())
        kind, config, step = "training checkpoint", state["model_config"], state["step"]
        sources = _file_sources(path / "model.safetensors")
    elif (path / DIFFUSERS_CONFIG).is_file():
        config = {
            k: v for k, v in json.loads((path / DIFFUSERS_CONFIG).read_text()).items() if k != "_class_name"
        }
        sources = diffusers_sources(path)
        kind, step = "diffusers folder", _metadata(next(iter(sources.values())).file).get("step")
    else:
        cfg, metadata = read_consolidated(path)
        kind, config, step = (
            f"consolidated ({metadata.get('weights')})",
            OmegaConf.to_container(cfg),
            metadata["step"],
        )
        sources = _file_sources(path)
    tensors = []
    for name, source in sources.items():
        with _open(source.file) as handle:
            piece = handle.get_slice(source.key)
            tensors.append((name, tuple(piece.get_shape()), piece.get_dtype()))
    parameters = sum(int(torch.Size(shape).numel()) for _, shape, _ in tensors)
    return {"kind": kind, "step": step, "config": config, "tensors": tensors, "parameters": parameters}


def config_diff(config: Mapping[str, Any], other: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: a != b`` for every leaf that differs between two model configs."""
    lines = []
    for key in sorted(set(config) | set(other)):
        a, b = config.get(key), other.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} != {b!r}")
    return lines
