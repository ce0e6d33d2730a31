"""diffusers model folders of the pretrained families <-> imontage models and checkpoints.

A pretrained family's imontage module has the parameter names and shapes of the diffusers class
it reimplements (its record names the class: ``WanTransformer3DModel`` for ``wan``, ``HunyuanVideoTransformer3DModel`` for
``hunyuan_video``), so importing streams tensors by name and exporting writes the same names back.

A folder is what diffusers' ``save_pretrained`` writes: ``config.json`` (``_class_name``, the
class's arguments) and ``diffusion_pytorch_model.safetensors``, or shards named by
``diffusion_pytorch_model.safetensors.index.json``. Pickle weights (``.bin``, ``.pt``, ``.ckpt``,
``.pth``) are refused by name, never opened. Tensors are read one at a time with safetensors'
``safe_open``, one shard open at a time; every name and shape is checked before the first is read.
The family's ``diffusers_config`` module maps the class config to imontage's model config and back.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from imontage.checkpoint import convert
from imontage.checkpoint import store as ckpt
from imontage.checkpoint.convert import SourceWeights, checkpoint_weights, source_weights
from imontage.checkpoint.lora import adapter_scale, merge_adapters, trainable_tensors
from imontage.checkpoint.safetensors_io import StreamingSafetensorsWriter, tensor_bytes
from imontage.checkpoint.tensors import (
    DIFFUSERS_INDEX,
    DIFFUSERS_WEIGHTS,
    DTYPE_NAMES,
    TensorSource,
    check_tensors,
    expected_shapes,
    finite,
    open_safetensors,
    sources_by_file,
    tensor_headers,
    weight_sources,
)
from imontage.config.model_file import (
    DIFFUSERS_CONFIG,
    check_model_config,
    config_diff,
    diffusers_class,
    family_module,
    is_pipeline,
    pipeline_components,
    read_model_config,
)
from imontage.models import registry
from imontage.models.lora import base_model_config, lora_enabled
from imontage.untrusted import ConversionError, parse_json, string_map

CONFIG, WEIGHTS, INDEX = DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX  # a folder's files
DIFFUSERS_VERSION = "0.42.1"  # the version the families were measured against (DESIGN.md)
MAX_SHARD_BYTES = 10 * 2**30  # save_pretrained's default max_shard_size ("10GB")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_diffusers_model(model_cfg: Any) -> torch.nn.Module:
    """diffusers' own class for ``model_cfg`` (a pretrained family's), with its default random
    weights: the reference that imontage's model is compared with in tests and benchmarks."""
    family = str(model_cfg.family)
    config = family_module(family).diffusers_config(model_cfg)
    cls = getattr(importlib.import_module("diffusers"), diffusers_class(family))
    return cls(**{key: value for key, value in config.items() if not key.startswith("_")})


@dataclass
class DiffusersFolder:
    """A diffusers model folder, its config checked and its tensors located (none read yet)."""

    path: Path
    class_name: str
    family: str
    config: dict[str, Any]  # config.json as read
    model_config: Any  # the imontage ModelConfig it maps to
    sources: dict[str, TensorSource]  # in the order of the files
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names (F32, BF16, ...)


def read_folder(
    folder: Path, expected: Mapping[str, tuple[int, ...]] | None = None, model_cfg: Any = None
) -> DiffusersFolder:
    """A folder's config and tensor locations, checked against ``expected`` (name -> shape; by
    default the shapes of the imontage model ``model_cfg`` describes, or else its config does).

    The model is built on the meta device only after the folder's tensors are counted, and stops
    early if its config describes far more (:func:`imontage.checkpoint.tensors.tensor_budget`).
    """
    folder = Path(folder)
    config, family, folder_cfg = read_model_config(folder)
    located = weight_sources(folder)
    sources = {
        name: located[name] for names in sources_by_file(located).values() for name in names
    }  # shard by shard
    shapes, dtypes = tensor_headers(sources)
    if expected is None:
        expected = expected_shapes(
            folder_cfg if model_cfg is None else model_cfg, adapters=False, offered=len(sources),
            where=str(folder / CONFIG),
        )  # fmt: skip
    index = folder / INDEX
    check_tensors(index if index.is_file() else folder / WEIGHTS, sources, shapes, expected)
    return DiffusersFolder(folder, config["_class_name"], family, config, folder_cfg, sources, shapes, dtypes)


def folder_tensors(folder: DiffusersFolder, desc: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor as stored) of every tensor, shard by shard, one tensor in memory at a time;
    pretrained weights with NaN or Inf are refused, naming the tensor."""
    with tqdm(
        total=len(folder.sources), desc=desc or f"reading {folder.path.name}", unit="tensor", leave=False
    ) as bar:
        for file, names in sources_by_file(folder.sources).items():
            with open_safetensors(file) as handle:
                for name in names:
                    yield name, finite(handle.get_tensor(folder.sources[name].key), name, file)
                    bar.update()


def load_into(model: torch.nn.Module, folder: Path) -> DiffusersFolder:
    """Copy a folder's tensors into ``model`` (cast to each parameter's dtype), checked against its state dict."""
    targets = model.state_dict(keep_vars=True)
    read = read_folder(folder, {name: tuple(t.shape) for name, t in targets.items()})
    with torch.no_grad():
        for name, tensor in folder_tensors(read):
            targets[name].copy_(tensor)
    return read


def model_weights(path: Path, model_cfg: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, single-device tensor) of every parameter of the model ``model_cfg`` describes, one at
    a time, from anything a stage may start from: a pretrained family's diffusers folder (its
    config checked against ``model_cfg``, floating tensors as float32), or what
    :func:`imontage.checkpoint.convert.checkpoint_weights` reads (a consolidated file, a training
    checkpoint of any layout), or a pipeline folder, of which only the subfolder of the expert the
    model is (``model.expert``) is read (:func:`~imontage.config.model_file.pipeline_components`),
    or, for a model of every expert, each expert's subfolder, its names under the expert's
    (``transformer.blocks.0...``, ``transformer_2.blocks.0...``). Every name and shape is checked
    before the first tensor is read (each subfolder's before its first)."""
    if is_pipeline(path):  # the subfolder of each network the model is
        folders = pipeline_components(path, model_cfg)
        if len(folders) == 1:
            yield from model_weights(next(iter(folders.values())), model_cfg)
            return
        for expert, folder in folders.items():
            one = OmegaConf.merge(model_cfg, {"expert": expert})  # the shapes of one network
            yield from ((f"{expert}.{name}", tensor) for name, tensor in model_weights(folder, one))
        return
    if not (path.is_dir() and not (path / ckpt.MANIFEST).is_file() and (path / CONFIG).is_file()):
        yield from checkpoint_weights(path, model_cfg)
        return
    check_model_config(path, model_cfg)
    read = read_folder(path, model_cfg=model_cfg)
    for name, tensor in folder_tensors(read, desc=f"weights of {path.name}"):
        yield name, tensor.float() if tensor.is_floating_point() else tensor


# ----------------------------------------------------------------------------------------- import
def import_folder(
    folder: Path, out: Path, expected: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[Path, Any]:
    """A diffusers folder -> an imontage consolidated file (tensors in their stored dtypes), and its model config.

    The metadata records the class, config.json and every tensor's dtype, so that exporting
    restores them.
    """
    read = read_folder(folder, expected)
    metadata = {
        "format": convert.FORMAT,
        "model_config": json.dumps(OmegaConf.to_container(read.model_config, resolve=True)),
        "step": "0",
        "weights": "pretrained",
        "diffusers_class": read.class_name,
        "diffusers_config": json.dumps(read.config),
        "diffusers_dtypes": json.dumps(read.dtypes),
    }
    layout = {name: (read.shapes[name], DTYPE_NAMES[read.dtypes[name]]) for name in read.sources}
    out.parent.mkdir(parents=True, exist_ok=True)
    with StreamingSafetensorsWriter(out, layout, metadata) as writer:
        for name, tensor in folder_tensors(read, desc=f"importing {Path(folder).name}"):
            writer.write(name, tensor)
            del tensor
    return out, read.model_config


def model_config_yaml(model_cfg: Any, source: Path) -> str:
    """The model config as a ``configs/model/*.yaml`` preset."""
    values = OmegaConf.to_container(model_cfg, resolve=True)
    assert isinstance(values, dict)
    for name in registry.FAMILIES:
        if name != values["family"]:
            values.pop(name, None)  # the other families' sections only hold defaults
    if not values.get("init_from_diffusers"):
        values.pop("init_from_diffusers", None)
    header = f"# Imported from {source} (tools/convert_checkpoint.py import-diffusers).\n"
    return header + OmegaConf.to_yaml(OmegaConf.create(values))


# ----------------------------------------------------------------------------------------- export


def merged_weights(
    source: Path, base: Path | None = None, weights: str = "ema", verify: bool = True
) -> tuple[Any, Iterator[tuple[str, torch.Tensor]], convert.Layout]:
    """A LoRA run's weights merged into its base (:func:`imontage.checkpoint.lora.merge_adapters`):
    (model config without LoRA, the merged tensors in the base's order, their layout).

    ``base``: the base model's diffusers folder; by default the run's ``model.init_from_diffusers``.
    """
    cfg, tensors = trainable_tensors(source, weights, verify)
    folder = Path(base) if base is not None else Path(str(cfg.init_from_diffusers or ""))
    if not str(folder) or not folder.is_dir():
        raise ConversionError(
            f"{source}: its frozen base is not in it; give the base's diffusers folder (--base): "
            f"model.init_from_diffusers={cfg.init_from_diffusers!r} is not a folder here"
        )
    plain = base_model_config(cfg)  # the merged model has no adapters
    read = read_folder(folder, model_cfg=plain)
    check_model_config(folder, plain)
    layout = {name: (read.shapes[name], DTYPE_NAMES[read.dtypes[name]]) for name in read.sources}
    merged = merge_adapters(
        tensors, adapter_scale(cfg), folder_tensors(read, desc=f"merging into {folder.name}")
    )
    return plain, merged, layout


def _recorded_dtypes(cfg: Any, metadata: Mapping[str, str]) -> dict[str, str]:
    """The dtypes of the folder the weights came from: recorded at import, or read from the
    recipe's ``model.init_from_diffusers`` folder when it is still there (of a pipeline folder, the
    subfolder of the one expert ``cfg`` is); else none."""
    if "diffusers_dtypes" in metadata:
        where = "metadata key 'diffusers_dtypes'"
        return string_map(parse_json(metadata["diffusers_dtypes"], where), where, "diffusers_dtypes")
    origin = str(getattr(cfg, "init_from_diffusers", "") or "")
    if not origin or not Path(origin).is_dir():
        return {}
    folder = Path(origin)
    if is_pipeline(folder):
        folders = list(pipeline_components(folder, cfg).values())
        if len(folders) != 1:
            return {}
        folder = folders[0]
    return tensor_headers(weight_sources(folder))[1]


def export_folder(
    source: Path,
    out_dir: Path,
    model_cfg: Any = None,
    weights: str = "ema",
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    verify: bool = True,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    base: Path | None = None,
) -> Path:
    """A consolidated file or a training checkpoint (any layout) -> a folder diffusers' ``from_pretrained`` loads.

    ``model_cfg``: the model config when the source holds none, else checked against the source's.
    ``dtype``: cast the floating tensors (``fp32``/``bf16``/``fp16``); by default each tensor gets
    the dtype of the folder the weights were imported from (recorded at import, or read from the
    recipe's ``model.init_from_diffusers``), else keeps its own. Shards above ``max_shard_bytes``,
    named and indexed as ``save_pretrained`` names them. A LoRA run's checkpoint (its base frozen,
    not in it) is merged into its base: ``base`` or the run's ``model.init_from_diffusers``
    (:func:`merged_weights`).
    """
    source = Path(source)
    got = source_weights(source, weights, verify)
    if lora_enabled(got.cfg.lora):
        plain, tensors, layout = merged_weights(source, base, weights, verify=False)
        got = SourceWeights(plain, layout, tensors, {})
    cfg = got.cfg
    if model_cfg is not None:
        diff = config_diff(
            OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
            OmegaConf.to_container(model_cfg, resolve=True),  # type: ignore[arg-type]
        )
        diff = [line for line in diff if not line.startswith(("init_from_diffusers", "lora"))]
        if diff:
            raise ConversionError(
                f"{source}: its model config differs from the one given: " + "; ".join(diff)
            )
    family = str(cfg.family)
    module = family_module(family)
    try:
        config = module.diffusers_config(cfg)
    except (ValueError, KeyError, TypeError) as error:
        raise ConversionError(
            f"{source}: its model config has no {diffusers_class(family)} equivalent: {error}"
        ) from error
    shapes = {name: shape for name, (shape, _) in got.layout.items()}
    if expected is None:
        expected = expected_shapes(cfg, adapters=False, offered=len(got.layout), where=str(source))
    check_tensors(source, {n: TensorSource(source, n) for n in got.layout}, shapes, expected)
    recorded = _recorded_dtypes(cfg, got.metadata)
    layout = {}
    for name, (shape, stored) in got.layout.items():
        target = stored
        if stored.is_floating_point:
            if dtype is not None:
                target = DTYPES[dtype]
            elif name in recorded:
                target = DTYPE_NAMES[recorded[name]]
        layout[name] = (shape, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    imported = parse_json(
        got.metadata.get("diffusers_config", "{}"), f"{source}: metadata key 'diffusers_config'"
    )
    version = imported.get("_diffusers_version", DIFFUSERS_VERSION) if isinstance(imported, dict) else None
    if not isinstance(version, str):
        raise ConversionError(f"{source}: metadata key 'diffusers_config' holds no diffusers version string")
    full = {"_class_name": diffusers_class(family), "_diffusers_version": version, **config}
    shards = _plan_shards(layout, max_shard_bytes)
    for stale in [out_dir / WEIGHTS, out_dir / INDEX, *out_dir.glob("diffusion_pytorch_model-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a previous export's files would confuse from_pretrained
    _write_shards(out_dir, layout, shards, got.tensors)
    if len(shards) > 1:
        total = sum(tensor_bytes(shape, dt) for shape, dt in layout.values())
        weight_map = {name: file for file, names in shards for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out_dir / CONFIG).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out_dir


def _plan_shards(
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], max_bytes: int
) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) of each shard, in layout order, as ``save_pretrained`` names them."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in layout.items():
        nbytes = tensor_bytes(shape, dtype)
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return [(WEIGHTS, groups[0])]
    n = len(groups)
    return [
        (f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors", names)
        for i, names in enumerate(groups, 1)
    ]


def _write_shards(
    out_dir: Path,
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    shards: list[tuple[str, list[str]]],
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> None:
    """One pass over ``tensors`` (in layout order) into the shards, one tensor held at a time."""
    bar = tqdm(total=len(layout), desc=f"exporting to {out_dir.name}", unit="tensor", leave=False)
    try:
        for file, names in shards:
            with StreamingSafetensorsWriter(
                out_dir / file, {n: layout[n] for n in names}, {"format": "pt"}
            ) as writer:
                for expected in names:
                    name, tensor = next(tensors)
                    if name != expected:
                        raise ConversionError(f"{out_dir / file}: got tensor '{name}', expected '{expected}'")
                    writer.write(name, tensor.to(layout[name][1]))
                    del tensor
                    bar.update()
    finally:
        bar.close()
        close = getattr(tensors, "close", None)
        if close is not None:
            close()  # releases a ZeRO-3 reader's mappings
