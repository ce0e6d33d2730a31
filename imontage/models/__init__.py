"""Models trained by imontage, one package per family; :func:`build_model` picks by ``model.family``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from imontage.untrusted import InputError


class ModelTooLarge(InputError):
    """A model config that describes more tensors than the weights offered for it, or tensors too
    large to describe: refused while the model is being built, before it is built whole."""


@contextlib.contextmanager
def tensor_limit(limit: int, where: str) -> Iterator[None]:
    """Building a model inside this block stops once it has registered more than ``limit``
    parameters and buffers: a config read from a file (``depth: 1000000``) costs at most
    ``limit`` registrations, not the hours a million blocks take to build even on the meta device."""
    count = 0

    def registered(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise ModelTooLarge(
                f"{where}: its model config describes more than {limit:,} tensors, more than the weights "
                "offered for it (check the layer counts: depth, num_layers, num_single_layers)"
            )

    handles = [
        register_module_parameter_registration_hook(registered),
        register_module_buffer_registration_hook(registered),
    ]
    try:
        yield
    except ModelTooLarge:
        raise
    except (RuntimeError, OverflowError, MemoryError) as error:  # a size whose storage overflows
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelTooLarge(
            f"{where}: its model config describes tensors that cannot exist ({reason})"
        ) from None
    except ValueError as error:  # e.g. model.lora.targets naming no module of the model
        raise InputError(f"{where}: its model config: {error}") from None
    finally:
        for handle in handles:
            handle.remove()


def build_model(
    cfg: Any, device: torch.device | str | None = None, max_tensors: int | None = None, where: str = ""
) -> nn.Module:
    """The single-device model of ``cfg`` (a ``ModelConfig``); ``device="meta"`` builds shapes only.

    ``max_tensors``: for a config read from a file (``where``), the most parameters and buffers
    the build may register (:func:`tensor_limit`) before it stops with :class:`ModelTooLarge`.

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
    limit = contextlib.nullcontext() if max_tensors is None else tensor_limit(max_tensors, where or "model")
    with limit:
        model = build(cfg, device)
        lora = getattr(cfg, "lora", None)
        if lora is not None:
            from imontage.models.lora import apply_lora, lora_enabled

            if lora_enabled(lora):  # frozen base, adapters and the listed parameters trainable
                apply_lora(model, lora)
    return model
