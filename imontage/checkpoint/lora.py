"""A LoRA run's adapters out: diffusers' LoRA file, or merged into full diffusers weights.

A training checkpoint of a run with ``model.lora`` holds the trainable tensors only (adapters and
any listed parameters; see :mod:`imontage.models.lora`). Two ways out, both streaming:

- :func:`export_lora`: the adapters in the file diffusers' LoRA loaders read
  (``pytorch_lora_weights.safetensors``: ``transformer.<module>.lora_A.weight`` ``[r, in]`` and
  ``….lora_B.weight`` ``[out, r]``, PEFT's names under the pipeline's ``transformer`` prefix). The
  file carries no alpha, and diffusers' loader then scales by 1: the scale ``alpha / rank`` is
  folded into ``lora_B``. Listed non-adapter parameters have no place in such a file: a run with
  them is refused, naming them (merge instead).
- :func:`merged_weights`: the base model's folder (``model.init_from_diffusers``, or another given)
  with every adapter folded into its layer (``W + scale · B A``) and the listed parameters
  replaced, as the tensors :func:`imontage.checkpoint.diffusers.export_folder` writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from imontage.checkpoint import convert
from imontage.checkpoint.convert import ConversionError
from imontage.models.lora import base_model_config, is_adapter, lora_enabled

PREFIX = "transformer"  # the pipeline component diffusers' loaders give the transformer's keys


def _trainable(source: Path, weights: str, verify: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    """(model config, every tensor of a LoRA run's checkpoint or consolidated file), fp32."""
    from imontage.checkpoint.diffusers import _source_weights

    got = _source_weights(Path(source), weights, verify)
    if not lora_enabled(got.cfg.lora):
        raise ConversionError(f"{source}: not a LoRA run (its model.lora sets no rank and no trainable list)")
    return got.cfg, {name: tensor.float().clone() for name, tensor in got.tensors}


def _scale(cfg: Any) -> float:
    lora = cfg.lora
    return float(lora.alpha or lora.rank) / int(lora.rank)


def export_lora(source: Path, out: Path, weights: str = "ema", verify: bool = True) -> Path:
    """The adapters of ``source`` (a LoRA run's training checkpoint, any layout, or its consolidated
    file) as a diffusers LoRA safetensors file (module docstring)."""
    cfg, tensors = _trainable(source, weights, verify)
    parameters = _parameter_names(cfg, len(tensors), str(source))
    others = sorted(name for name in tensors if not is_adapter(name) and name in parameters)
    if others:
        raise ConversionError(
            f"{source}: trains '{others[0]}' (and {len(others) - 1} more) beside its adapters "
            "(model.lora.trainable): a LoRA file holds adapters only; export-diffusers merges them all"
        )
    scale = _scale(cfg)
    adapters = {
        f"{PREFIX}.{name}": (tensor * scale if ".lora_B." in name else tensor).contiguous()
        for name, tensor in tensors.items()
        if is_adapter(name)
    }
    if not adapters:
        raise ConversionError(f"{source}: holds no adapter (model.lora.rank is 0)")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "imontage_lora": json.dumps({"rank": int(cfg.lora.rank), "alpha_folded": scale}),
    }
    save_file(adapters, str(out), metadata=metadata)
    return out


def _parameter_names(cfg: Any, offered: int, where: str) -> set[str]:
    """The parameters of the model ``cfg`` (read from ``where``, which holds ``offered`` tensors)."""
    from imontage.models import build_model

    model = build_model(cfg, device="meta", max_tensors=convert.tensor_budget(cfg, offered), where=where)
    return {name for name, _ in model.named_parameters()}


def merged_weights(
    source: Path, base: Path | None = None, weights: str = "ema", verify: bool = True
) -> tuple[Any, Iterator[tuple[str, torch.Tensor]], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """(model config without LoRA, the merged tensors in the base's order, their layout).

    ``base``: the base model's diffusers folder; by default the run's ``model.init_from_diffusers``.
    """
    from imontage.checkpoint import diffusers

    cfg, tensors = _trainable(source, weights, verify)
    folder = Path(base) if base is not None else Path(str(cfg.init_from_diffusers or ""))
    if not str(folder) or not folder.is_dir():
        raise ConversionError(
            f"{source}: its frozen base is not in it; give the base's diffusers folder (--base): "
            f"model.init_from_diffusers={cfg.init_from_diffusers!r} is not a folder here"
        )
    scale = _scale(cfg)
    plain = base_model_config(cfg)  # the merged model has no adapters
    read = diffusers.read_folder(folder, model_cfg=plain)
    diffusers.check_model_config(folder, plain)
    layout = {name: (read.shapes[name], diffusers._NAMES[read.dtypes[name]]) for name in read.sources}

    def merged() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in diffusers.folder_tensors(read, desc=f"merging into {folder.name}"):
            module = name.removesuffix(".weight")
            if name in tensors:  # a listed trainable parameter: the run's value
                yield name, tensors[name]
            elif f"{module}.lora_A.weight" in tensors and name.endswith(".weight"):
                a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
                yield name, tensor.float() + scale * (b @ a)  # the export casts it to its layout's dtype
            else:
                yield name, tensor

    return plain, merged(), layout
