"""Pretrained components imontage loads as they are, without converting them (a VAE for encoding,
sampling or Imagic; the text and image encoders of ``encode_shards``), read as untrusted input
before diffusers or transformers allocates a byte of them.

Both libraries build the model a folder's ``config.json`` describes and then fill it from the
weight files: a config that claims a larger model than its weights makes them allocate what it
claims (a VAE ``base_dim`` of 100000 asked for a terabyte; a text encoder's ``d_ff`` of 10^7 took
2.2 GiB and 16 s before a ``RuntimeError``), and transformers fills the layers a config adds with
random weights, with a warning, so the encodings change silently. Here the model is first built
on the meta device, stopped once it registers twice the tensors the folder offers
(:func:`imontage.models.tensor_limit`), and compared with the folder's safetensors headers.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from imontage.checkpoint.tensors import (
    DIFFUSERS_INDEX,
    DIFFUSERS_WEIGHTS,
    check_tensors,
    tensor_headers,
    weight_sources,
)
from imontage.config.model_file import DIFFUSERS_CONFIG
from imontage.models import tensor_limit
from imontage.untrusted import ConversionError, InputError, field, read_json

TRANSFORMERS_WEIGHTS = "model.safetensors"


def _meta_model(build: Any, offered: int, config_file: Path, class_name: str) -> torch.nn.Module:
    """``build()`` on the meta device, stopped past twice the ``offered`` tensors; a config value of
    the wrong kind is one line naming the file."""
    try:
        with tensor_limit(2 * offered + 64, str(config_file)), torch.device("meta"):
            return build()
    except InputError:  # more tensors than offered, or a size too large: named by tensor_limit
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:  # values of the wrong kind
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(f"{config_file}: not a valid {class_name} config ({reason})") from None


def check_component_folder(folder: str | Path, class_name: str) -> None:
    """A diffusers component folder (``class_name``: its diffusers class, which the caller has
    checked is one it loads): ``config.json`` bounded, weights in safetensors only (pickles refused
    by name, never opened), and the model its config describes holding exactly the folder's
    tensors at their shapes."""
    folder = Path(folder)
    config_file = folder / DIFFUSERS_CONFIG
    config = read_json(config_file, dict)
    sources = weight_sources(folder)
    shapes, _ = tensor_headers(sources)
    model_class = getattr(importlib.import_module("diffusers"), class_name)
    model = _meta_model(lambda: model_class.from_config(config), len(sources), config_file, class_name)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    index = folder / DIFFUSERS_INDEX
    where = index if index.is_file() else folder / DIFFUSERS_WEIGHTS
    check_tensors(where, sources, shapes, expected)


def transformers_class(folder: str | Path, default: str) -> tuple[type, Any]:
    """(the transformers model class a folder's config names, else ``default``; its config), the
    config read bounded and the class checked to be a transformers model before either is used."""
    transformers = importlib.import_module("transformers")
    config_file = Path(folder) / DIFFUSERS_CONFIG
    raw = read_json(config_file, dict)
    architectures = field(raw, "architectures", list, config_file) if "architectures" in raw else None
    name = architectures[0] if architectures else default
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ConversionError(f"{config_file}: architectures names {name!r}, not a transformers model class")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, TypeError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(f"{config_file}: not a transformers config ({reason})") from None
    return model_class, config


def check_transformers_folder(folder: str | Path, default: str) -> None:
    """A transformers model folder (a text or image encoder): ``config.json`` bounded and naming a
    transformers model class, weights in safetensors only, and the model its config describes, built
    on the meta device, no larger than the tensors its weight files hold (a folder may hold more, as
    a whole T5 checkpoint does for its encoder; that every parameter is then filled from the files,
    none left at random, is checked when it loads: ``imontage.dataprep.encode.pretrained_model``)."""
    folder = Path(folder)
    model_class, config = transformers_class(folder, default)
    sources = weight_sources(folder, TRANSFORMERS_WEIGHTS)
    shapes, _ = tensor_headers(sources)
    model = _meta_model(
        lambda: model_class(config), len(sources), folder / DIFFUSERS_CONFIG, model_class.__name__
    )
    claimed = sum(parameter.numel() for parameter in model.parameters())  # tied weights counted once
    held = sum(torch.Size(shape).numel() for shape in shapes.values())
    if claimed > held:
        raise ConversionError(
            f"{folder / DIFFUSERS_CONFIG}: describes a {model_class.__name__} of {claimed:,} parameters, "
            f"its weights hold {held:,}"
        )
