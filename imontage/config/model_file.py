"""A model config read from a file imontage does not trust, and a pretrained family's diffusers ``config.json``.

A checkpoint's ``state.json``, a consolidated file's metadata and a diffusers folder's
``config.json`` each describe a model; before anything is built from one, every key is checked
against the schema and every size against what a model can have (:func:`model_config`). A
pretrained family's ``config.json`` names its diffusers class (``_class_name``), which the family
registry maps to a family, and that family's ``diffusers_config`` module maps the class's config
to a :class:`~imontage.config.schema.ModelConfig` and back (:func:`read_model_config`,
:func:`check_model_config`, which a recipe's ``model.init_from_diffusers`` is validated with).
Errors are :class:`~imontage.untrusted.ConversionError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import OmegaConf

from imontage.config.schema import ModelConfig
from imontage.models import registry, trained_experts
from imontage.untrusted import ConversionError, read_json, refuse_pickle

DIFFUSERS_CONFIG = "config.json"
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder's: its components and own keys


MAX_CONFIG_INT = 2**31 - 1  # no size of a model config read from a file is larger


def model_config(values: Mapping[str, Any], where: str) -> Any:
    """A validated ModelConfig node from plain values (an unknown key, or a size no model has, is
    an error naming the key and ``where``)."""
    if not isinstance(values, Mapping):
        raise ConversionError(f"{where}: the model config is {type(values).__name__}, not an object")
    check_sizes(values, where)
    try:
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(values))
    except Exception as error:
        raise ConversionError(f"{where}: not a model config: {str(error).splitlines()[0]}") from None


def check_sizes(values: Any, where: str, key: str = "") -> None:
    """Every number of a model config read from a file is finite, every integer at most MAX_CONFIG_INT
    in size (a width or count beyond it overflows the products that size tensors)."""
    if isinstance(values, Mapping | list):
        items = values.items() if isinstance(values, Mapping) else enumerate(values)
        for inner, value in items:
            check_sizes(
                value,
                where,
                f"{key}.{inner}"
                if key and isinstance(inner, str)
                else f"{key}[{inner}]"
                if key
                else str(inner),
            )
    elif (isinstance(values, float) and not math.isfinite(values)) or (
        isinstance(values, int) and not isinstance(values, bool) and abs(values) > MAX_CONFIG_INT
    ):
        raise ConversionError(f"{where}: model config key '{key}': {values} is not a size any model has")


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


def family_module(family: str) -> ModuleType:
    """A family's diffusers config mapping (``model_config_from_diffusers``, ``diffusers_config``)."""
    record = registry.family(family)
    if record.diffusers_config is None:
        known = ", ".join(name for name, r in registry.FAMILIES.items() if r.diffusers_config is not None)
        raise ConversionError(f"model.family '{family}' has no diffusers class (those that do: {known})")
    return record.diffusers_config()


def diffusers_class(family: str) -> str:
    """The name diffusers gives the transformer class of ``family`` (its record's first)."""
    family_module(family)  # an error for a family without one
    return registry.family(family).diffusers_classes[0]


def read_class(folder: Path) -> tuple[dict[str, Any], str]:
    """(config.json, family) of a folder; reads config.json only."""
    if folder.is_file():
        refuse_pickle(folder)
        raise ConversionError(f"{folder}: a file; a diffusers model is a folder (config.json + weights)")
    config_file = folder / DIFFUSERS_CONFIG
    if not config_file.is_file():
        raise ConversionError(f"{config_file}: no such file (not a diffusers model folder)")
    config = read_json(config_file)
    name = config.get("_class_name")
    record = registry.diffusers_family(name) if isinstance(name, str) else None
    if record is None:
        known = ", ".join(c for r in registry.FAMILIES.values() for c in r.diffusers_classes)
        raise ConversionError(f"{config_file}: key '_class_name': {name!r} is not one of {known}")
    return config, record.name


def read_model_config(folder: Path) -> tuple[dict[str, Any], str, Any]:
    """(config.json, family, imontage ModelConfig) of a folder."""
    config, family = read_class(folder)
    check_sizes(config, str(folder / DIFFUSERS_CONFIG))  # before any size is multiplied into another
    try:
        values = family_module(family).model_config_from_diffusers(config)
    except (ValueError, KeyError, TypeError, OverflowError) as error:
        raise ConversionError(f"{folder / DIFFUSERS_CONFIG}: {error}") from error
    return config, family, model_config(values, str(folder / DIFFUSERS_CONFIG))


def check_model_config(folder: Path, model_cfg: Any) -> None:
    """``model_cfg`` describes the model of ``folder``: the same family and class config (the keys
    imontage adds, such as ``positions`` or ``max_text_len``, are free)."""
    config, family = read_class(folder)
    if str(model_cfg.family) != family:
        raise ConversionError(
            f"{folder / DIFFUSERS_CONFIG}: holds a {config['_class_name']} (family {family}), the recipe's "
            f"model.family is {model_cfg.family}"
        )
    try:
        ours = family_module(family).diffusers_config(model_cfg)
    except (ValueError, KeyError, TypeError) as error:
        raise ConversionError(f"{folder / DIFFUSERS_CONFIG}: the recipe's model config: {error}") from error

    def keys(values: dict[str, Any]) -> Any:  # metadata (_class_name, _diffusers_version, ...) aside
        return json.loads(json.dumps({k: v for k, v in values.items() if not k.startswith("_")}))

    diff = config_diff(keys(config), keys(ours))
    if diff:
        raise ConversionError(
            f"{folder / DIFFUSERS_CONFIG}: differs from the recipe's model config ({config['_class_name']} vs recipe): "
            + "; ".join(diff)
        )


def is_pipeline(folder: Path) -> bool:
    """Whether ``folder`` is a diffusers pipeline folder (it has a ``model_index.json``)."""
    return Path(folder).is_dir() and (Path(folder) / PIPELINE_INDEX).is_file()


def pipeline_mapping(family: str, where: Path) -> ModuleType:
    """A family's diffusers config mapping, which must know its pipeline layout (``pipeline_transformers``)."""
    mapping = family_module(family)
    if not hasattr(mapping, "pipeline_transformers"):
        raise ConversionError(f"{where}: model.family '{family}' has no diffusers pipeline layout")
    return mapping


def _leaves(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat |= _leaves(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def pipeline_components(folder: Path, model_cfg: Any) -> dict[str, Path]:
    """The transformer subfolders of a pipeline folder that a run of ``model_cfg`` reads, by expert
    name: the one ``model.expert`` names, or every expert; ``{"": folder/transformer}`` for a model
    of one network. Reads ``model_index.json`` and each subfolder's ``config.json`` only: the keys
    the index sets (Wan's ``boundary_ratio``) and each transformer's config must be ``model_cfg``'s."""
    folder = Path(folder)
    where = folder / PIPELINE_INDEX
    mapping = pipeline_mapping(str(model_cfg.family), where)
    index = read_json(where)
    try:
        keys = _leaves(mapping.model_config_from_pipeline(index))
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{where}: {error}") from error
    for key, value in keys.items():
        ours = OmegaConf.select(model_cfg, key)
        if ours != value:
            raise ConversionError(
                f"{where}: sets model.{key} = {value!r}, the recipe's model config has {ours!r}"
            )
    experts = trained_experts(model_cfg)
    names = [expert.name for expert in experts] if experts else [""]
    components = {name: folder / (name or mapping.pipeline_transformers(model_cfg)[0]) for name in names}
    for component in components.values():
        check_model_config(component, model_cfg)
    return components
