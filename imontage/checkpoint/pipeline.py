"""diffusers pipeline folders <-> imontage consolidated files, one per transformer of the pipeline.

A pipeline folder is what a diffusers pipeline's ``save_pretrained`` writes: ``model_index.json``
(``_class_name``, one ``[library, class]`` entry per component, the pipeline's own keys) and a
subfolder per component. The components whose class is a family's transformer are the model: one
``transformer``, or a pair that the pipeline switches between by timestep (Wan 2.2 A14B:
``transformer`` and ``transformer_2`` with ``boundary_ratio``). The family's ``diffusers_config``
module says which components a model config has (``pipeline_transformers``), which model keys the
pipeline's keys set (``model_config_from_pipeline``) and back (``pipeline_config``); every
transformer of a pipeline has the same config. Each transformer folder is imported and exported by
:mod:`imontage.checkpoint.diffusers`; the other components (VAE, text encoder, scheduler, ...) are
copied from a pipeline folder when one is given.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from imontage.checkpoint.convert import FORMAT, source_weights
from imontage.checkpoint.diffusers import (
    MAX_SHARD_BYTES,
    ConversionError,
    export_folder,
    import_folder,
    read_model_config,
)
from imontage.checkpoint.safetensors_io import StreamingSafetensorsWriter
from imontage.config.model_file import PIPELINE_INDEX, pipeline_mapping
from imontage.models import registry, trained_experts
from imontage.untrusted import read_json


@dataclass
class PipelineFolder:
    """A pipeline folder's index and the transformers in it (none of their tensors read)."""

    path: Path
    index: dict[str, Any]  # model_index.json as read
    transformers: tuple[str, ...]  # its components that hold the model, in the family's order
    model_config: Any  # the imontage ModelConfig of each of them, with the pipeline's keys


def read_pipeline(folder: Path) -> PipelineFolder:
    """A pipeline folder's index, its transformer components and their one model config.

    Every transformer's ``config.json`` must be the same, and the components must be those the
    model config implies (a ``boundary_ratio`` with no ``transformer_2``, or the reverse, is an
    error naming ``model_index.json``).
    """
    folder = Path(folder)
    where = folder / PIPELINE_INDEX
    index = read_json(where)
    found: dict[str, tuple[dict[str, Any], str, Any]] = {}
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue  # the pipeline's own keys
        if not isinstance(entry[1], str) or registry.diffusers_family(entry[1]) is None:
            continue  # not a transformer, or an empty slot ([null, null])
        found[component] = read_model_config(folder / component)
    if not found:
        raise ConversionError(f"{where}: no component is the transformer of a family")
    (first, (config, family, cfg)), *others = found.items()
    for component, (other, _, _) in others:
        same = {k: v for k, v in other.items() if not k.startswith("_")}
        if same != {k: v for k, v in config.items() if not k.startswith("_")}:
            raise ConversionError(
                f"{folder / component / 'config.json'}: differs from {first}'s; a pipeline's transformers share one config"
            )
    mapping = pipeline_mapping(family, where)
    try:
        cfg = OmegaConf.merge(cfg, mapping.model_config_from_pipeline(index))
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{where}: {error}") from error
    expected = tuple(mapping.pipeline_transformers(cfg))
    if set(found) != set(expected):
        raise ConversionError(
            f"{where}: holds transformers {', '.join(sorted(found))}; its keys describe {', '.join(expected)}"
        )
    return PipelineFolder(folder, index, expected, cfg)


def import_pipeline(folder: Path, out_dir: Path) -> tuple[dict[str, Path], Any]:
    """A pipeline folder -> ``out_dir/<component>.safetensors`` per transformer (as
    :func:`~imontage.checkpoint.diffusers.import_folder` writes them), and the model config."""
    read = read_pipeline(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        component: import_folder(read.path / component, out_dir / f"{component}.safetensors")[0]
        for component in read.transformers
    }
    return files, read.model_config


def split_experts(source: Path, out_dir: Path, weights: str = "ema", verify: bool = True) -> dict[str, Path]:
    """A consolidated file or training checkpoint of a model of every expert (``model.expert`` unset)
    -> ``out_dir/<expert>.safetensors`` per expert: its tensors without the expert's prefix, in their
    stored dtypes, its model config naming the expert (one source per component of
    :func:`export_pipeline`)."""
    got = source_weights(Path(source), weights, verify)
    experts = trained_experts(got.cfg)
    if len(experts) < 2:
        raise ConversionError(f"{source}: holds one network, not every expert of a model (model.expert)")
    outs = {expert.name: out_dir / f"{expert.name}.safetensors" for expert in experts}
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        writers = {}
        for expert in experts:
            prefix = f"{expert.name}."
            layout = {n[len(prefix) :]: v for n, v in got.layout.items() if n.startswith(prefix)}
            cfg = OmegaConf.merge(got.cfg, {"expert": expert.name})
            metadata = {**got.metadata, "model_config": json.dumps(OmegaConf.to_container(cfg, resolve=True))}
            metadata.setdefault("format", FORMAT)
            metadata.setdefault("step", "0")
            metadata.setdefault("weights", weights)
            writers[prefix] = stack.enter_context(
                StreamingSafetensorsWriter(outs[expert.name], layout, metadata)
            )
        for name, tensor in got.tensors:
            owner = next((p for p in writers if name.startswith(p)), None)
            if owner is None:
                raise ConversionError(f"{source}: tensor '{name}' belongs to no expert")
            writers[owner].write(name[len(owner) :], tensor.to(got.layout[name][1]))
    return outs


def export_pipeline(
    sources: Mapping[str, Path],
    out_dir: Path,
    model_cfg: Any,
    components_from: Path | None = None,
    weights: str = "ema",
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """One source per transformer component (what :func:`~imontage.checkpoint.diffusers.export_folder`
    takes) -> a pipeline folder: ``out_dir/<component>/`` each, and ``model_index.json`` with the
    pipeline keys of ``model_cfg``.

    ``components_from``: a pipeline folder whose other components are copied (and kept in the
    index); without it the index names the transformers only, and the pipeline is loaded with the
    other components given to ``from_pretrained``. A source under the component ``""`` holds every
    expert (a run with ``model.expert`` unset): it is split first (:func:`split_experts`).
    """
    if "" in sources:
        split = split_experts(Path(sources[""]), Path(out_dir) / ".experts", weights)
        try:
            others = {k: v for k, v in sources.items() if k}
            if set(others) & set(split):
                raise ConversionError(f"{out_dir}: {', '.join(sorted(set(others) & set(split)))} given twice")
            return export_pipeline(
                {**others, **split}, out_dir, model_cfg, components_from, "live", dtype, max_shard_bytes
            )
        finally:
            shutil.rmtree(Path(out_dir) / ".experts", ignore_errors=True)
    family = str(model_cfg.family)
    mapping = pipeline_mapping(family, Path(out_dir))
    expected = tuple(mapping.pipeline_transformers(model_cfg))
    if set(sources) != set(expected):
        raise ConversionError(
            f"{out_dir}: got weights for {', '.join(sorted(sources))}; the model config has {', '.join(expected)}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    if components_from is not None:
        base = read_pipeline(components_from)
        index = dict(base.index)
        for component in base.transformers:
            index[component] = [None, None]  # an expert the exported model does not have stays empty
        for component, entry in base.index.items():
            if component.startswith("_") or component in base.transformers:
                continue
            if (
                isinstance(entry, list)
                and entry
                and entry[0] is not None
                and (base.path / component).is_dir()
            ):
                shutil.copytree(base.path / component, out_dir / component, dirs_exist_ok=True)
    class_name = registry.family(family).diffusers_classes[0]
    for component in expected:
        export_folder(
            Path(sources[component]), out_dir / component, weights=weights, dtype=dtype,
            max_shard_bytes=max_shard_bytes,
        )  # fmt: skip
        config, _, exported = read_model_config(out_dir / component)
        if mapping.diffusers_config(exported) != mapping.diffusers_config(model_cfg):
            raise ConversionError(
                f"{sources[component]}: its model config is not the pipeline's ({component})"
            )
        index[component] = ["diffusers", class_name]
        index.setdefault("_diffusers_version", config["_diffusers_version"])
    index.update(mapping.pipeline_config(model_cfg))
    (out_dir / PIPELINE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir
