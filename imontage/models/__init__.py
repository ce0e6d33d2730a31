"""Models trained by imontage: one package per family (its record in ``family.py``, listed by
:mod:`imontage.models.registry`), what every family shares in :mod:`imontage.models.common`, and
the two questions the rest asks of a model config: :func:`build_model` and :func:`packing_spec`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from imontage.models.common.experts import TimestepExperts
from imontage.models.common.family import Expert
from imontage.models.common.sequence import DEFAULT_EMBEDDED_GUIDANCE, PackingSpec
from imontage.models.registry import family
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
    """The single-device model of ``cfg`` (a ``ModelConfig``), built by its family's record;
    ``device="meta"`` builds shapes only. A model with experts (Wan 2.2 A14B) is the one
    ``model.expert`` names, or, with none named, all of them in one
    :class:`~imontage.models.common.experts.TimestepExperts`.

    ``max_tensors``: for a config read from a file (``where``), the most parameters and buffers
    the build may register (:func:`tensor_limit`) before it stops with :class:`ModelTooLarge`.

    With ``model.lora`` set, the adapters are added and the base frozen
    (:func:`~imontage.models.lora.apply_lora`).
    """
    build = family(cfg).build
    experts = trained_experts(cfg)
    limit = contextlib.nullcontext() if max_tensors is None else tensor_limit(max_tensors, where or "model")
    with limit:
        if len(experts) > 1:  # every expert in one run: one module, routed by timestep
            model: nn.Module = TimestepExperts(experts, [build(cfg, device) for _ in experts])
        else:
            model = build(cfg, device)
        lora = getattr(cfg, "lora", None)
        if lora is not None:
            from imontage.models.lora import apply_lora, lora_enabled

            if lora_enabled(lora):  # frozen base, adapters and the listed parameters trainable
                apply_lora(model, lora)
    return model


def trained_experts(cfg: Any) -> tuple[Expert, ...]:
    """The experts a run of ``cfg`` trains: the one ``model.expert`` names, or all of them; () for a
    model of one network. A ValueError names an expert the model does not have."""
    experts = family(cfg).experts(cfg)
    chosen = str(getattr(cfg, "expert", "") or "")
    if not chosen:
        return experts
    named = [expert for expert in experts if expert.name == chosen]
    if not named:
        have = ", ".join(expert.name for expert in experts) or "none: it is one network"
        raise ValueError(f"model.expert '{chosen}' is not an expert of this model (its experts: {have})")
    return tuple(named)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def packing_spec(cfg: Any, guidance: float | None = None) -> PackingSpec:
    """What packing needs to know of the model of ``cfg`` (a ``ModelConfig``, dataclass or node).

    ``guidance``: the distilled guidance scale fed to a model with a guidance embedding
    (``flow_matching.embedded_guidance``; None: :data:`DEFAULT_EMBEDDED_GUIDANCE`); a model
    without one refuses a value. A ValueError names what cannot be built (channel counts that
    match no condition of the family, say).
    """
    record = family(cfg)
    inputs = record.model_inputs(cfg)
    if not inputs.guidance_embedding and guidance is not None:
        raise ValueError(
            f"flow_matching.embedded_guidance={guidance}, but the model (family {record.name}) has no "
            "guidance embedding to feed it to"
        )
    pt, ph, pw = (int(p) for p in cfg.patch_size)
    return PackingSpec(
        in_channels=record.latent_channels(cfg),
        patch_size=(pt, ph, pw),
        max_text_len=int(cfg.max_text_len),
        layout=str(cfg.positions.layout),
        virtual_frames=int(cfg.positions.virtual_frames),
        head_window=int(cfg.positions.head_window),
        tail_window=int(cfg.positions.tail_window),
        pooled_text_dim=inputs.pooled_text_dim,
        image_embed_dim=inputs.image_embed_dim,
        text_embed_2_dim=inputs.text_embed_2_dim,
        guidance=(DEFAULT_EMBEDDED_GUIDANCE if guidance is None else float(guidance))
        if inputs.guidance_embedding
        else None,
        channel_condition=inputs.channel_condition,
        text_embed_dim=int(cfg.text_dim) if str(cfg.text_encoder) == "precomputed" else 0,
        keyframe_condition=inputs.keyframe_condition,
    )
