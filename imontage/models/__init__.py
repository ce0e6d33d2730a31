"""Models trained by imontage, one package per family; :func:`build_model` picks by ``model.family``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def build_model(cfg: Any, device: torch.device | str | None = None) -> nn.Module:
    """The single-device model of ``cfg`` (a ``ModelConfig``); ``device="meta"`` builds shapes only.

    With ``model.lora`` set, the adapters are added and the base frozen
    (:func:`~imontage.models.lora.apply_lora`).

    Families are imported when asked for, so a DiT run never imports the pretrained families' code.
    """
    family = str(getattr(cfg, "family", "dit"))
    build: Callable[[Any, torch.device | str | None], nn.Module]
    if family == "dit":
        from imontage.models.dit import build_dit as build
    elif family == "wan":
        from imontage.models.wan import build_wan as build
    elif family == "hunyuan_video":
        from imontage.models.hunyuan_video import build_hunyuan_video as build
    else:
        raise ValueError(f"model.family '{family}' is not one of dit, wan, hunyuan_video")
    model = build(cfg, device)
    lora = getattr(cfg, "lora", None)
    if lora is not None:
        from imontage.models.lora import apply_lora, lora_enabled

        if lora_enabled(lora):  # frozen base, adapters and the listed parameters trainable
            apply_lora(model, lora)
    return model
