"""A LoRA run's adapters out: diffusers' LoRA file, or merged into full diffusers weights.

A training checkpoint of a run with ``model.lora`` holds the trainable tensors only (adapters and
any listed parameters; see :mod:`imontage.models.lora`). Two ways out, both streaming:

- :func:`export_lora`: the adapters in the file diffusers' LoRA loaders read
  (``pytorch_lora_weights.safetensors``: ``transformer.<module>.lora_A.weight`` ``[r, in]`` and
  ``….lora_B.weight`` ``[out, r]``, PEFT's names under the pipeline's ``transformer`` prefix). The
  file carries no alpha, and diffusers' loader then scales by 1: the scale ``alpha / rank`` is
  folded into ``lora_B``. Listed non-adapter parameters have no place in such a file: a run with
  them is refused, naming them (merge instead).
- :func:`merge_adapters`: the base model's tensors with every adapter folded into its layer
  (``W + scale · B A``) and the listed parameters replaced:
  :func:`imontage.checkpoint.diffusers.merged_weights` streams them from the base's folder (the
  run's ``model.init_from_diffusers``, or another given) into what
  :func:`~imontage.checkpoint.diffusers.export_folder` writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from imontage.checkpoint.convert import source_weights
from imontage.checkpoint.tensors import tensor_budget
from imontage.models import build_model
from imontage.models.lora import is_adapter, lora_enabled
from imontage.untrusted import ConversionError

PREFIX = "transformer"  # the pipeline component diffusers' loaders give the transformer's keys


def trainable_tensors(source: Path, weights: str, verify: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    """(model config, every tensor of a LoRA run's checkpoint or consolidated file), fp32."""
    got = source_weights(Path(source), weights, verify)
    if not lora_enabled(got.cfg.lora):
        raise ConversionError(f"{source}: not a LoRA run (its model.lora sets no rank and no trainable list)")
    return got.cfg, {name: tensor.float().clone() for name, tensor in got.tensors}


def adapter_scale(cfg: Any) -> float:
    """``alpha / rank``: what ``B A`` is multiplied by in the adapted layer."""
    lora = cfg.lora
    return float(lora.alpha or lora.rank) / int(lora.rank)


def export_lora(source: Path, out: Path, weights: str = "ema", verify: bool = True) -> Path:
    """The adapters of ``source`` (a LoRA run's training checkpoint, any layout, or its consolidated
    file) as a diffusers LoRA safetensors file (module docstring)."""
    cfg, tensors = trainable_tensors(source, weights, verify)
    parameters = _parameter_names(cfg, len(tensors), str(source))
    others = sorted(name for name in tensors if not is_adapter(name) and name in parameters)
    if others:
        raise ConversionError(
            f"{source}: trains '{others[0]}' (and {len(others) - 1} more) beside its adapters "
            "(model.lora.trainable): a LoRA file holds adapters only; export-diffusers merges them all"
        )
    scale = adapter_scale(cfg)
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
    model = build_model(cfg, device="meta", max_tensors=tensor_budget(cfg, offered), where=where)
    return {name for name, _ in model.named_parameters()}


def merge_adapters(
    trained: Mapping[str, torch.Tensor], scale: float, base: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's tensors (``base``, in its order) with the run's ``trained`` tensors in: each
    adapted weight ``W + scale · B A`` in fp32, each listed trainable parameter the run's value."""
    for name, tensor in base:
        module = name.removesuffix(".weight")
        if name in trained:  # a listed trainable parameter: the run's value
            yield name, trained[name]
        elif f"{module}.lora_A.weight" in trained and name.endswith(".weight"):
            a, b = trained[f"{module}.lora_A.weight"], trained[f"{module}.lora_B.weight"]
            yield name, tensor.float() + scale * (b @ a)  # the export casts it to its layout's dtype
        else:
            yield name, tensor
